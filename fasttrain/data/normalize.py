"""CIFAR-10 channel statistics and the uint8 -> normalised float32 conversion both loader modes end with."""

from __future__ import annotations

import torch

# Per-channel mean and standard deviation of the CIFAR-10 training images, in 0..255 pixel units.
CIFAR10_MEAN = (125.307, 122.961, 113.8575)
CIFAR10_STD = (51.5865, 50.847, 51.255)


class Normalizer:
    """uint8 NCHW images -> float32 (x - mean) / std on the images' device, in the requested memory format.

    The result is always a fresh tensor, so it never aliases a loader's reused uint8 buffer.
    """

    def __init__(self, device: torch.device, channels_last: bool = True):
        self.mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = images.to(dtype=torch.float32, memory_format=self.memory_format)
        return out.sub_(self.mean).mul_(self.inv_std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of Normalizer, rounded back to uint8 pixels (exact for loader outputs): for tests and inspection."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
