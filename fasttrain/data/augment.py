"""Batched, on-device training augmentations with the same distributions as ffcv's numba operations, plus airbench's
alternating flip and reflect padding.

An `Augmentation` says what to do. An `Augmenter` holds the images as a table of pixels, padded once for the
translation (with its fill, or reflected) and followed by one pixel of the cutout colour. `draw` takes every random
parameter of a pass over n images at once (on the generator's device, in a fixed order: flips, then translation
rows and columns, then cutout rows and columns), so results do not depend on how `apply` is chunked. `apply` turns
the draws into one pixel index per output pixel (flip and window offset; the cutout square points at the cutout
pixel) and gathers all pixels with one `index_select`. No Python loop runs over samples and nothing synchronises
with the host.

Pixels are uint8 before normalisation, as in both loader modes: fill "zero" is black, ffcv's default (0, 0, 0);
fill "mean" is the CIFAR-10 mean colour truncated to integers, (125, 122, 113), what ffcv's CIFAR example passes.

ffcv semantics reproduced (ffcv/transforms/{flip,translate,cutout}.py, ffcv 1.0.2):
- flip: each image is mirrored left-right with probability 1/2 (ffcv: `rand() < flip_prob`).
- translate: the image is padded by `padding` pixels on every side and a window of the original size is cut at
  offsets y, x drawn uniformly from {0, ..., 2 * padding}: a shift by (padding - y, padding - x) pixels, each in
  [-padding, padding]. The uncovered border is filled ("zero", "mean") or, with "reflect", holds the image
  mirrored at its edge without repeating the edge pixel (torch.nn.functional.pad's "reflect", airbench's choice).
- cutout: a size x size square whose top-left corner is drawn uniformly from {0, ..., H - size} x {0, ..., W - size}
  (so it always lies wholly inside the image) is filled, on every image.
Alternating flip (airbench): image i carries a flip bit drawn once from the seed; in epoch e it is mirrored iff
bit XOR (e is odd), so every image is seen mirrored in exactly one of any two consecutive epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fasttrain.data.normalize import CIFAR10_MEAN

FLIP_MODES = ("random", "alternating")
TRANSLATE_FILLS = ("zero", "mean", "reflect")
CUTOUT_FILLS = ("zero", "mean")
FILL_COLOURS = {"zero": (0, 0, 0), "mean": tuple(int(m) for m in CIFAR10_MEAN)}


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation, in ffcv's order: flip -> translate -> cutout. 0 / None disables a step."""

    flip: str | None = None  # None, "random" or "alternating"
    translate: int = 0
    translate_fill: str = "zero"
    cutout: int = 0
    cutout_fill: str = "zero"
    image_size: int = 32  # square images

    def __post_init__(self):
        if self.flip not in (None, *FLIP_MODES):
            raise ValueError(f"flip must be None or one of {FLIP_MODES}, not {self.flip!r}")
        if self.translate_fill not in TRANSLATE_FILLS or self.cutout_fill not in CUTOUT_FILLS:
            raise ValueError(f"unknown fill {self.translate_fill!r} / {self.cutout_fill!r}")
        if self.translate < 0 or self.cutout < 0:
            raise ValueError(f"translate and cutout must be >= 0 (got {self.translate}, {self.cutout})")
        if self.cutout > self.image_size:
            raise ValueError(f"cutout {self.cutout} is larger than the {self.image_size}px images")
        if self.translate_fill == "reflect" and self.translate >= self.image_size:
            raise ValueError(f"reflect padding needs translate < {self.image_size} (got {self.translate})")


@dataclass
class Draws:
    """Per-image random parameters of one pass: mirrored (bool [n]), translation window corners in [0, 2 * translate]
    and cutout corners (int64 [n]); None where the step is off."""

    mirrored: torch.Tensor | None = None
    window_y: torch.Tensor | None = None
    window_x: torch.Tensor | None = None
    corner_y: torch.Tensor | None = None
    corner_x: torch.Tensor | None = None

    def slice(self, start: int, end: int) -> Draws:
        return Draws(*(None if t is None else t[start:end] for t in self.__dict__.values()))


def alternating_flip_bits(n: int, seed: int) -> torch.Tensor:
    """One flip bit per data set index (bool [n], CPU), a function of the seed alone: the same on every rank."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF11B]))
    return torch.from_numpy(rng.random(n) < 0.5)


def alternating_mirrored(bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images (given their flip `bits`) are mirrored in `epoch`: bit XOR (epoch is odd)."""
    return bits ^ (epoch % 2 == 1)


def _reflected(size: int, padding: int, device: torch.device) -> torch.Tensor:
    """Source coordinate of each padded coordinate under reflect padding: -k -> k, size - 1 + k -> size - 1 - k."""
    coords = torch.arange(-padding, size + padding, device=device).abs()
    return (size - 1) - ((size - 1) - coords).abs()


