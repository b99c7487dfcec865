"""Loaders: both modes yield the same images in the same order, augment with ffcv's distributions, keep the promised
format, and shard exactly over two processes.

The data set is made for inspection: image i has channel 0 = 8y + 4 and channel 1 = 8x + 4 at pixel (y, x) (never
0, so filled pixels show), channel 2 = i % 250 + 1, and label i. From any augmented output one can read back
where each pixel came from, hence the flip, the shift and the cutout square. The mean fill colour (125, 122, 113)
is no pixel of these images either (125 and 122 are not 8k + 4), so it shows too.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, pattern_images

from fasttrain.data.augment import FILL_COLOURS, Augmentation, Augmenter, augment
from fasttrain.data.loaders import build_train_eval_loader
from fasttrain.data.normalize import denormalize
from fasttrain.errors import ConfigError, DatasetError

N_TRAIN, N_TEST = 96, 21  # N_TEST odd: two ranks share it unevenly
BATCH = 32
EPOCHS_FOR_STATS = 6  # 576 augmented samples per configuration
BLACK, MEAN = FILL_COLOURS["zero"], FILL_COLOURS["mean"]


_WRITE_BETONS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from helpers import pattern_images
from fasttrain.data.ffcv_compat import DatasetWriter, IntField, RGBImageField

class Indexed:
    def __init__(self, n): self.images = pattern_images(np.arange(n))
    def __len__(self): return len(self.images)
    def __getitem__(self, i): return self.images[i], i

for name, n in (("train", int(sys.argv[3])), ("test", int(sys.argv[4]))):
    fields = {"image": RGBImageField(), "label": IntField()}
    writer = DatasetWriter(f"{sys.argv[1]}/{name}.beton", fields, num_workers=1)
    writer.from_indexed_dataset(Indexed(n))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A test-only data directory whose label is the sample index, written in a subprocess (DatasetWriter forks)."""
    out = tmp_path_factory.mktemp("indexed")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-c", _WRITE_BETONS, str(out), str(Path(__file__).parent), str(N_TRAIN), str(N_TEST)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def loaders(data_dir):
    """build_loaders with small batches and one worker (numba compiles serial code faster), cached per options."""
    from fasttrain.data.loaders import build_loaders

    cache = {}

    def get(mode: str, **options):
        key = (mode, tuple(sorted(options.items())))
        if key not in cache:
            kwargs = dict(batch_size=BATCH, eval_batch_size=8, workers=1, device="cpu", seed=0) | options
            cache[key] = build_loaders(data_dir, mode=mode, **kwargs)
        return cache[key]

    return get


# ---- reading back what augmentation did ----


def filled(image: np.ndarray, colour: tuple[int, int, int] = BLACK) -> np.ndarray:
    """[H, W] bool: pixels of exactly that colour."""
    return (image == np.asarray(colour, dtype=np.uint8)).all(axis=2)


def geometry(image: np.ndarray, index: int, fills=(BLACK,)) -> tuple[bool, int, int]:
    """(flipped, shift_y, shift_x) of an HWC uint8 output; asserts that every unfilled pixel agrees with them."""
    visible = ~np.logical_or.reduce([filled(image, colour) for colour in fills])
    ys, xs = np.nonzero(visible)
    src_y, src_x = (image[ys, xs, 0].astype(int) - 4) // 8, (image[ys, xs, 1].astype(int) - 4) // 8
    assert (image[ys, xs, 2] == index % 250 + 1).all(), "pixels of another image"
    shift_y = np.unique(ys - src_y)
    assert len(shift_y) == 1, "rows moved by different amounts"
    if len(np.unique(xs - src_x)) == 1:
        return False, int(shift_y[0]), int((xs - src_x)[0])
    mirrored = np.unique(xs - (31 - src_x))
    assert len(mirrored) == 1, "columns are neither shifted nor mirrored-and-shifted consistently"
    return True, int(shift_y[0]), int(mirrored[0])


def fill_outside_source(shift_y: int, shift_x: int) -> np.ndarray:
    """Pixels a translation by (shift_y, shift_x) leaves uncovered."""
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return ((y - shift_y) < 0) | ((y - shift_y) >= 32) | ((x - shift_x) < 0) | ((x - shift_x) >= 32)


