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
        mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
        self.inv_std = inv_std.to(device, torch.float32)
        self.shift = (-mean * inv_std).to(device, torch.float32)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._full_size: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=self.memory_format)
        shift, inv_std = self._constants(images.shape[2], images.shape[3])
        # x / std - mean / std in one kernel that reads the uint8 pixels and writes float32
        return torch.addcmul(shift, images, inv_std)

    def _constants(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """shift and 1/std as whole images in the output's memory format: broadcasting them over the channel axis,
        the innermost one in channels-last memory, would keep the kernel from vectorising (4x slower on a CPU)."""
        if (height, width) not in self._full_size:
            self._full_size[height, width] = tuple(
                t.expand(1, 3, height, width).contiguous(memory_format=self.memory_format)
                for t in (self.shift, self.inv_std)
            )
        return self._full_size[height, width]


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of Normalizer, rounded back to uint8 pixels (exact for loader outputs): for tests and inspection."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
