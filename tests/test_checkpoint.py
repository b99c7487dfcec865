"""Damaged checkpoints: recognised, skipped on resume, never deleted; real `Accelerator.save_state` files on CPU."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from fasttrain.errors import ConfigError
from fasttrain.loop import checkpoint
from fasttrain.loop.checkpoint import Progress

CONFIG = {"train": {"lr": 0.1, "epochs": 3}}


class TinyRun:
    """A Linear model, SGD with momentum and a LambdaLR prepared by a real CPU Accelerator, saved by `save()`."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.acc = Accelerator(cpu=True)
        model = torch.nn.Linear(8, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        self.model, self.optimizer, self.scheduler = self.acc.prepare(model, optimizer, scheduler)
        self.progress = Progress()
        self.acc.register_for_checkpointing(self.progress)

    def train_step(self) -> None:
        loss = self.model(torch.randn(16, 8)).square().mean()
        self.acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.progress.step += 1

    def save_at(self, root: Path, step: int, keep: int = 10) -> Path:
        while self.progress.step < step:
            self.train_step()
        self.progress.epoch = step // 10
        return checkpoint.save(self.acc, root, self.progress, CONFIG, keep=keep)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


@pytest.fixture
def run() -> TinyRun:
    return TinyRun()


def truncate_model(ckpt: Path, cut: int | None = None) -> str:
    """Cut `cut` bytes (default: half) off the end of model.safetensors."""
    path = ckpt / "model.safetensors"
    size = path.stat().st_size
    kept = size - cut if cut is not None else size // 2
    with open(path, "r+b") as f:
        f.truncate(kept)
    return f"model.safetensors is {kept:,} bytes, expected {size:,}"


def remove_optimizer(ckpt: Path) -> str:
    (ckpt / "optimizer.bin").unlink()
    return "optimizer.bin is missing"


def garble_meta(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text('{"complete": true, "ep')
    return "meta.json is not valid JSON"


def flip_optimizer_byte(ckpt: Path) -> str:
    path = ckpt / "optimizer.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "optimizer.bin is corrupt"


DAMAGES = [truncate_model, remove_optimizer, garble_meta, flip_optimizer_byte]


def test_meta_lists_every_file_with_its_size_and_sha256(run, tmp_path):
    ckpt = run.save_at(tmp_path, 10)
    listed = {e["path"]: e for e in json.loads((ckpt / "meta.json").read_text())["files"]}
    on_disk = {p.name: p for p in ckpt.iterdir() if p.name != "meta.json"}
    assert set(listed) == set(on_disk) >= {"model.safetensors", "optimizer.bin", "scheduler.bin"}
    for name, path in on_disk.items():
        assert listed[name]["size"] == path.stat().st_size
        assert listed[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint.validate(ckpt) is None


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_resume_skips_a_damaged_checkpoint_for_the_older_intact_one(run, tmp_path, damage):
    older = run.save_at(tmp_path, 10)
    weights_at_10 = run.weights()
    newer = run.save_at(tmp_path, 20)
    expected_reason = damage(newer)

    announced: list[str] = []
    found = checkpoint.find_resume(tmp_path, announced.append)

    assert found == older
    assert len(announced) == 1 and str(newer) in announced[0] and expected_reason in announced[0]
    assert expected_reason in checkpoint.validate(newer)
    assert newer.is_dir(), "a damaged checkpoint stays on disk"

    run.acc.load_state(str(found))
    assert run.progress.step == 10
    for name, value in run.weights().items():
        torch.testing.assert_close(value, weights_at_10[name], rtol=0, atol=0)


def test_all_damaged_is_a_config_error_naming_the_directory(run, tmp_path):
    ckpts = [run.save_at(tmp_path, 10), run.save_at(tmp_path, 20)]
    truncate_model(ckpts[0])
    garble_meta(ckpts[1])
    announced: list[str] = []
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))) as error:
        checkpoint.find_resume(tmp_path, announced.append)
    assert "another --run.dir" in str(error.value) and "\n" not in str(error.value)
    assert len(announced) == 2
    assert all(c.is_dir() for c in ckpts)


def test_no_checkpoints_means_none(tmp_path):
    assert checkpoint.find_resume(tmp_path / "absent", print) is None
    (tmp_path / ".tmp-ckpt-e0001-s0000010").mkdir()  # a crash leftover is not a checkpoint
    assert checkpoint.find_resume(tmp_path, print) is None


