"""The step engine in-process: no run directory, no subprocess, a real Accelerator on the CPU."""

import contextlib
import copy
import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from fasttrain import models
from fasttrain.config import ParamGroup, TrainSection
from fasttrain.errors import NonFiniteLoss
from fasttrain.loop.engine import StepEngine, WindowStats, prepare_for_engine, raise_if_nonfinite
from fasttrain.loop.optim import build_optimizers, build_schedulers, lr_factor

STEPS_PER_EPOCH = 4


def make_engine(nonfinite="stop", groups=None, lr=0.1, model=None, **train):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model = model or models.create("deepcnn", widths=(8, 8), blocks=(1, 1))
    t = TrainSection(epochs=2, batch_size=16, lr=lr, lr_ref_batch=16, lr_peak_epoch=1, **train)
    optimizers = build_optimizers(model, t, groups or {}, t.batch_size)
    schedulers = build_schedulers(optimizers, t, groups or {}, STEPS_PER_EPOCH)
    model, optimizers, schedulers = prepare_for_engine(accelerator, model, optimizers, schedulers)
    return StepEngine(model, optimizers, schedulers, accelerator, label_smoothing=0.1, nonfinite=nonfinite)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_one_step_changes_every_trained_weight():
    engine = make_engine()
    before = {k: v.clone() for k, v in engine.model.named_parameters()}
    assert engine.step(*batch())
    changed = [k for k, v in engine.model.named_parameters() if not torch.equal(v, before[k])]
    assert set(changed) == set(before)


def test_a_window_counts_its_steps_images_and_correct_predictions_then_starts_anew():
    """(That nothing in it reads the device before `take_window` is test_throughput's host-sync count.)"""
    engine = make_engine()
    for seed in range(3):
        engine.step(*batch(seed=seed))
    stats = engine.take_window()
    assert (stats.steps, stats.images, stats.nonfinite_steps) == (3, 48, 0)
    assert stats.acc * 48 == pytest.approx(round(stats.acc * 48)), "a count of correct predictions out of 48"
    assert math.isfinite(stats.loss) and math.isfinite(stats.loss_smoothed)
    fresh = engine.take_window()
    assert (fresh.steps, fresh.images) == (0, 0) and math.isnan(fresh.loss), "taking a window starts a new one"


def test_plain_loss_is_reported_apart_from_the_smoothed_objective():
    engine = make_engine()
    images, labels = batch()
    with torch.no_grad():
        logits = engine.model(images)
    expected = nn.functional.cross_entropy(logits, labels).item()
    engine.step(images, labels)
    stats = engine.take_window()
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.loss_smoothed != pytest.approx(stats.loss, rel=1e-3)


def test_schedule_advances_once_per_optimizer_step():
    engine = make_engine()
    total, peak = 2 * STEPS_PER_EPOCH, STEPS_PER_EPOCH
    for step in range(5):
        assert engine.lr() == pytest.approx(0.1 * lr_factor(step, total, peak, "triangular"))
        engine.step(*batch(seed=step))
    assert engine.schedulers[0].scheduler.last_epoch == 5


def test_a_non_finite_loss_is_reported_with_its_step_window():
    engine = make_engine(lr=1e30, schedule="constant")
    for seed in range(4):
        engine.step(*batch(seed=seed))
    stats = engine.take_window()
    assert stats.nonfinite_steps == 3, "step 1 trains at the initial weights; its update makes every later loss NaN"
    with pytest.raises(NonFiniteLoss, match="optimizer steps 1-4"):
        raise_if_nonfinite([stats.nonfinite_steps], 0, 4, "hint")


def test_a_non_finite_loss_on_one_rank_is_named_by_every_rank_alike():
    raise_if_nonfinite([0, 0], 10, 12, "hint")  # no rank saw one: nothing to raise
    with pytest.raises(NonFiniteLoss) as error:
        raise_if_nonfinite([0, 1], 10, 12, "hint")
    assert str(error.value) == "the loss became NaN/Inf in 1 of optimizer steps 11-12 on rank 1 of 2 processes. hint"
    with pytest.raises(NonFiniteLoss, match="in 2 of optimizer steps 11-12 on ranks 0, 1 of 2 processes"):
        raise_if_nonfinite([2, 1], 10, 12, "hint")


