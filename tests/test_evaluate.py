"""Test-time augmentation levels, against the views and weights written out here from airbench94_muon.py's `infer`:
level 1 averages the image and its mirror; level 2 gives that average half the weight and the same average over
the image shifted one pixel (reflect padding) up-left and down-right a quarter each, so the six views weigh
1/4 (x), 1/4 (mirror x), 1/8 each (the two shifts and their mirrors)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.loop.evaluate import tta_logits


@pytest.fixture
def model() -> nn.Module:
    """A small fixed-weight net whose logits depend on where things are in the image (no pooling symmetry), so a
    mirror or a shift changes its output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def shifted_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """airbench's two translations: reflect-pad by 1, then the top-left and the bottom-right crops."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[2:]
    return padded[:, :, 0:h, 0:w], padded[:, :, 2 : h + 2, 2 : w + 2]


def test_the_shifted_views_move_the_image_one_pixel_with_reflected_borders(images):
    down_right, up_left = shifted_views(images)
    assert torch.equal(down_right[:, :, 1:, 1:], images[:, :, :-1, :-1])
    assert torch.equal(up_left[:, :, :-1, :-1], images[:, :, 1:, 1:])
    assert torch.equal(down_right[:, :, 0, 1:], images[:, :, 1, :-1])  # row -1 reflects row 1
    assert torch.equal(up_left[:, :, -1, :-1], images[:, :, -2, 1:])


@torch.no_grad()
def test_level_0_is_the_plain_forward(model, images):
    torch.testing.assert_close(tta_logits(model, images, 0), model(images), rtol=0, atol=0)


@torch.no_grad()
def test_level_1_is_the_mean_of_the_image_and_its_mirror(model, images):
    expected = (model(images) + model(images.flip(3))) / 2
    torch.testing.assert_close(tta_logits(model, images, 1), expected)
    assert not torch.allclose(expected, model(images), atol=1e-3), "the mirror changes this model's output"


@torch.no_grad()
def test_level_2_weighs_six_views_as_airbench_does(model, images):
    down_right, up_left = shifted_views(images)
    expected = (
        model(images) / 4
        + model(images.flip(3)) / 4
        + model(down_right) / 8
        + model(down_right.flip(3)) / 8
        + model(up_left) / 8
        + model(up_left.flip(3)) / 8
    )
    torch.testing.assert_close(tta_logits(model, images, 2), expected)
    assert not torch.allclose(expected, tta_logits(model, images, 1), atol=1e-3), "the shifts change the output"


@torch.no_grad()
def test_level_2_keeps_channels_last_inputs_channels_last(model, images):
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    channels_last = images.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(tta_logits(model, channels_last, 2), tta_logits(model, images, 2))
    assert seen[:6] == [True] * 6