def test_pruning_counts_and_deletes_only_intact_checkpoints(run, tmp_path):
    s10, s20, s30 = (run.save_at(tmp_path, step) for step in (10, 20, 30))
    remove_optimizer(s10)
    flip_optimizer_byte(s30)
    s40 = run.save_at(tmp_path, 40, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [s10.name, s30.name, s40.name]
    assert checkpoint.find_resume(tmp_path, print) == s40


def test_a_checkpoint_without_file_list_is_validated_by_its_formats(run, tmp_path):
    ckpt = run.save_at(tmp_path, 10)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert checkpoint.validate(ckpt) is None

    flip_optimizer_byte(ckpt)  # no checksum recorded: the torch file's own CRC catches it
    assert checkpoint.validate(ckpt).startswith("optimizer.bin is corrupt")
    remove_optimizer(ckpt)
    assert checkpoint.validate(ckpt) == "optimizer.bin is missing"


def test_a_truncated_model_without_file_list_is_caught_by_the_safetensors_header(run, tmp_path):
    ckpt = run.save_at(tmp_path, 10)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    reason = truncate_model(ckpt, cut=4)  # the last float's bytes: the header is intact and says more should follow
    assert checkpoint.validate(ckpt) == reason
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(20)
    assert checkpoint.validate(ckpt) == "model.safetensors is 20 bytes, too short for its header"


def test_an_explicit_damaged_checkpoint_is_a_config_error_with_the_reason(run, tmp_path):
    ckpt = run.save_at(tmp_path, 10)
    checkpoint.check_explicit(ckpt)
    reason = truncate_model(ckpt)
    with pytest.raises(ConfigError, match=re.escape(reason)):
        checkpoint.check_explicit(ckpt)
    with pytest.raises(ConfigError, match="meta.json is missing; name another checkpoint"):
        checkpoint.check_explicit(tmp_path)
    intact = run.save_at(tmp_path / "run" / "checkpoints", 20)
    with pytest.raises(ConfigError, match=re.escape(f"it holds checkpoints: name one, e.g. {intact} (the newest")):
        checkpoint.check_explicit(tmp_path / "run" / "checkpoints")
    with pytest.raises(ConfigError, match=re.escape(f"--resume auto --run.dir {tmp_path / 'run'}, or name a")):
        checkpoint.check_explicit(tmp_path / "run")


def test_list_checkpoints_still_lists_complete_ones_oldest_first(run, tmp_path):
    s10, s20, s30 = (run.save_at(tmp_path, step) for step in (10, 20, 30))
    (s20 / "meta.json").write_text("[1, 2]")  # valid JSON, not a meta
    assert checkpoint.list_checkpoints(tmp_path) == [s10, s30]
    assert checkpoint.validate(s20) == "meta.json does not mark the checkpoint complete"


def test_saving_over_a_damaged_checkpoint_of_the_same_step_sets_it_aside(run, tmp_path):
    s10 = run.save_at(tmp_path, 10)
    damaged = run.save_at(tmp_path, 20)
    reason = truncate_model(damaged)
    assert checkpoint.find_resume(tmp_path, print) == s10
    run.acc.load_state(str(s10))
    resaved = run.save_at(tmp_path, 20)  # training from step 10 reaches step 20 again

    assert resaved == damaged and checkpoint.validate(resaved) is None
    aside = tmp_path / f"damaged-{damaged.name}"
    assert checkpoint.validate(aside) == reason, "the damaged checkpoint is kept, as it was"
    assert checkpoint.checkpoint_dirs(tmp_path) == [s10, resaved]

    run.save_at(tmp_path, 20)  # an intact checkpoint of the same step (interrupt right after an epoch-end save)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([s10.name, resaved.name, aside.name])


def test_former_model_and_mode_names_are_not_differences():
    saved = {"model": {"name": "resnet9"}, "data": {"mode": "gpu"}, "train": {"lr": 0.5}}
    same = {"model": {"name": "resnet9_myrtle"}, "data": {"mode": "resident"}, "train": {"lr": 0.5}}
    assert checkpoint.config_differences(saved, same) == []
    other = {"model": {"name": "resnet9_ffcv"}, "data": {"mode": "stream"}, "train": {"lr": 0.5}}
    assert checkpoint.config_differences(saved, other) == [
        "data.mode: 'resident' -> 'stream'",
        "model.name: 'resnet9_myrtle' -> 'resnet9_ffcv'",
    ]


def test_a_checkpoint_of_other_settings_is_refused_in_one_line_and_force_cannot_change_the_optimiser(tmp_path):
    ckpt = tmp_path / "ckpt-e0001-s0000010"
    ckpt.mkdir()
    saved = {"train": {"lr": 0.2, "optimizer": "sgd", "batch_size": 100, "epochs": 1}, "model": {"widths": [8, 16]}}
    (ckpt / "meta.json").write_text(json.dumps({"complete": True, "epoch": 1, "step": 10, "world_size": 1,
                                                "config": saved}))  # fmt: skip
    same = json.loads(json.dumps(saved))
    assert checkpoint.check_compatible(ckpt, same, 1, force=False, explicit=False) == []
    now = {**same, "train": {**same["train"], "lr": 0.3, "epochs": 3}, "model": {"widths": [8, 32]}}
    with pytest.raises(ConfigError) as refused:
        checkpoint.check_compatible(ckpt, now, 2, force=False, explicit=False)
    assert str(refused.value).count("\n") == 0 and "pass --resume force to load it anyway" in str(refused.value)
    assert "(model.widths: [8, 16] -> [8, 32]; train.epochs: 1 -> 3; train.lr: 0.2 -> 0.3; processes: 1 -> 2" in str(
        refused.value
    )
    assert checkpoint.check_compatible(ckpt, now, 2, force=True, explicit=False)[-1].startswith("processes: 1 -> 2")
    for key, value in (("optimizer", "adamw"), ("batch_size", 50)):
        changed = {**now, "train": {**now["train"], key: value}}
        with pytest.raises(ConfigError, match=rf"--resume force cannot change train\.{key}: .* set them as they were"):
            checkpoint.check_compatible(ckpt, changed, 1, force=True, explicit=False)
    grouped = {**now, "param_groups": {"head": {"optimizer": "muon"}}}
    with pytest.raises(ConfigError, match=r"cannot change param_groups\.head\.optimizer: '<unset>' -> 'muon'"):
        checkpoint.check_compatible(ckpt, grouped, 1, force=True, explicit=False)


def test_a_checkpoint_whose_saved_config_is_not_sections_of_settings_is_damaged(tmp_path):
    ckpt = tmp_path / "ckpt-e0001-s0000010"
    ckpt.mkdir()
    for config, reason in (({"model": "deepcnn"}, "no valid 'config' (expected sections"), ([], "no valid 'config'")):
        (ckpt / "meta.json").write_text(json.dumps({"complete": True, "epoch": 1, "step": 10, "config": config}))
        assert reason in checkpoint.validate(ckpt)