def test_skip_mode_drops_the_step_and_leaves_batchnorm_statistics_as_they_were():
    engine = make_engine(nonfinite="skip")
    engine.step(*batch())
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    images, labels = batch(seed=2)
    images[0, 0, 0, 0] = float("nan")
    assert not engine.step(images, labels)
    assert all(torch.equal(v, weights[k]) for k, v in engine.model.state_dict().items())
    stats = engine.take_window()
    assert (stats.steps, stats.skipped_steps) == (1, 1)


def test_several_optimisers_each_step_their_own_groups_on_their_own_schedule():
    groups = {
        "head": ParamGroup(params=("*head*",), lr=0.5, end_epoch=1.0),
        "rest": ParamGroup(params=("*",), optimizer="adamw", lr=0.01, schedule="constant"),
    }
    engine = make_engine(groups=groups)
    kinds = [type(o.optimizer).__name__ for o in engine.optimizers]
    assert kinds == ["SGD", "AdamW"]
    head = [p for n, p in engine.model.named_parameters() if "head" in n]
    for step in range(STEPS_PER_EPOCH):
        engine.step(*batch(seed=step))
    frozen = [p.clone() for p in head]
    engine.step(*batch(seed=9))
    assert all(torch.equal(a, b) for a, b in zip(head, frozen)), "end_epoch 1: LR 0 from then on"
    assert engine.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.01)


def test_windows_combine_weighted_by_images():
    a = WindowStats(steps=1, images=10, loss=1.0, loss_smoothed=2.0, acc=0.5, nonfinite_steps=0, skipped_steps=0)
    b = WindowStats(steps=3, images=30, loss=3.0, loss_smoothed=4.0, acc=0.1, nonfinite_steps=1, skipped_steps=0)
    both = WindowStats.combine([a, b])
    assert (both.steps, both.images, both.nonfinite_steps) == (4, 40, 1)
    assert both.loss == pytest.approx(2.5) and both.acc == pytest.approx(0.2)


class TwoProcessAccelerator:
    """What the engine asks of an Accelerator, as rank 0 of 2 would answer (no process group: DDP's averaging is
    left out, so the gradient seen is this rank's own)."""

    num_processes, device, scaler = 2, torch.device("cpu"), None

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def test_a_summed_loss_is_scaled_by_the_process_count_and_reported_unscaled():
    """Under DDP each rank's gradient is averaged over ranks; x2 makes a summed loss's gradient the global sum."""
    torch.manual_seed(0)
    images, labels = batch()
    initial = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    gradients, reported = {}, {}
    for reduction in ("mean", "sum"):
        model = copy.deepcopy(initial)
        engine = StepEngine(
            model, [torch.optim.SGD(model.parameters(), lr=0.0)], [], TwoProcessAccelerator(), loss_reduction=reduction
        )
        model[1].weight.register_hook(lambda grad, reduction=reduction: gradients.setdefault(reduction, grad.clone()))
        engine.step(images, labels)
        reported[reduction] = engine.take_window()
    torch.testing.assert_close(gradients["sum"], 2 * 16 * gradients["mean"])  # 2 processes x 16 images
    assert reported["sum"].loss == pytest.approx(reported["mean"].loss, rel=1e-6)  # per image, unscaled
    assert reported["sum"].loss_smoothed == pytest.approx(reported["mean"].loss_smoothed, rel=1e-6)


