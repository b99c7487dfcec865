"""A verified .beton's decoded samples, kept beside its manifest for the resident mode's next start.

Reading a split through ffcv costs a process several seconds that do not depend on the data set's size (importing
ffcv compiles numba code; the Loader compiles its pipeline). The resident mode reads every sample once anyway, so
it keeps them: `decoded/<split>-<sha256 prefix>.npz` in the data directory (uint8 NHWC images, int64 labels;
150 MB for CIFAR-10's training split). The name holds the sha256 that `manifest.verify` has just checked, so a
changed .beton never meets a stale copy (writing a new copy removes the old ones). A directory fasttrain cannot
write to only loses the speed-up; a damaged copy is decoded again.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fasttrain.data.manifest import MANIFEST_NAME, read_manifest
from fasttrain.files import replacing

DECODED_DIR = "decoded"


def decoded_path(data_dir: Path | str, split: str) -> Path | None:
    """Where `split`'s decoded copy belongs; None for a directory without a manifest (nothing to key it on)."""
    data_dir = Path(data_dir)
    if not (data_dir / MANIFEST_NAME).is_file():
        return None
    sha256 = read_manifest(data_dir)["splits"].get(split, {}).get("sha256")
    return data_dir / DECODED_DIR / f"{split}-{sha256[:16]}.npz" if sha256 else None


def read_split(data_dir: Path | str, split: str, read_beton) -> tuple[torch.Tensor, torch.Tensor]:
    """`split`'s samples as `read_beton()` gives them (uint8 [N,3,H,W] in channels-last memory, int64 [N]): from
    the decoded copy when there is a good one, else from `read_beton()`, then kept for the next start."""
    path = decoded_path(data_dir, split)
    if path is not None and path.is_file():
        try:
            with np.load(path) as stored:
                images, labels = stored["images"], stored["labels"]
            if images.ndim == 4 and len(images) == len(labels):
                return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged: decode again and replace it
    images, labels = read_beton()
    if path is not None:
        try:
            with replacing(path) as temp, open(temp, "wb") as f:
                np.savez(f, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
            for stale in path.parent.glob(f"{split}-*.npz"):  # copies of the split's earlier contents
                if stale != path:
                    stale.unlink(missing_ok=True)
        except OSError:
            pass  # read-only or full: the next start decodes again
    return images, labels
