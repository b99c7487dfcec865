"""Batched, on-device training augmentations with the same distributions as ffcv's numba operations.

Each function takes an NCHW batch (uint8 or float, any device), draws independent parameters per sample from
`generator` (which must live on the batch's device; None uses torch's default generator), and returns a new batch
of the same shape, dtype and device. No Python loop runs over samples. Applied to uint8 pixels before
normalisation, as both loader modes do, a fill of 0 is black, exactly like ffcv's default fill (0, 0, 0).

ffcv semantics reproduced (ffcv/transforms/{flip,translate,cutout}.py, ffcv 1.0.2):
- flip: each image is mirrored left-right with probability p (ffcv: `rand() < flip_prob`).
- translate: the image is padded by `padding` zero pixels on every side and a window of the original size is cut
  at offsets y, x drawn uniformly from {0, ..., 2 * padding}: a shift by (padding - y, padding - x) pixels, each in
  [-padding, padding], with the uncovered border filled.
- cutout: a size x size square whose top-left corner is drawn uniformly from {0, ..., H - size} x {0, ..., W - size}
  (so it always lies wholly inside the image) is filled, on every image.
"""

from __future__ import annotations

import torch


def _uniform_ints(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n integers drawn uniformly from {0, ..., high - 1}."""
    return torch.randint(0, high, (n,), generator=generator, device=device)


def flip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    n = images.shape[0]
    mirrored = torch.rand(n, generator=generator, device=images.device) < p
    return torch.where(mirrored.view(n, 1, 1, 1), images.flip(3), images)


def translate(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if padding == 0:
        return images.clone()
    n, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    y0 = _uniform_ints(2 * padding + 1, n, generator, device)
    x0 = _uniform_ints(2 * padding + 1, n, generator, device)
    rows = (y0.view(n, 1) + torch.arange(h, device=device)).view(n, 1, h, 1)
    cols = (x0.view(n, 1) + torch.arange(w, device=device)).view(n, 1, 1, w)
    samples = torch.arange(n, device=device).view(n, 1, 1, 1)
    channels = torch.arange(c, device=device).view(1, c, 1, 1)
    # One gather: out[i, ch, y, x] = padded[i, ch, y0[i] + y, x0[i] + x].
    return padded[samples, channels, rows, cols]


def cutout(images: torch.Tensor, size: int, generator: torch.Generator | None = None, fill: float = 0) -> torch.Tensor:
    n, _, h, w = images.shape
    if size == 0:
        return images.clone()
    if size > min(h, w):
        raise ValueError(f"cutout size {size} is larger than the {h}x{w} images")
    device = images.device
    y0 = _uniform_ints(h - size + 1, n, generator, device).view(n, 1)
    x0 = _uniform_ints(w - size + 1, n, generator, device).view(n, 1)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (ys >= y0) & (ys < y0 + size)  # [n, h]
    in_cols = (xs >= x0) & (xs < x0 + size)  # [n, w]
    square = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
    return images.masked_fill(square, fill)


def augment(
    images: torch.Tensor,
    *,
    flip_p: float = 0.5,
    translate_px: int = 0,
    cutout_px: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """flip -> translate -> cutout, ffcv's pipeline order; 0 (or flip_p=0) disables a step."""
    if flip_p > 0:
        images = flip(images, generator, flip_p)
    if translate_px > 0:
        images = translate(images, translate_px, generator)
    if cutout_px > 0:
        images = cutout(images, cutout_px, generator)
    return images
