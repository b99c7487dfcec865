"""What keeps the GPU busy, checked on a CPU: no host<->device synchronisation between log steps, and one compiled
graph per model (no graph breaks, no recompiles)."""

import pytest
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

from fasttrain import models
from fasttrain.config import TrainSection
from fasttrain.data.loaders import build_loaders
from fasttrain.loop.engine import StepEngine
from fasttrain.loop.optim import build_optimizers, build_schedulers

# Calls that make the host wait for the device (or move host values onto it).
SYNCING = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "tensor", "as_tensor"}
SMALL = {
    "airbench94": {"widths": (8, 16, 16)},
    "deepcnn": {"widths": (8, 16), "blocks": (1, 1)},
    "resnet9": {"width_mult": 0.125},
    "resnet9_ffcv": {"width_mult": 0.125},
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


def test_no_host_sync_between_log_steps(cifar_slice_dir):
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    train_loader, _ = build_loaders(
        cifar_slice_dir, mode="resident", batch_size=100, eval_batch_size=500, workers=1, device="cpu",
        translate=2, translate_fill="reflect", cutout=4, flip_mode="alternating",
    )  # fmt: skip
    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1)).to(memory_format=torch.channels_last)
    engine = engine_for(model, accelerator, len(train_loader))
    batches = iter(train_loader)
    engine.step(*next(batches))  # the epoch's first batch (whole-set augmentation happens once, here)
    counter = SyncCounter()
    with counter:
        for _ in range(8):  # 8 steps between two log steps
            images, labels = next(batches)
            engine.step(images, labels)
    assert counter.calls == [], f"host syncs in the step loop: {counter.calls}"
    assert engine.take_window().steps == 9


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