def _engine_with_grad_scaler(grad_clip=None, **scaler_args):
    """A real Accelerator carrying a real GradScaler (fp16's; torch's CPU one here, as fp16 itself needs CUDA) and two
    optimisers, as airbench94 has: SGD on the weights, SGD on the biases. Plus an unscaled copy of the model."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_args)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    reference = copy.deepcopy(model)
    weights, biases = torch.optim.SGD([model[1].weight], lr=1.0), torch.optim.SGD([model[1].bias], lr=1.0)
    prepared = accelerator.prepare(model, weights, biases)
    return StepEngine(prepared[0], list(prepared[1:]), [], accelerator, grad_clip=grad_clip), reference


def _plain_sgd_step(model: nn.Module, images, labels, grad_clip=None) -> dict:
    nn.functional.cross_entropy(model(images), labels).backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return {name: (p - p.grad).detach() for name, p in model.named_parameters()}  # lr 1


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_several_optimisers_under_one_grad_scaler_each_step_by_the_true_gradient(grad_clip):
    # growth_interval=1: the scale doubles after every clean step. Stepped one optimiser at a time with an update
    # after each (Accelerate's wrapper), the second would be unscaled by the doubled scale and move half as far.
    engine, reference = _engine_with_grad_scaler(grad_clip, init_scale=2.0**10, growth_interval=1)
    images, labels = batch()
    expected = _plain_sgd_step(reference, images, labels, grad_clip)
    assert engine.step(images, labels)
    for name, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert engine.accelerator.scaler.get_scale() == 2.0**11  # updated once, not once per optimiser


def test_an_inf_gradient_of_one_optimiser_under_the_grad_scaler_moves_no_weight_and_no_schedule():
    engine, _ = _engine_with_grad_scaler(init_scale=2.0**10, growth_interval=1)
    optimizer = engine.optimizers[0]
    engine.schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0 / (1 + step))]
    engine.model[1].weight.register_hook(lambda grad: grad * float("inf"))  # the first optimiser's only
    before = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    assert engine.step(*batch())  # a skip by the scaler is not nonfinite="skip": the step is counted
    assert all(torch.equal(p, before[name]) for name, p in engine.model.named_parameters())  # the bias too
    assert engine.accelerator.scaler.get_scale() == 2.0**9  # backed off once
    assert engine.schedulers[0].last_epoch == 0 and engine.lr() == 1.0  # the schedule waited


@pytest.mark.parametrize("fused", [False, True])
def test_one_optimiser_under_the_grad_scaler_steps_on_a_clean_gradient_and_not_on_an_inf(fused):
    """fp16 with one optimiser goes through Accelerate's wrapper: scaler.step, then update. A fused optimiser takes
    the scaler's inf flag on the device and reads nothing back, so the wrapper cannot see the skip and the schedule
    steps on; a plain one is read, and its schedule waits."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    engine = StepEngine(model, [optimizer], [schedule], accelerator)
    before = model[1].weight.detach().clone()
    assert engine.step(*batch())
    assert not torch.equal(model[1].weight, before) and accelerator.scaler.get_scale() == 2.0**11
    assert schedule.scheduler.last_epoch == 1

    before = model[1].weight.detach().clone()
    hook = model[1].weight.register_hook(lambda grad: grad * float("inf"))
    assert engine.step(*batch())
    hook.remove()
    assert torch.equal(model[1].weight, before) and accelerator.scaler.get_scale() == 2.0**10
    assert schedule.scheduler.last_epoch == (2 if fused else 1)


def test_models_prepared_under_bf16_share_their_compiled_graphs(fresh_accelerate_state):
    """Each repeat of a run prepares a new model. Accelerate's bf16 forward wrapper holds an autocast object of its
    own, which torch.compile guards on: with it, every model compiled again, and from a run's 5th repeat on (Dynamo's
    recompile limit) trained uncompiled. Without it, one graph serves every model, still run under bf16 autocast."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    images = torch.randn(2, 3, 4, 4)
    graphs, dtypes = [], set()
    for _ in range(3):
        model, _, _ = prepare_for_engine(accelerator, nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), [], [])
        with accelerator.autocast():
            dtypes.add(torch.compile(model, backend="eager", dynamic=False)(images).dtype)
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 2, f"graphs after each model: {graphs}"
    assert dtypes == {torch.bfloat16}