def cutout_square(image: np.ndarray, band: np.ndarray, size: int, colour=BLACK) -> tuple[int, int] | None:
    """Top-left corner of the filled square outside `band`; asserts it fits in a size x size square in the image."""
    holes = filled(image, colour) & ~band
    if not holes.any():
        return None
    ys, xs = np.nonzero(holes)
    assert ys.max() - ys.min() < size and xs.max() - xs.min() < size, "filled area larger than the cutout square"
    return int(ys.min()), int(xs.min())


def epochs_of(loader, epochs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HWC uint8 images, labels) of `epochs` epochs, checking the promised batch format on the way."""
    out = []
    for _ in range(epochs):
        for images, labels in loader:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert labels.dtype == torch.int64 and labels.shape == images.shape[:1]
            out.append((denormalize(images).permute(0, 2, 3, 1).numpy(), labels.numpy().copy()))
    return out


def samples(batches) -> list[tuple[np.ndarray, int]]:
    return [(img, int(lab)) for images, labels in batches for img, lab in zip(images, labels)]


# ---- order, pixels, format ----


def eval_batches(evaluation) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(denormalize(x).permute(0, 2, 3, 1).numpy(), y.numpy().copy(), v.numpy().copy()) for x, y, v in evaluation]


def test_both_modes_read_the_same_images_in_the_same_order(loaders):
    orders = {}
    for mode in ("stream", "resident"):
        train, evaluation = loaders(mode, augment=False, drop_last=False)
        assert len(train) == N_TRAIN // BATCH and train.num_samples == N_TRAIN and train.dataset_size == N_TRAIN
        assert train.epoch == 0
        epochs = [samples(epochs_of(train, 1)) for _ in range(2)]
        assert train.epoch == 2
        for epoch in epochs:
            assert sorted(label for _, label in epoch) == list(range(N_TRAIN))
            for image, label in epoch:
                np.testing.assert_array_equal(image, pattern_images(np.array([label]))[0])
        train.epoch = 1  # resuming replays that epoch's order
        assert [label for _, label in samples(epochs_of(train, 1))] == [label for _, label in epochs[1]]
        orders[mode] = [[label for _, label in epoch] for epoch in epochs]
        assert orders[mode][0] != orders[mode][1]

        got = eval_batches(evaluation)
        assert [len(g[1]) for g in got] == [8, 8, 8] and evaluation.batch_size == 8  # the last batch is padded
        valid = np.concatenate([g[2] for g in got])
        np.testing.assert_array_equal(valid, np.arange(24) < N_TEST)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got])[valid], np.arange(N_TEST))
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got])[valid], pattern_images(np.arange(N_TEST)))
        assert evaluation.num_samples == N_TEST and evaluation.num_yielded == 24 and len(evaluation) == 3
    assert orders["stream"] == orders["resident"]


@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_eval_batch_size_is_capped_by_the_shard(loaders, mode):
    _, evaluation = loaders(mode, augment=False, eval_batch_size=64)
    got = eval_batches(evaluation)
    assert evaluation.batch_size == N_TEST and evaluation.num_yielded == N_TEST and len(got) == len(evaluation) == 1
    assert got[0][2].all() and len(got[0][1]) == N_TEST


def test_mode_names_and_their_former_names():
    from fasttrain.data.loaders import canonical_mode

    assert [canonical_mode(m) for m in ("resident", "gpu", "stream", "ffcv")] == ["resident"] * 2 + ["stream"] * 2
    with pytest.raises(ConfigError, match="'tpu' is unknown; choose one of resident, stream, gpu, ffcv"):
        canonical_mode("tpu")


def test_drop_last_keeps_whole_batches(loaders):
    for mode in ("stream", "resident"):
        train, _ = loaders(mode, augment=False, batch_size=40, drop_last=True)
        assert len(train) == 2 and train.num_samples == 80
        assert [len(y) for _, y in train] == [40, 40]


@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_contiguous_format_when_channels_last_is_off(loaders, mode):
    train, evaluation = loaders(mode, augment=False, channels_last=False)
    images, _, _ = next(iter(evaluation))
    assert images.is_contiguous() and not images.is_contiguous(memory_format=torch.channels_last)
    images, _ = next(iter(train))
    assert images.is_contiguous() and not images.is_contiguous(memory_format=torch.channels_last)


def test_building_and_iterating_keeps_torch_threads(loaders):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train, _ = loaders("stream", augment=False, workers=1, batch_size=16)
        for _ in train:
            pass
        assert torch.get_num_threads() == 2, "ffcv's Loader(num_workers=1) changed torch's thread count"
    finally:
        torch.set_num_threads(threads)


def test_leaving_an_ffcv_epoch_early_stops_its_thread(loaders):
    train, _ = loaders("stream", augment=False, batch_size=4)  # 24 batches: more than ffcv prepares ahead
    threads = threading.active_count()
    batches = iter(train)
    next(batches)
    time.sleep(0.5)
    assert threading.active_count() == threads + 1  # ffcv's EpochIterator thread, blocked on its full queue
    del batches
    gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads


@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_warm_up_leaves_the_epoch_alone(loaders, mode):
    train, _ = loaders(mode, augment=False, batch_size=4)
    train.epoch = 3
    threads = threading.active_count()
    seconds = train.warm_up()
    assert train.epoch == 3 and seconds > 0
    gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads, "warm_up left ffcv's epoch thread running"
    train.epoch = 3
    assert len([labels for _, labels in train]) == len(train) and train.epoch == 4


def test_an_epoch_after_a_resident_warm_up_is_the_epoch_without_one(loaders):
    """The warm-up augments a batch with a generator of its own and leaves the augmenter and the epoch counter alone:
    the next epoch's batches are those of a loader that was never warmed up."""
    warmed, _ = loaders("resident", batch_size=4)
    cold, _ = loaders("resident", batch_size=4, seed=0, workers=1)  # the same options, built apart
    assert warmed is not cold
    warmed.epoch = cold.epoch = 2
    warmed.warm_up()
    for (a, a_labels), (b, b_labels) in zip(warmed, cold, strict=True):
        assert torch.equal(a, b) and torch.equal(a_labels, b_labels)


