"""`fasttrain eval RUN_DIR|CHECKPOINT` on a real finished run: it reproduces the run's own accuracies exactly, and a
missing, damaged or foreign weights file is one line and exit 2."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from fasttrain.eval import main as eval_main


@pytest.fixture(scope="module")
def finished(one_epoch_run, tmp_path_factory):
    """The session's finished one-epoch run, copied: eval writes its eval-tta*.json into the run directory."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(one_epoch_run, run_dir)
    return run_dir


def test_eval_of_the_run_reproduces_its_final_accuracies_exactly(finished):
    summary = json.loads((finished / "summary.json").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "fasttrain", "eval", str(finished), "--tta-level", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads((finished / "eval-tta0.json").read_text())
    assert plain["acc"] == summary["val_acc"] and plain["count"] == 1000 and "test accuracy" in proc.stdout
    assert eval_main([str(finished)]) == 0  # the run's own TTA level (1)
    assert json.loads((finished / "eval-tta1.json").read_text())["acc"] == summary["tta_acc"]


def test_eval_of_the_last_checkpoint_gives_the_final_accuracy(finished):
    last = sorted((finished / "checkpoints").glob("ckpt-*"))[-1]
    assert eval_main([str(last), "--tta-level", "0"]) == 0
    summary = json.loads((finished / "summary.json").read_text())
    assert json.loads((last / "eval-tta0.json").read_text())["acc"] == summary["val_acc"]


def _copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    return copy


def _refused(argv, capfd) -> str:
    assert eval_main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_missing_weights_file_is_named(finished, tmp_path, capfd):
    copy = _copy(finished, tmp_path)
    (copy / "model.safetensors").unlink()
    assert "model.safetensors is missing" in _refused([str(copy)], capfd)


def test_a_truncated_weights_file_is_named(finished, tmp_path, capfd):
    copy = _copy(finished, tmp_path)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "damaged or truncated" in _refused([str(copy)], capfd)


def test_weights_of_another_model_are_named(finished, tmp_path, capfd):
    copy = _copy(finished, tmp_path)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"].update(widths=[16, 32], blocks=[1, 1])  # the file holds an 8-16 net
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert "weights of another model" in _refused([str(copy)], capfd)


def test_a_directory_that_is_neither_is_named(tmp_path, capfd):
    assert "neither a run directory" in _refused([str(tmp_path)], capfd)


@pytest.mark.parametrize(
    "name,content",
    [
        ("config.yaml", b""),
        ("config.yaml", b"- model\n"),
        ("config.yaml", b"model: 5\n"),
        ("config.yaml", b"\xff\xfe"),
        ("meta.json", b'{"config": [1]}'),
        ("meta.json", b'{"config": null}'),
        ("meta.json", b"[1]"),
    ],
)
def test_a_damaged_saved_config_is_named(finished, tmp_path, capfd, name, content):
    copy = _copy(finished, tmp_path)
    (copy / name).write_bytes(content)
    err = _refused([str(copy)], capfd)
    # A meta.json makes the folder a checkpoint, checked whole first (as the trainer checks one before resuming).
    assert (f"{copy} is damaged (meta.json " if name == "meta.json" else f"{copy / name} is damaged") in err


def test_an_unknown_key_in_the_run_config_names_the_file(finished, tmp_path, capfd):
    copy = _copy(finished, tmp_path)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["train"]["old_key"] = 1
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    err = _refused([str(copy)], capfd)
    assert f"{copy / 'config.yaml'}: unknown key 'train.old_key'" in err


def test_a_relative_data_dir_missing_here_names_evals_own_option(finished, tmp_path, capfd, monkeypatch):
    copy = _copy(finished, tmp_path)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["dir"] = "data/slice"  # relative to where the run was trained, not to where eval runs
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    err = _refused([str(copy)], capfd)
    assert "no data set at data/slice" in err and "--data-dir" in err and "--data.source" not in err


def test_a_checkpoint_whose_weights_fail_their_recorded_sha256_is_refused(finished, tmp_path, capfd):
    last = sorted((finished / "checkpoints").glob("ckpt-*"))[-1]
    copy = tmp_path / last.name
    shutil.copytree(last, copy, ignore=shutil.ignore_patterns("eval-tta*.json"))  # what earlier tests wrote there
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside a tensor: the file still loads, its numbers are wrong
    weights.write_bytes(bytes(data))
    err = _refused([str(copy)], capfd)
    assert f"{copy} is damaged (model.safetensors" in err and "sha256" in err
    assert not list(copy.glob("eval-tta*.json"))


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_batch_size_below_one_is_refused(finished, capfd, size):
    assert f"--batch-size must be >= 1, got {size}" in _refused([str(finished), "--batch-size", size], capfd)


def test_an_unwritable_result_file_is_named_after_the_accuracy_is_printed(finished, tmp_path, capfd):
    copy = _copy(finished, tmp_path)
    (copy / "eval-tta0.json").unlink(missing_ok=True)
    (copy / "eval-tta0.json").mkdir()  # the result cannot be moved into place, as on a read-only disk, even for root
    assert eval_main([str(copy), "--tta-level", "0"]) == 2
    captured = capfd.readouterr()
    summary = json.loads((finished / "summary.json").read_text())
    assert f"test accuracy {summary['val_acc']:.4f}" in captured.out
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert f"cannot write {copy / 'eval-tta0.json'}" in captured.err
