"""`fasttrain eval RUN_DIR|CHECKPOINT [--tta-level N] [--data-dir DIR]`: the test accuracy of a finished run's
final weights (RUN_DIR/model.safetensors) or of a checkpoint, printed and written to eval-tta<N>.json beside them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from fasttrain import models
from fasttrain.config import Config, build_config
from fasttrain.errors import EXIT_OK, ConfigError, exit_process, run_command
from fasttrain.files import read_json, write_json

WEIGHTS = "model.safetensors"


def saved_config(target: Path) -> dict:
    """The configuration a run directory (config.yaml) or a checkpoint (meta.json) was trained with."""
    if (target / "meta.json").is_file():
        try:
            return read_json(target / "meta.json")["config"]
        except (ValueError, KeyError):
            raise ConfigError(f"{target / 'meta.json'} is damaged (no configuration in it)") from None
    if (target / "config.yaml").is_file():
        try:
            return yaml.safe_load((target / "config.yaml").read_text())
        except yaml.YAMLError:
            raise ConfigError(f"{target / 'config.yaml'} is not valid YAML") from None
    raise ConfigError(f"{target} is neither a run directory (config.yaml) nor a checkpoint (meta.json)")


def config_for(saved: dict, overrides: list[tuple[str, str, str]]) -> Config:
    """A Config from a saved one (as written by Config.to_dict), with command-line overrides."""
    flat = [(section, key, value) for section, values in saved.items() for key, value in (values or {}).items()]
    flat = [(s, k, v) for s, k, v in flat if s != "param_groups"]  # optimiser settings do not matter here
    flat.sort(key=lambda item: item[:2] != ("model", "name"))  # the model first: naming it resets its arguments
    return build_config(None, [*flat, *overrides])


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


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fasttrain eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run directory (with model.safetensors) or a checkpoint directory")
    parser.add_argument("--tta-level", type=int, choices=[0, 1, 2], default=None, help="default: the run's")
    # --data.dir, the trainer's spelling of the same setting, is accepted too.
    parser.add_argument(
        "--data-dir", "--data.dir", dest="data_dir", default=None, help="default: the run's data directory"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch size")
    args = parser.parse_args(argv)

    from fasttrain.data.loaders import build_loaders
    from fasttrain.data.manifest import verify
    from fasttrain.data.prepare import data_dir_for
    from fasttrain.loop.evaluate import evaluate
    from fasttrain.loop.resolve import make_accelerator, resolve

    target = Path(args.target)
    overrides = [("run", "resume", "no"), ("run", "repeats", "1")]
    if args.data_dir:
        overrides.append(("data", "dir", args.data_dir))
    if args.batch_size:
        overrides.append(("data", "eval_batch_size", str(args.batch_size)))
    cfg = config_for(saved_config(target), overrides)
    level = cfg.train.tta_level if args.tta_level is None else args.tta_level
    model = models.create(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    load_weights(model, target / WEIGHTS)

    accelerator, _ = make_accelerator(cfg)
    plan = resolve(cfg, accelerator)
    data_dir = data_dir_for(cfg.data)
    verify(data_dir)
    _, eval_loader = build_loaders(
        data_dir, mode="resident", batch_size=1, eval_batch_size=cfg.data.eval_batch_size, workers=plan.workers,
        device=accelerator.device, channels_last=plan.channels_last,
    )  # fmt: skip
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device).eval()
    result = evaluate(model, eval_loader, accelerator, tta_level=level)
    report = {"target": str(target), "tta_level": level, "acc": result["acc"], "loss": result["loss"],
              "count": result["count"], "model": cfg.model["name"], "data_dir": str(data_dir),
              "mixed_precision": plan.mixed_precision, "device": plan.device_name}  # fmt: skip
    write_json(target / f"eval-tta{level}.json", report)
    print(f"{target}: test accuracy {result['acc']:.4f} (TTA level {level}, {result['count']} images), "
          f"loss {result['loss']:.4f}; written to {target / f'eval-tta{level}.json'}")  # fmt: skip
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_command("fasttrain eval", command, argv)


if __name__ == "__main__":
    exit_process(main())