@pytest.mark.parametrize("mode", ["stream", "resident"])
def test_train_eval_loader_reads_the_first_training_images_unaugmented(loaders, mode):
    train, _ = loaders(mode, flip=True, translate=2, cutout=8)
    options = dict(batch_size=8, world_size=2, channels_last=True)
    halves = [build_train_eval_loader(train, 20, rank=rank, **options) for rank in (0, 1)]
    for rank, half in enumerate(halves):  # each rank its share, the last batch padded and marked invalid
        got = eval_batches(half)
        assert half.batch_size == 8 and [len(g[1]) for g in got] == [8, 8]
        valid = np.concatenate([g[2] for g in got])
        np.testing.assert_array_equal(valid, np.arange(16) < 10)
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got])[valid], np.arange(rank, 20, 2))
        images = np.concatenate([g[0] for g in got])[valid]
        np.testing.assert_array_equal(images, pattern_images(np.arange(rank, 20, 2)))


def test_sample_images_are_the_first_images_of_the_file_in_both_modes(loaders):
    got = {}
    for mode in ("stream", "resident"):
        train, _ = loaders(mode, flip=True, translate=2, cutout=8)  # augmentation does not touch them
        images = train.sample_images(5)
        assert images.dtype == torch.float32 and images.shape == (5, 3, 32, 32)
        got[mode] = denormalize(images).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got[mode], pattern_images(np.arange(5)))
        with pytest.raises(ConfigError, match="asked for 97 sample images; the training split holds 96"):
            train.sample_images(N_TRAIN + 1)
    np.testing.assert_array_equal(got["stream"], got["resident"])


def test_bad_arguments(data_dir, tmp_path):
    from fasttrain.data.loaders import build_loaders

    def build(directory=data_dir, **options):
        return build_loaders(directory, batch_size=4, eval_batch_size=4, workers=1, device="cpu", **options)

    with pytest.raises(DatasetError, match="train.beton is missing.*fasttrain.data.convert"):
        build(tmp_path)
    with pytest.raises(ConfigError, match="mode"):
        build(mode="tpu")
    with pytest.raises(ConfigError, match="cutout"):
        build(cutout=40)
    with pytest.raises(ConfigError, match="data.translate_fill 'blue' is unknown; choose one of zero, mean, reflect"):
        build(mode="resident", translate_fill="blue")
    with pytest.raises(ConfigError, match="data.flip_mode 'sometimes' is unknown"):
        build(mode="resident", flip_mode="sometimes")
    for option, mode_name in (("flip_mode", "ffcv"), ("translate_fill", "stream")):
        value = {"flip_mode": "alternating", "translate_fill": "reflect"}[option]
        with pytest.raises(ConfigError, match=f"data.{option} {value} exists only .*: use --data.mode resident"):
            build(mode=mode_name, **{option: value})
    build(mode="stream", flip=False, flip_mode="alternating")  # the option does nothing without flips: allowed


