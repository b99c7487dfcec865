"""What keeps the GPU busy, checked on a CPU: no host<->device synchronisation between log steps, and one compiled
graph per model (no graph breaks, no recompiles)."""

import pytest
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from fasttrain import models
from fasttrain.config import TrainSection, load_config
from fasttrain.data.loaders import build_loaders
from fasttrain.loop.engine import StepEngine
from fasttrain.loop.optim import build_optimizers, build_schedulers

# Calls that make the host wait for the device (or move host values onto it).
SYNCING = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "tensor", "as_tensor"}
SMALL = {
    "airbench94": {"widths": (8, 16, 16)},
    "deepcnn": {"widths": (8, 16), "blocks": (1, 1)},
    "resnet9_ffcv": {"width_mult": 0.125},
    "resnet9_myrtle": {"width_mult": 0.125},
    "resnet18": {"width": 8},
}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def engine_for(model, accelerator, steps_per_epoch):
    t = TrainSection(epochs=2, batch_size=100, lr=0.1, lr_ref_batch=100, lr_peak_epoch=1)
    optimizers = build_optimizers(model, t, {}, t.batch_size)
    schedulers = build_schedulers(optimizers, t, {}, steps_per_epoch)
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    return StepEngine(model, prepared[:1], prepared[1:], accelerator, label_smoothing=0.1)


def syncs_between_log_steps(engine, train_loader) -> list[str]:
    """The synchronising calls of 8 steps between two log steps (after the epoch's first step, which runs the
    whole-set augmentation once)."""
    batches = iter(train_loader)
    engine.step(*next(batches))
    counter = SyncCounter()
    with counter:
        for _ in range(8):
            images, labels = next(batches)
            engine.step(images, labels)
    assert engine.take_window().steps == 9
    return counter.calls


def test_no_host_sync_between_log_steps(cifar_slice_dir):
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    train_loader, _ = build_loaders(
        cifar_slice_dir, mode="resident", batch_size=100, eval_batch_size=500, workers=1, device="cpu",
        translate=2, translate_fill="reflect", cutout=4, flip_mode="alternating",
    )  # fmt: skip
    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1)).to(memory_format=torch.channels_last)
    engine = engine_for(model, accelerator, len(train_loader))
    calls = syncs_between_log_steps(engine, train_loader)
    assert calls == [], f"host syncs in the step loop: {calls}"


def airbench_engine(cfg, accelerator, train_loader):
    """The trainer's engine for the airbench94 recipe: Muon and SGD optimisers over its four parameter groups,
    one schedule per group, summed loss, and `cfg`'s gradient clipping."""
    t = cfg.train
    model = models.create("airbench94", **{k: v for k, v in cfg.model.items() if k != "name"})
    models.data_init(model, train_loader.sample_images(500))
    model = model.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(model, t, cfg.param_groups, t.batch_size)
    schedulers = build_schedulers(optimizers, t, cfg.param_groups, len(train_loader))
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    assert sorted(type(o.optimizer).__name__ for o in prepared[: len(optimizers)]) == ["Muon", "SGD"]
    return StepEngine(
        model, prepared[: len(optimizers)], prepared[len(optimizers) :], accelerator,
        label_smoothing=t.label_smoothing, loss_reduction=t.loss_reduction, grad_clip=t.grad_clip,
    )  # fmt: skip


def test_no_host_sync_with_airbench_parameter_groups_and_grad_clipping(cifar_slice_dir):
    cfg = load_config(
        ["--config", "airbench94", "--model.widths", "8,16,16", "--train.batch_size", "100",
         "--train.grad_clip", "1.0", "--data.eval_batch_size", "500"]
    )  # fmt: skip
    assert len(cfg.param_groups) == 4 and cfg.train.grad_clip == 1.0
    d = cfg.data
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    train_loader, _ = build_loaders(
        cifar_slice_dir, mode=d.mode, batch_size=cfg.train.batch_size, eval_batch_size=d.eval_batch_size,
        workers=1, device="cpu", flip=d.flip, flip_mode=d.flip_mode, translate=d.translate,
        translate_fill=d.translate_fill, cutout=d.cutout, channels_last=True,
    )  # fmt: skip
    engine = airbench_engine(cfg, accelerator, train_loader)
    calls = syncs_between_log_steps(engine, train_loader)
    assert calls == [], f"host syncs in the airbench step loop: {calls}"


@pytest.mark.parametrize(("fused", "expected"), [(True, []), (False, ["item"] * 8)])
def test_under_fp16s_grad_scaler_one_fused_optimiser_reads_nothing_back(fused, expected):
    """fp16 with one optimiser: a fused one takes the scaler's inf flag on the device (CUDA's default, as the
    trainer asks for fused kernels there); a plain one is read by torch's GradScaler, once a step."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # fp16's, as on CUDA (the CPU has no fp16 autocast to test)
    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1))
    t = TrainSection(epochs=2, batch_size=16, lr=0.1, lr_ref_batch=16, lr_peak_epoch=1)
    optimizers = build_optimizers(model, t, {}, t.batch_size, fused=fused)
    schedulers = build_schedulers(optimizers, t, {}, 10)
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    engine = StepEngine(model, prepared[:1], prepared[1:], accelerator)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(9)]
    engine.step(*batches[0])
    counter = SyncCounter()
    with counter:
        for images, labels in batches[1:]:
            engine.step(images, labels)
    assert counter.calls == expected


def test_sync_counter_sees_the_syncs_it_looks_for():
    x = torch.ones(3)
    counter = SyncCounter()
    with counter:
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
        torch.tensor(3.0)
    assert counter.calls == ["item", "__bool__", "tolist", "tensor"]


def test_small_settings_cover_every_registered_model():
    assert sorted(SMALL) == models.names()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_compiled_train_step_is_one_graph(name):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.create(name, **SMALL[name]).to(memory_format=torch.channels_last)
    counter = CompileCounter()
    forward = torch.compile(model, backend=counter)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(forward(images), torch.randint(0, 10, (4,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert counter.frame_count == 1, f"{name}: {counter.frame_count} graphs (a graph break or a recompile)"
