"""`fasttrain eval RUN_DIR|CHECKPOINT [--tta-level N] [--data-dir DIR]`: the test accuracy of a finished run's
final weights (RUN_DIR/model.safetensors) or of a checkpoint, printed and written to eval-tta<N>.json beside them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from fasttrain import models
from fasttrain.config import Config, build_config, is_sections
from fasttrain.errors import EXIT_OK, ConfigError, DatasetError, FasttrainError, exit_process, run_command
from fasttrain.files import read_json, write_json
from fasttrain.loop import checkpoint

WEIGHTS = "model.safetensors"


def saved_config_file(target: Path) -> Path:
    """Where the configuration a run directory (config.yaml) or a checkpoint (meta.json) was trained with is."""
    for name in ("meta.json", "config.yaml"):
        if (target / name).is_file():
            return target / name
    raise ConfigError(f"{target} is neither a run directory (config.yaml) nor a checkpoint (meta.json)")


def _damaged(path: Path, problem: str, damaged: Path | None = None) -> ConfigError:
    """`damaged` (default: `path`, the config file) is damaged: a checkpoint that fails validation names itself."""
    instead = "the run directory or another checkpoint" if path.name == "meta.json" else "one of its checkpoints/ckpt-*"
    return ConfigError(f"{damaged or path} is damaged ({problem}); restore it, or evaluate {instead} instead")


def _read_config_file(path: Path) -> object:
    try:
        if path.suffix == ".json":
            return read_json(path)["config"]
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, "not UTF-8 text") from None
    except (ValueError, yaml.YAMLError):
        raise _damaged(path, "not valid JSON" if path.suffix == ".json" else "not valid YAML") from None
    except (KeyError, TypeError):
        raise _damaged(path, "no configuration in it") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror})") from None


def saved_config(path: Path) -> dict:
    """The configuration in `path` (see saved_config_file): sections of settings, as Config.to_dict writes them."""
    saved = _read_config_file(path)
    if not saved or not is_sections(saved):
        raise _damaged(path, "expected sections of settings, e.g. model: {name: ...}")
    return saved


def config_for(saved: dict, source: Path, overrides: list[tuple[str, str, str]]) -> Config:
    """A Config from a saved one (as written by Config.to_dict, read from `source`), with command-line overrides."""
    flat = [(section, key, value) for section, values in saved.items() for key, value in values.items()]
    flat = [(s, k, v) for s, k, v in flat if s != "param_groups"]  # optimiser settings do not matter here
    flat.sort(key=lambda item: item[:2] != ("model", "name"))  # the model first: naming it resets its arguments
    try:
        return build_config(None, [*flat, *overrides])
    except ConfigError as e:
        if any(str(e).startswith(f"{section}.{key}:") for section, key, _ in overrides):
            raise  # a command-line value (its messages start with its key)
        raise ConfigError(f"{source}: {e}") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"{path} is missing: a finished run writes it at its end (or point at a checkpoint)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); the file is damaged or truncated") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"{path} holds the weights of another model than its config describes") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fasttrain eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run directory (with model.safetensors) or a checkpoint directory")
    parser.add_argument("--tta-level", type=int, choices=[0, 1, 2], default=None, help="default: the run's")
    # --data.dir, the trainer's spelling of the same setting, is accepted too.
    parser.add_argument(
        "--data-dir", "--data.dir", dest="data_dir", default=None, help="default: the run's data directory"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch size")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def checked_data_dir(cfg: Config) -> Path:
    """The run's data set (or --data-dir's), verified. A relative data.dir is relative to the directory the
    trainer ran in, which need not be this one."""
    from fasttrain.data.manifest import verify
    from fasttrain.data.prepare import data_dir_for

    data_dir = data_dir_for(cfg.data)
    if not data_dir.is_dir():
        relative = "" if data_dir.is_absolute() else f" (relative to {Path.cwd()})"
        raise DatasetError(
            f"no data set at {data_dir}{relative}: pass --data-dir DIR, the converted data set the run was trained on"
        )
    verify(data_dir)
    return data_dir


def write_report(path: Path, report: dict) -> None:
    try:
        write_json(path, report)
    except OSError as e:
        raise FasttrainError(
            f"cannot write {path} ({e.strerror}); the accuracy printed above is not saved: make {path.parent} "
            "writable, or evaluate a copy of it"
        ) from None


def command(argv: list[str]) -> int:
    args = parse_args(argv)

    from fasttrain.data.loaders import build_loaders
    from fasttrain.loop.evaluate import evaluate
    from fasttrain.loop.resolve import make_accelerator, resolve

    target = Path(args.target)
    overrides = [("run", "resume", "no"), ("run", "repeats", "1")]
    if args.data_dir:
        overrides.append(("data", "dir", args.data_dir))
    if args.batch_size:
        overrides.append(("data", "eval_batch_size", str(args.batch_size)))
    config_file = saved_config_file(target)
    if config_file.name == "meta.json" and (reason := checkpoint.validate(target)) is not None:
        raise _damaged(config_file, reason, damaged=target)
    cfg = config_for(saved_config(config_file), config_file, overrides)
    level = cfg.train.tta_level if args.tta_level is None else args.tta_level
    model = models.create(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    load_weights(model, target / WEIGHTS)

    accelerator, _ = make_accelerator(cfg)
    plan = resolve(cfg, accelerator)
    data_dir = checked_data_dir(cfg)
    _, eval_loader = build_loaders(
        data_dir, mode="resident", batch_size=1, eval_batch_size=cfg.data.eval_batch_size, workers=plan.workers,
        device=accelerator.device, channels_last=plan.channels_last,
    )  # fmt: skip
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device).eval()
    result = evaluate(model, eval_loader, accelerator, tta_level=level)
    # Printed before the file is written, so a write that fails loses nothing.
    print(f"{target}: test accuracy {result['acc']:.4f} (TTA level {level}, {result['count']} images), "
          f"loss {result['loss']:.4f}", flush=True)  # fmt: skip
    report = {"target": str(target), "tta_level": level, "acc": result["acc"], "loss": result["loss"],
              "count": result["count"], "model": cfg.model["name"], "data_dir": str(data_dir),
              "mixed_precision": plan.mixed_precision, "device": plan.device_name}  # fmt: skip
    report_path = target / f"eval-tta{level}.json"
    write_report(report_path, report)
    print(f"written to {report_path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_command("fasttrain eval", command, argv)


if __name__ == "__main__":
    exit_process(main())