# The stream loader shards only inside a process group; the resident loader shows the per-process share.
@pytest.mark.parametrize(("mode", "world_size"), [("resident", 2), ("stream", 1)])
def test_a_batch_larger_than_each_processs_share_is_refused(data_dir, mode, world_size):
    from fasttrain.data.loaders import build_loaders

    share = -(-N_TRAIN // world_size)
    options = dict(mode=mode, eval_batch_size=4, workers=1, device="cpu", world_size=world_size)
    options["distributed"] = world_size > 1
    with pytest.raises(ConfigError, match=f"batch size {share + 1} per process is larger than the {share} training"):
        build_loaders(data_dir, batch_size=share + 1, **options)
    if world_size > 1:  # a process's batch times the processes: what train.batch_size said
        with pytest.raises(ConfigError, match=f"the batch size is global: {(share + 1) * world_size}"):
            build_loaders(data_dir, batch_size=share + 1, **options)
    train, _ = build_loaders(data_dir, batch_size=share, **options)
    assert len(train) == 1
    train, _ = build_loaders(data_dir, batch_size=share + 1, drop_last=False, **options)
    assert len(train) == 1, "keeping the partial batch: one batch of the whole share"


def test_measure_loader(loaders):
    from fasttrain.data.throughput import measure_loader

    train, _ = loaders("resident", augment=False, drop_last=False)
    result = measure_loader(train, epochs=2)
    assert result["images_per_epoch"] == N_TRAIN and result["images_per_s"] > 0 and result["warmup_s"] > 0


def test_resident_steps_do_not_synchronise_with_the_host(loaders, monkeypatch):
    """Between batches the resident loader only slices and normalises: no call may bring a value to the host."""
    train, _ = loaders("resident", flip=True, translate=2, translate_fill="mean", cutout=8, cutout_fill="mean")
    batches = iter(train)  # the epoch's augmentation happens here, outside the steps

    def refuse(*args, **kwargs):
        raise AssertionError("host-device synchronisation in a training step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    steps = [labels.shape[0] for _, labels in batches]
    monkeypatch.undo()
    assert steps == [BATCH] * len(train)


# ---- augmentation: the torch ops ----


def pattern_batch(n: int = 256) -> torch.Tensor:
    return torch.from_numpy(pattern_images(np.arange(n))).permute(0, 3, 1, 2).contiguous()


def as_hwc(batch: torch.Tensor) -> np.ndarray:
    return batch.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_torch_flip_mirrors():
    batch, generator = pattern_batch(), torch.Generator().manual_seed(0)
    out = augment(batch, Augmentation(flip="random"), generator)
    mirrored = (out == batch.flip(3)).flatten(1).all(1)
    assert ((out == batch).flatten(1).all(1) ^ mirrored).all()
    assert 0.4 < mirrored.float().mean() < 0.6
    alternate = torch.arange(256) % 3 == 0
    out = augment(batch, Augmentation(flip="alternating"), mirrored=alternate)
    torch.testing.assert_close(out, torch.where(alternate.view(-1, 1, 1, 1), batch.flip(3), batch))


@pytest.mark.parametrize("padding", [1, 2, 4])
@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_torch_translate_shifts_within_bounds_and_fills(padding, fill):
    batch = pattern_batch(40 * (2 * padding + 1) ** 2)
    out = augment(batch, Augmentation(translate=padding, translate_fill=fill), torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    colour = FILL_COLOURS[fill]
    shifts = []
    for i, image in enumerate(as_hwc(out)):
        flipped, dy, dx = geometry(image, i, fills=(colour,))
        assert not flipped and abs(dy) <= padding and abs(dx) <= padding
        band = fill_outside_source(dy, dx)
        assert (filled(image, colour) == band).all(), "fill must be exactly the uncovered band"
        shifts.append((dy, dx))
    assert len(set(shifts)) == (2 * padding + 1) ** 2  # every shift occurs
    uniform_enough([dy for dy, _ in shifts], -padding, padding)
    uniform_enough([dx for _, dx in shifts], -padding, padding)


def reflect_geometry(image: np.ndarray, index: int, padding: int) -> tuple[bool, int, int]:
    """(flipped, shift_y, shift_x) of a reflect-translated output; asserts that the whole image, border included,
    is that window of the (flipped) source padded by numpy's "reflect" (= torch's), i.e. border pixels equal their
    mirror images across the source's edge."""
    source = pattern_images(np.array([index]))[0]
    matches = []
    for flipped in (False, True):
        padded = np.pad(
            source[:, ::-1] if flipped else source, ((padding, padding), (padding, padding), (0, 0)), "reflect"
        )
        for wy in range(2 * padding + 1):
            for wx in range(2 * padding + 1):
                if (padded[wy : wy + 32, wx : wx + 32] == image).all():
                    matches.append((flipped, padding - wy, padding - wx))
    assert len(matches) == 1, f"image {index} is no single reflect-padded window: {matches}"
    return matches[0]


def test_torch_reflect_translate_mirrors_the_border():
    batch = pattern_batch(500)
    out = augment(batch, Augmentation(flip="random", translate=2, translate_fill="reflect"), torch.Generator())
    geometries = [reflect_geometry(image, i, 2) for i, image in enumerate(as_hwc(out))]
    assert len(set(geometries)) == 50  # both flips, every shift
    uniform_enough([dy for _, dy, _ in geometries], -2, 2)
    uniform_enough([dx for _, _, dx in geometries], -2, 2)
    for image, (_, dy, dx) in zip(as_hwc(out), geometries):
        assert_border_mirrors_edge(image, dy, dx)


def assert_border_mirrors_edge(image: np.ndarray, dy: int, dx: int) -> None:
    """Each uncovered border row/column equals its mirror image across the source's edge row/column."""
    top, bottom, left, right = max(dy, 0), 31 + min(dy, 0), max(dx, 0), 31 + min(dx, 0)  # the source's edges
    for y in [*range(top), *range(bottom + 1, 32)]:
        edge = top if y < top else bottom
        np.testing.assert_array_equal(image[y], image[2 * edge - y])
    for x in [*range(left), *range(right + 1, 32)]:
        edge = left if x < left else right
        np.testing.assert_array_equal(image[:, x], image[:, 2 * edge - x])


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_torch_cutout_fills_exactly_one_square_inside(fill):
    batch = pattern_batch(2000)
    colour = FILL_COLOURS[fill]
    out = augment(batch, Augmentation(cutout=8, cutout_fill=fill), torch.Generator().manual_seed(0))
    corners = []
    for image in as_hwc(out):
        assert filled(image, colour).sum() == 64
        corner = cutout_square(image, np.zeros((32, 32), bool), 8, colour)
        assert corner is not None and min(corner) >= 0 and max(corner) <= 24
        corners.append(corner)
    uniform_enough([c[0] for c in corners], 0, 24)
    uniform_enough([c[1] for c in corners], 0, 24)


def test_torch_ops_are_seeded_and_independent_of_chunking():
    batch = pattern_batch(64)
    aug = Augmentation(flip="random", translate=2, translate_fill="mean", cutout=8)
    a, b = (augment(batch, aug, torch.Generator().manual_seed(3)) for _ in range(2))
    assert a.dtype == torch.uint8 and a.shape == batch.shape and a.device == batch.device
    torch.testing.assert_close(a, b)
    augmenter = Augmenter(aug, batch)
    draws = augmenter.draw(64, torch.Generator().manual_seed(3))
    index = torch.arange(64)
    chunks = [augmenter.apply(index[s : s + 24], draws.slice(s, s + 24)) for s in range(0, 64, 24)]
    torch.testing.assert_close(torch.cat(chunks), a)


# ---- augmentation: both loader modes, single steps and the full pipeline, same distributions ----

SINGLE_STEPS = {
    "flip": dict(flip=True, translate=0, cutout=0),
    "translate": dict(flip=False, translate=2, cutout=0),
    "translate-mean": dict(flip=False, translate=2, cutout=0, translate_fill="mean"),
    "cutout": dict(flip=False, translate=0, cutout=8),
    "cutout-mean": dict(flip=False, translate=0, cutout=8, cutout_fill="mean"),
}


def uniform_enough(values: list[int], low: int, high: int) -> None:
    """All of low..high occur, nothing else, and the counts pass a chi-square test of uniformity at 5 sigma (p about
    3e-7, so chance alone does not fail it). At ~23 samples a value, a cutout whose centre is drawn uniformly and the
    square clipped (corners 0 and 24 five times as likely) fails every time; a single value at half rate passes."""
    counts = np.bincount(np.asarray(values) - low, minlength=high - low + 1)
    assert min(values) == low and max(values) == high
    expected = len(values) / len(counts)
    assert expected >= 5, "too few samples for a chi-square test"
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    bound = df * (1 - 2 / (9 * df) + 5 * np.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty's chi-square quantile, z = 5
    assert chi2 < bound, (counts.tolist(), chi2, bound)


@pytest.mark.parametrize("mode", ["stream", "resident"])
@pytest.mark.parametrize("step", list(SINGLE_STEPS))
def test_single_augmentation_step(loaders, mode, step):
    options = SINGLE_STEPS[step]
    translate_colour = FILL_COLOURS[options.get("translate_fill", "zero")]
    cutout_colour = FILL_COLOURS[options.get("cutout_fill", "zero")]
    train, _ = loaders(mode, drop_last=False, **options)
    flips, shifts_y, shifts_x, corners_y, corners_x = [], [], [], [], []
    for image, index in samples(epochs_of(train, EPOCHS_FOR_STATS)):
        flipped, dy, dx = geometry(image, index, fills=(translate_colour, cutout_colour))
        band = fill_outside_source(dy, dx)
        assert (filled(image, translate_colour) | ~band).all()
        corner = cutout_square(image, band, 8, cutout_colour)
        flips.append(int(flipped))
        shifts_y.append(dy)
        shifts_x.append(dx)
        if step.startswith("cutout"):
            assert corner is not None and filled(image, cutout_colour).sum() == 64
            corners_y.append(corner[0])
            corners_x.append(corner[1])
        else:
            assert corner is None
    if step == "flip":
        assert 0.4 < np.mean(flips) < 0.6 and set(shifts_y) == set(shifts_x) == {0}
    elif step.startswith("translate"):
        assert not any(flips)
        uniform_enough(shifts_y, -2, 2)
        uniform_enough(shifts_x, -2, 2)
        assert len(set(zip(shifts_y, shifts_x))) == 25
    else:
        assert not any(flips) and set(shifts_y) == set(shifts_x) == {0}
        uniform_enough(corners_y, 0, 24)
        uniform_enough(corners_x, 0, 24)


@pytest.mark.parametrize("mode", ["stream", "resident"])
@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_full_pipeline(loaders, mode, fill):
    train, _ = loaders(mode, flip=True, translate=2, cutout=8, translate_fill=fill, cutout_fill=fill)
    colour = FILL_COLOURS[fill]
    flips, shifts = [], set()
    for image, index in samples(epochs_of(train, 2)):
        flipped, dy, dx = geometry(image, index, fills=(colour,))
        assert abs(dy) <= 2 and abs(dx) <= 2
        band = fill_outside_source(dy, dx)
        assert filled(image, colour)[band].all()
        # Cutout comes after translate, its 8x8 square inside the image: the band (at most 2 px on two sides) can
        # cover at most 2x8 + 2x8 - 2x2 = 28 of its 64 pixels.
        holes_outside_band = (filled(image, colour) & ~band).sum()
        assert 36 <= holes_outside_band <= 64
        assert cutout_square(image, band, 8, colour) is not None
        flips.append(flipped)
        shifts.add((dy, dx))
    assert 0.3 < np.mean(flips) < 0.7
    assert {dy for dy, _ in shifts} == {dx for _, dx in shifts} == set(range(-2, 3))


def test_resident_mode_augmentation_is_reproducible(loaders):
    train, _ = loaders("resident", flip=True, translate=2, cutout=8)
    train.epoch = 5
    first = epochs_of(train, 1)
    train.epoch = 5
    again = epochs_of(train, 1)
    for (a, la), (b, lb) in zip(first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_resident_reflect_translate(loaders):
    train, _ = loaders("resident", drop_last=False, flip=True, translate=2, translate_fill="reflect", cutout=0)
    got = samples(epochs_of(train, 3))
    geometries = [reflect_geometry(image, index, 2) for image, index in got]
    for (image, _), (_, dy, dx) in zip(got, geometries):
        assert_border_mirrors_edge(image, dy, dx)
    assert 0.4 < np.mean([flipped for flipped, _, _ in geometries]) < 0.6
    assert len({(dy, dx) for _, dy, dx in geometries}) == 25


def alternating_flips(train, epochs: int) -> list[dict[int, bool]]:
    """Per epoch: {image index: mirrored} of a loader with flips only."""
    return [{index: geometry(image, index)[0] for image, index in samples(epochs_of(train, 1))} for _ in range(epochs)]


def test_resident_alternating_flip_mirrors_each_image_every_other_epoch(loaders):
    train, _ = loaders("resident", drop_last=False, flip=True, flip_mode="alternating", translate=0, cutout=0)
    epochs = alternating_flips(train, 4)
    for epoch, following in zip(epochs, epochs[1:]):
        assert epoch.keys() == following.keys() == set(range(N_TRAIN))
        assert all(epoch[i] != following[i] for i in range(N_TRAIN)), "each image mirrored in exactly one of two"
    assert epochs[0] == epochs[2]
    assert 0.3 < np.mean(list(epochs[0].values())) < 0.7  # the bits are random, not all equal
    # the bits depend on the seed alone: another seed, other bits; every rank of a run, the same bits
    other_seed, _ = loaders(
        "resident", drop_last=False, flip=True, flip_mode="alternating", translate=0, cutout=0, seed=1
    )
    assert alternating_flips(other_seed, 1)[0] != epochs[0]
    mirrored_on_ranks = {}
    for rank in (0, 1):
        shard, _ = loaders(
            "resident",
            drop_last=False,
            flip=True,
            flip_mode="alternating",
            translate=0,
            cutout=0,
            distributed=True,
            rank=rank,
            world_size=2,
        )
        shard.epoch = 2
        mirrored_on_ranks |= alternating_flips(shard, 1)[0]
    assert mirrored_on_ranks == epochs[2]


# ---- two processes ----

_SHARDED = """
import json, sys
from accelerate import Accelerator
from accelerate.launchers import debug_launcher

def shard(data_dir, out_dir):
    import torch
    from fasttrain.data.loaders import build_loaders
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2 and torch.distributed.get_world_size() == 2, "not two processes"
    result = {}
    for mode in ("stream", "resident"):
        train, evaluation = build_loaders(data_dir, mode=mode, batch_size=16, eval_batch_size=4, workers=1,
                                          device="cpu", seed=7, distributed=True, rank=acc.process_index,
                                          world_size=2, augment=False, drop_last=False)
        epochs = [[y.tolist() for _, y in train] for _ in range(2)]
        batches = [(y.tolist(), v.tolist()) for _, y, v in evaluation]
        result[mode] = {"train": epochs, "train_len": len(train), "eval": batches,
                        "eval_num_samples": evaluation.num_samples, "eval_batch_size": evaluation.batch_size,
                        "sample_images": train.sample_images(3).sum().item()}
    with open(f"{out_dir}/rank{acc.process_index}.json", "w") as f:
        json.dump(result, f)

debug_launcher(lambda: shard(sys.argv[1], sys.argv[2]), num_processes=2)
"""


@pytest.mark.slow
def test_two_ranks_cover_every_sample_exactly_once(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(data_dir), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for mode in ("stream", "resident"):
        per_rank = [r[mode] for r in ranks]
        assert per_rank[0]["train_len"] == per_rank[1]["train_len"] == N_TRAIN // 2 // 16
        for epoch in range(2):
            shards = [sum(r["train"][epoch], []) for r in per_rank]
            assert len(shards[0]) == len(shards[1]) == N_TRAIN // 2
            assert sorted(shards[0] + shards[1]) == list(range(N_TRAIN)), f"{mode} epoch {epoch}"
        assert per_rank[0]["train"][0] != per_rank[0]["train"][1], "each epoch needs a new order"
        assert per_rank[0]["sample_images"] == per_rank[1]["sample_images"], "sample images differ between ranks"

        counted = []
        for r, rank in enumerate(per_rank):
            labels = sum((b[0] for b in rank["eval"]), [])
            valid = sum((b[1] for b in rank["eval"]), [])
            assert rank["eval_num_samples"] == len(range(r, N_TEST, 2)) == sum(valid)
            assert {len(b[0]) for b in rank["eval"]} == {rank["eval_batch_size"]} == {4}, "one eval batch shape"
            counted += [label for label, ok in zip(labels, valid) if ok]
        assert sorted(counted) == list(range(N_TEST)), f"{mode}: each test image must count exactly once"
    assert [r["stream"]["train"] for r in ranks] == [r["resident"]["train"] for r in ranks], "modes shard differently"


# ---- numba's compiles kept between processes ----

_ONE_STREAM_EPOCH = """
import json, sys
import numpy as np
from fasttrain.data.loaders import build_loaders
from fasttrain.data.normalize import denormalize
from numba.typed import typeddict

train, _ = build_loaders(sys.argv[1], mode="stream", batch_size=32, eval_batch_size=8, workers=int(sys.argv[4]),
                         device="cpu", translate=int(sys.argv[3]), cutout=0)
batches = [(denormalize(x).permute(0, 2, 3, 1).numpy(), y.numpy()) for x, y in train]
np.savez(sys.argv[2], images=np.concatenate([b[0] for b in batches]), labels=np.concatenate([b[1] for b in batches]))
hits = {name: sum(getattr(typeddict, name).stats.cache_hits.values()) for name in ("_make_dict", "_setitem")}
print(json.dumps(hits))
"""


@pytest.mark.slow
def test_a_later_process_loads_ffcvs_compiled_pipeline_from_numbas_cache(data_dir, tmp_path):
    """What ffcv's import and a stream loader compile is kept on disk (NUMBA_CACHE_DIR here): a second process reuses
    the typed Dict, the label decoder and the file reader unchanged, compiles a translate of other settings and a
    flip for 2 workers (numba's parallel loop) anew, and shifts by its own settings; a damaged cache only costs the
    compile, and is written afresh."""
    cache = tmp_path / "numba-cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_CACHE_DIR": str(cache)}

    def one_epoch(translate: int, workers: int = 1) -> tuple[dict[str, int], list[tuple[bool, int, int]]]:
        out = tmp_path / "epoch.npz"
        proc = subprocess.run(
            [sys.executable, "-c", _ONE_STREAM_EPOCH, str(data_dir), str(out), str(translate), str(workers)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        epoch = np.load(out)
        assert sorted(epoch["labels"].tolist()) == list(range(N_TRAIN)), "one epoch: every image once"
        shifts = [geometry(image, int(label)) for image, label in zip(epoch["images"], epoch["labels"])]
        return json.loads(proc.stdout.strip().splitlines()[-1]), shifts

    def entries(kind: str) -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in cache.rglob(f"*.{kind}")}

    def largest_shift(shifts) -> int:
        return max(max(abs(dy), abs(dx)) for _, dy, dx in shifts)

    _, shifts = one_epoch(translate=2)
    first = entries("nbc")
    for function in ("_make_dict", "_setitem", "RandomHorizontalFlip", "RandomTranslate", "compile_reader"):
        assert any(function in name for name in first), (function, sorted(first))
    assert largest_shift(shifts) <= 2

    hits, shifts = one_epoch(translate=4, workers=2)
    second = entries("nbc")
    new = [name for name in second if name not in first]
    assert hits["_make_dict"] >= 1 and hits["_setitem"] >= 1, hits
    assert {n: t for n, t in second.items() if n in first} == first, "a cached function was compiled again"
    assert not [n for n in new if "typeddict" in n or "BasicDecoder" in n or "compile_reader" in n], new
    assert [n for n in new if "RandomTranslate" in n], "translate 4 reused translate 2's code"
    if len(os.sched_getaffinity(0)) >= 2:  # else ffcv runs 1 worker: the same serial flip
        assert [n for n in new if "RandomHorizontalFlip" in n], "2 workers reused 1 worker's serial flip"
    assert 2 < largest_shift(shifts) <= 4

    for path in cache.rglob("*.nb?"):
        path.write_bytes(b"not numba's")
    _, shifts = one_epoch(translate=2)
    assert largest_shift(shifts) <= 2
    assert all(path.read_bytes() != b"not numba's" for path in cache.rglob("*.nbi")), "the damaged index stays"