class Augmenter:
    """An `Augmentation` of a fixed set of uint8 NCHW `images` (any device; the table lives there)."""

    def __init__(self, aug: Augmentation, images: torch.Tensor):
        self.aug, self.device = aug, images.device
        self.size, self.channels = images.shape[0], images.shape[1]
        if images.shape[2:] != (aug.image_size, aug.image_size):
            raise ValueError(f"images are {tuple(images.shape[2:])}, the augmentation expects {aug.image_size}px")
        pad, size = aug.translate, aug.image_size
        self.padded_size = size + 2 * pad
        nhwc = images.permute(0, 2, 3, 1)
        pixels_per_image = self.padded_size * self.padded_size
        self.cutout_pixel = self.size * pixels_per_image  # the table's last row: one pixel of the cutout colour
        self.table = torch.empty((self.cutout_pixel + 1, self.channels), dtype=torch.uint8, device=self.device)
        self.table[-1] = self._colour(aug.cutout_fill)
        padded = self.table[:-1].view(self.size, self.padded_size, self.padded_size, self.channels)
        if aug.translate_fill == "reflect":
            reflected = _reflected(size, pad, self.device)
            padded.copy_(nhwc[:, reflected][:, :, reflected])
        else:
            padded.copy_(self._colour(aug.translate_fill).expand_as(padded))
            padded[:, pad : pad + size, pad : pad + size] = nhwc
        fits_int32 = self.table.shape[0] < 2**31
        self.index_dtype = torch.int32 if fits_int32 else torch.int64
        self._cutout_pixel = torch.tensor(self.cutout_pixel, dtype=self.index_dtype, device=self.device)

    def _colour(self, fill: str) -> torch.Tensor:
        return torch.tensor(FILL_COLOURS[fill], dtype=torch.uint8, device=self.device)

    def images(self, count: int) -> torch.Tensor:
        """The first `count` images, unaugmented: uint8 [count, C, H, W], a channels-last view of the table."""
        pad, size, padded = self.aug.translate, self.aug.image_size, self.padded_size
        nhwc = self.table[: count * padded * padded].view(count, padded, padded, self.channels)
        return nhwc[:, pad : pad + size, pad : pad + size].permute(0, 3, 1, 2)

    def draw(self, n: int, generator: torch.Generator | None, mirrored: torch.Tensor | None = None) -> Draws:
        """Every random parameter for n images. `mirrored` (bool [n]) is required with flip "alternating" (see
        `alternating_mirrored`); with "random" it is drawn here."""
        aug, device, out = self.aug, self.device, Draws()
        if aug.flip == "random":
            out.mirrored = torch.rand(n, generator=generator, device=device) < 0.5
        elif aug.flip == "alternating":
            if mirrored is None:
                raise ValueError("flip 'alternating' needs the epoch's mirrored flags")
            out.mirrored = mirrored
        if aug.translate > 0:
            high = 2 * aug.translate + 1
            out.window_y = torch.randint(0, high, (n,), generator=generator, device=device)
            out.window_x = torch.randint(0, high, (n,), generator=generator, device=device)
        if aug.cutout > 0:
            high = aug.image_size - aug.cutout + 1
            out.corner_y = torch.randint(0, high, (n,), generator=generator, device=device)
            out.corner_x = torch.randint(0, high, (n,), generator=generator, device=device)
        return out

    def pixel_index(self, index: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Row of the table that each output pixel takes: [n, H, W] (int32 where the table allows)."""
        n, size, padded, dtype = index.shape[0], self.aug.image_size, self.padded_size, self.index_dtype
        coords = torch.arange(size, device=self.device, dtype=dtype).expand(n, size)
        rows = coords if draws.window_y is None else coords + draws.window_y.to(dtype).view(n, 1)
        cols = coords if draws.window_x is None else coords + draws.window_x.to(dtype).view(n, 1)
        if draws.mirrored is not None:  # flip first, then translate: the padding is symmetric, so mirror the column
            cols = torch.where(draws.mirrored.view(n, 1), (padded - 1) - cols, cols)
        row_starts = index.to(dtype).view(n, 1) * (padded * padded) + rows * padded
        pixels = row_starts.view(n, size, 1) + cols.view(n, 1, size)
        if draws.corner_y is not None:  # point the square's pixels at the cutout pixel: n * cutout^2 writes
            square = torch.arange(self.aug.cutout, device=self.device)
            square_rows = (draws.corner_y.view(n, 1) + square).view(n, -1, 1)
            square_cols = (draws.corner_x.view(n, 1) + square).view(n, 1, -1)
            samples = torch.arange(n, device=self.device).view(n, 1, 1)
            pixels.index_put_((samples, square_rows, square_cols), self._cutout_pixel)
        return pixels

    def apply(self, index: torch.Tensor, draws: Draws, out: torch.Tensor | None = None) -> torch.Tensor:
        """Images `index` augmented with `draws` (of the same length): uint8 [n, C, H, W] in channels-last memory.
        `out`, if given, is a contiguous uint8 [n, H, W, C] buffer to write into."""
        n, size = index.shape[0], self.aug.image_size
        if out is None:
            out = torch.empty((n, size, size, self.channels), dtype=torch.uint8, device=self.device)
        pixels = self.pixel_index(index, draws).view(-1)
        torch.index_select(self.table, 0, pixels, out=out.view(-1, self.channels))
        return out.permute(0, 3, 1, 2)


def augment(
    images: torch.Tensor,
    aug: Augmentation,
    generator: torch.Generator | None = None,
    mirrored: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole uint8 batch at once, `draw` then `apply` (for tests and small batches)."""
    augmenter = Augmenter(aug, images)
    index = torch.arange(images.shape[0], device=images.device)
    return augmenter.apply(index, augmenter.draw(images.shape[0], generator, mirrored))
