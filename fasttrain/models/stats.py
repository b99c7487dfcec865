"""Model size and cost: trainable parameters and forward FLOPs per image."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode without autograd inside the block (a forward there changes no statistics), then every
    submodule in its own mode again: model.train(previous) alone would flatten a mixed train/eval setup."""
    previous_modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in previous_modes.items():
            module.training = training


def flops_per_image(model: nn.Module, image_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Forward FLOPs (a multiply-add counts 2) for one image, counted in eval mode without autograd."""
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    counter = FlopCounterMode(display=False)
    with evaluating(model), counter:
        model(torch.zeros(1, *image_size, device=device, dtype=dtype))
    return int(counter.get_total_flops())
