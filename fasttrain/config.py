"""The run configuration: typed sections, YAML recipes, `--section.key value` overrides, validation.

A run's configuration is built in three layers, each overriding the last:
  1. the defaults below: the resnet9 recipe's schedule and augmentation, but general-purpose where FFCV's example
     is particular (`recipe_changes("resnet9")` lists where: the model, resnet9_myrtle here; zero fills, not the
     mean colour; no weight decay on BatchNorm and biases; a checkpoint every epoch, not only at the end),
  2. a YAML recipe (`--config path/to/recipe.yaml`, or just `--config resnet9` for a recipe shipped in
     fasttrain/recipes/),
  3. command-line overrides, `--train.lr 0.4 --model.widths 32,64,128`.
Every key is checked against its section's type before any work starts; `model` keys are checked against the
chosen model's constructor signature (see fasttrain.models.describe).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from fasttrain.errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A config field with its one-line description (shown by --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunSection:
    name: str = opt("resnet9", "run name: run directories are runs/<name>-<UTC time>")
    dir: str | None = opt(None, "run directory (default runs/<name>-<UTC time>)")
    seed: int = opt(0, "seed of weights, data order and augmentation (the same on every rank)")
    resume: str = opt("no", "no | auto (newest valid checkpoint of run.dir) | force (ignore config changes) | DIR")
    repeats: int = opt(1, "train this many runs with seeds seed, seed+1, ...; report mean and std (compile once)")


@dataclass
class DataSection:
    source: str = opt("cifar10", "where CIFAR-10 comes from; converted into data.dir once")
    dir: str | None = opt(None, "converted data directory (default data/<source name>)")
    subset: int | None = opt(None, "keep the first N images of each split, stratified by class")
    mode: Literal["auto", "resident", "stream", "gpu", "ffcv"] = opt(
        "auto", "resident: data set on the device | stream: ffcv Loader | auto: resident on CUDA (gpu, ffcv: old names)"
    )
    workers: int = opt(8, "ffcv CPU threads; clamped to the CPUs this process may use")
    eval_batch_size: int = opt(1000, "evaluation batch per process (the last batch is padded: one shape)")
    flip: bool = opt(True, "mirror training images left-right")
    flip_mode: Literal["random", "alternating"] = opt(
        "random", "random: p=0.5 each time | alternating: airbench's, each image mirrored every other epoch"
    )
    translate: int = opt(2, "shift training images by up to N pixels per axis (0: off)")
    translate_fill: Literal["zero", "mean", "reflect"] = opt("zero", "what fills the uncovered border")
    cutout: int = opt(4, "erase one N x N square per training image (0: off)")
    cutout_fill: Literal["zero", "mean"] = opt("zero", "what fills the erased square")


@dataclass
class TrainSection:
    epochs: int = opt(24, "training epochs")
    batch_size: int = opt(512, "global batch, split evenly across processes")
    optimizer: Literal["sgd", "adamw", "muon"] = opt("sgd", "optimiser of every parameter not in a param_groups entry")
    lr: float = opt(0.5, "peak learning rate at lr_ref_batch ...")
    lr_ref_batch: int = opt(512, "... scaled to the global batch by lr_scaling")
    lr_scaling: Literal["none", "linear", "sqrt"] = opt("linear", "how the peak LR follows the global batch")
    schedule: Literal["triangular", "cosine", "constant"] = opt(
        "triangular", "LR shape: linear warm-up to lr_peak_epoch, then linear (triangular) or cosine decay to 0"
    )
    lr_peak_epoch: float = opt(5.0, "epoch at which the LR peaks (0: start at the peak)")
    momentum: float = opt(0.9, "SGD/Muon momentum, AdamW beta1")
    nesterov: bool = opt(False, "Nesterov momentum (sgd, muon)")
    weight_decay: float = opt(5e-4, "weight decay: L2 added to the gradient (sgd, muon), decoupled (adamw)")
    wd_on_bn_and_bias: bool = opt(False, "also decay BatchNorm parameters and biases")
    label_smoothing: float = opt(0.1, "label smoothing of the training loss")
    loss_reduction: Literal["mean", "sum"] = opt("mean", "training loss over the batch: mean, or sum (airbench)")
    grad_clip: float | None = opt(None, "clip the gradient norm to this")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "auto: the launcher's --mixed_precision if fp16/bf16, else bf16 on CUDA and fp32 on CPU"
    )
    channels_last: bool = opt(True, "channels-last memory format for model and images")
    compile: Literal["auto", "on", "off"] = opt("auto", "torch.compile the model (auto: on CUDA)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = opt(
        "default", "torch.compile mode"
    )
    tta_level: int = opt(1, "final evaluation: 0 plain, 1 + mirror, 2 + mirror and one-pixel shifts")
    target_acc: float | None = opt(None, "stop at the first evaluation reaching this accuracy (0..1)")
    eval_every: int = opt(1, "evaluate every N epochs (and after the last)")
    eval_train_images: int = opt(
        0, "also evaluate the first N training images, unaugmented, at each evaluation: the train accuracy that "
        "shows overfitting (0: off)"
    )  # fmt: skip
    log_every: int = opt(50, "optimizer steps between metrics rows (the only host syncs of the loop)")
    nonfinite: Literal["stop", "skip"] = opt(
        "stop", "on a NaN/Inf loss: stop (exit 3) or skip the step (syncs every step) up to max_skips"
    )
    max_skips: int = opt(20, "non-finite steps skipped before giving up")


@dataclass
class ParamGroup:
    """One entry of `param_groups`: parameters chosen by name patterns, with their own optimiser settings.
    Unset (None) settings take the `train` section's value."""

    params: tuple[str, ...] = opt((), "fnmatch patterns on model.named_parameters() names, e.g. *conv*.weight")
    optimizer: Literal["sgd", "adamw", "muon"] | None = opt(None, "this group's optimiser")
    lr: float | None = opt(None, "peak LR at train.lr_ref_batch, scaled as train.lr is")
    momentum: float | None = opt(None, "momentum (AdamW: beta1)")
    nesterov: bool | None = opt(None, "Nesterov momentum")
    weight_decay: float | None = opt(None, "weight decay")
    schedule: Literal["triangular", "cosine", "constant"] | None = opt(None, "LR shape")
    lr_peak_epoch: float | None = opt(None, "epoch of the LR peak")
    end_epoch: float | None = opt(None, "the schedule ends here: LR 0 from then on (parameters frozen)")


@dataclass
class CheckpointSection:
    every: int = opt(1, "checkpoint every N epochs; 0: only at the end")
    final: bool = opt(True, "checkpoint at the end of training")
    keep: int = opt(2, "valid checkpoints kept (older ones are deleted)")


@dataclass
class WandbSection:
    mode: Literal["auto", "online", "offline", "disabled"] = opt(
        "auto", "auto: WANDB_MODE if set, else online when logged in, else offline"
    )
    project: str | None = opt(None, "W&B project (default: WANDB_PROJECT, else fasttrain)")
    entity: str | None = opt(None, "W&B entity (default: WANDB_ENTITY)")
    name: str | None = opt(None, "W&B run name (default: WANDB_NAME, else the run directory's name)")
    tags: tuple[str, ...] = opt((), "comma-separated W&B tags (default: WANDB_TAGS)")
    group: str | None = opt(None, "W&B group (default: WANDB_RUN_GROUP)")
    job_type: str | None = opt(None, "W&B job type (default: WANDB_JOB_TYPE)")


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "wandb": WandbSection,
}
DEFAULT_MODEL = "resnet9_myrtle"


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: dict[str, Any] = field(default_factory=lambda: {"name": DEFAULT_MODEL})
    train: TrainSection = field(default_factory=TrainSection)
    param_groups: dict[str, ParamGroup] = field(default_factory=dict)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    wandb: WandbSection = field(default_factory=WandbSection)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["model"] = dict(self.model)
        out["param_groups"] = {name: dataclasses.asdict(group) for name, group in self.param_groups.items()}
        return {k: _plain(v) for k, v in out.items()}


def default_data_dir(source: str, subset: int | None) -> Path:
    """data/<name of the source> (+ -subset<N>), so different sources never share a directory."""
    name = Path(source.rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return Path("data") / (f"{name}-subset{subset}" if subset else name)


def _plain(value: Any) -> Any:
    """Tuples become lists so the dict round-trips through YAML and JSON unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- coercion of strings and YAML values to annotated types ---

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` (a command-line string or a YAML value) to `annotation`, or raise ConfigError naming `key`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # postponed annotations of this module
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {annotation}")
    if origin is Literal:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if text not in [str(a) for a in args]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return text
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        item_type = args[0] if args else str
        return tuple(
            coerce(f"{key}[{i}]", v.strip() if isinstance(v, str) else v, item_type) for i, v in enumerate(items)
        )
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.replace("_", ""))
        except (TypeError, ValueError):  # TypeError: a YAML null, list or mapping
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if value is None or isinstance(value, (dict, list)):  # None: a YAML key left empty
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        text = str(value)
        try:
            text.encode("utf-8")  # config.yaml, summary.json and W&B hold it as UTF-8 text
        except UnicodeEncodeError:
            raise ConfigError(f"{key}: {text!r} holds bytes that are not UTF-8 text; use a UTF-8 name") from None
        return text
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _unknown_key(section: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{section}.{key}'.{hint} Valid keys of '{section}': {', '.join(valid)}")


def _section_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set_group(cfg: Config, key: str, value: Any) -> None:
    """`param_groups.NAME.FIELD`, or `param_groups.NAME` with a mapping of fields (YAML)."""
    name, _, field_name = key.partition(".")
    if not name:
        raise ConfigError("param_groups: a group needs a name, e.g. --param_groups.head.lr 0.5")
    group = cfg.param_groups.setdefault(name, ParamGroup())
    if not field_name:
        if not isinstance(value, dict):
            raise ConfigError(f"param_groups.{name}: expected a mapping of settings (params:, lr:, ...)")
        for sub_key, sub_value in value.items():
            _set_group(cfg, f"{name}.{sub_key}", sub_value)
        return
    types_ = _section_fields(ParamGroup)
    if field_name not in types_:
        raise _unknown_key(f"param_groups.{name}", field_name, list(types_))
    setattr(group, field_name, coerce(f"param_groups.{key}", value, types_[field_name]))


def _set(cfg: Config, section: str, key: str, value: Any) -> None:
    if section == "model":
        cfg.model[key] = value  # checked against the model's signature in _check_model
        return
    if section == "param_groups":
        _set_group(cfg, key, value)
        return
    if section not in SECTIONS:
        valid = [*SECTIONS, "model", "param_groups"]
        close = difflib.get_close_matches(section, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown section '{section}' in '{section}.{key}'.{hint} Valid sections: {', '.join(valid)}")
    types_ = _section_fields(SECTIONS[section])
    if key not in types_:
        raise _unknown_key(section, key, list(types_))
    setattr(getattr(cfg, section), key, coerce(f"{section}.{key}", value, types_[key]))


def recipe_names() -> list[str]:
    """The recipes shipped inside the package (fasttrain/recipes/*.yaml), found wherever fasttrain is installed."""
    return sorted(
        f.name.removesuffix(".yaml") for f in resources.files("fasttrain.recipes").iterdir() if f.name.endswith(".yaml")
    )


def resolve_recipe(path_or_name: str):
    """A YAML file's path, or a bare recipe name such as `resnet9` shipped in fasttrain/recipes/."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path_or_name in recipe_names():
        return resources.files("fasttrain.recipes") / f"{path_or_name}.yaml"
    if path.is_dir():
        raise ConfigError(
            f"--config: '{path_or_name}' is a folder; pass a YAML file in it or a recipe: {', '.join(recipe_names())}"
        )
    raise ConfigError(
        f"--config: no file '{path_or_name}' and no recipe of that name. Recipes: {', '.join(recipe_names())}"
    )


def _read_text(path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's problem and where it is, in one line ("expected ',' or '}', but got ':' at line 2, column 6")."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem is None:
        return str(error).splitlines()[0]
    return f"{problem}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def is_sections(data: Any) -> bool:
    """Whether `data` (read from YAML) has a configuration's shape: sections of key: value pairs."""
    return isinstance(data, dict) and all(isinstance(values, dict) for values in data.values())


def load_yaml(path) -> dict[str, dict[str, Any]]:
    """A recipe's sections. Keys become strings: YAML reads `1:` as an int, which is an unknown key like any other."""
    try:
        data = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not is_sections(data):
        raise ConfigError(f"{path}: expected sections of key: value pairs (run:, data:, model:, train:, ...)")
    return {str(section): {str(key): value for key, value in values.items()} for section, values in data.items()}


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Split argv into the --config value and (section, key, value) overrides. `--resume X` means `--run.resume X`."""
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': options look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if name == "config":
            config_path = value
        elif name == "resume":
            overrides.append(("run", "resume", value))
        elif "." in name:
            section, _, key = name.partition(".")
            overrides.append((section, key, value))
        else:
            raise ConfigError(
                f"unknown option '--{name}': use --section.key value "
                f"(sections: {', '.join([*SECTIONS, 'model'])}) or --config RECIPE"
            )
    return config_path, overrides


def build_config(config_path: str | None, overrides: list[tuple[str, str, str]] = ()) -> Config:
    from fasttrain.data.loaders import MODE_ALIASES  # imports torch: only when a config is built

    cfg = Config()
    if config_path is not None:
        path = resolve_recipe(config_path)
        for section, values in load_yaml(path).items():
            if section == "model":
                cfg.model = {}  # a recipe's model replaces the default model entirely
            for key, value in values.items():
                _set(cfg, section, key, value)
    for section, key, value in overrides:
        if section == "model" and key == "name" and value != cfg.model.get("name"):
            cfg.model = {}  # a different model: the recipe's arguments were for the old one
        _set(cfg, section, key, value)
    cfg.data.mode = MODE_ALIASES.get(cfg.data.mode, cfg.data.mode)
    _check_model(cfg)
    validate(cfg)
    return cfg


def with_current_names(config: dict[str, Any]) -> dict[str, Any]:
    """A config as a dict (a checkpoint's, say) with former model and data-mode names replaced by the current ones,
    as `build_config` replaces them, so an old run compares equal to the same run asked for today."""
    from fasttrain import models
    from fasttrain.data.loaders import MODE_ALIASES

    model, data = dict(config.get("model", {})), dict(config.get("data", {}))
    if "name" in model:
        model["name"] = models.former_names().get(model["name"], model["name"])
    if "mode" in data:
        data["mode"] = MODE_ALIASES.get(data["mode"], data["mode"])
    return {**config, "model": model, "data": data}


def _check_model(cfg: Config) -> None:
    from fasttrain import models

    name = cfg.model.get("name")
    if name is None:
        raise ConfigError(f"model.name is missing. Models: {', '.join(models.names())}")
    try:
        name = models.canonical_name(name)  # a former name (resnet9) is reported under the current one
    except ConfigError as e:
        raise ConfigError(f"model.name: {e}") from None
    params = models.describe(name)
    checked = {"name": name}
    for key, value in cfg.model.items():
        if key == "name":
            continue
        if key not in params:
            raise _unknown_key("model", key, ["name", *params])
        checked[key] = coerce(f"model.{key}", value, params[key].annotation)
    cfg.model = checked
    import torch

    with torch.device("meta"):  # the constructor's own value checks (e.g. dropout < 1), without allocating
        model = models.create(name, **{k: v for k, v in checked.items() if k != "name"})
    from fasttrain.loop.optim import assign_params

    assign_params(model, cfg.param_groups)  # every pattern matches, no parameter in two groups


MAX_SEED = 2**32 - 1  # accelerate's set_seed seeds numpy's legacy generator, which refuses larger seeds


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_lr_peak_epoch(key: str, peak: float, epochs: int) -> None:
    _require(peak >= 0, key, f"must be >= 0 (0: start at the peak), got {peak}")
    fix = f"pass --{key} N with N <= {epochs}, or more --train.epochs"
    _require(peak <= epochs, key, f"{peak} is past the last epoch (train.epochs={epochs}): {fix}")


def _check_seeds(run: RunSection) -> None:
    """Repeat i trains with seed + i, so the last repeat's seed must still be one numpy takes."""
    highest = MAX_SEED - (run.repeats - 1)
    why = f" (run.repeats {run.repeats} uses seeds seed .. seed+{run.repeats - 1})" if run.repeats > 1 else ""
    _require(0 <= run.seed <= highest, "run.seed", f"must be in [0, {highest}]{why}, got {run.seed}")


def _check_group(name: str, group: ParamGroup, t: TrainSection) -> None:
    """One param_groups entry; unset (None) settings take train's, which validate checks."""
    key = f"param_groups.{name}"
    _require(bool(group.params), f"{key}.params", "needs at least one name pattern, e.g. ['*conv*.weight']")
    for setting in ("lr", "momentum", "weight_decay", "lr_peak_epoch", "end_epoch"):
        value = getattr(group, setting)
        _require(value is None or math.isfinite(value), f"{key}.{setting}", f"must be a finite number, got {value}")
    _require(group.lr is None or group.lr >= 0, f"{key}.lr", f"must be >= 0, got {group.lr}")
    wd, momentum = group.weight_decay, group.momentum
    _require(wd is None or wd >= 0, f"{key}.weight_decay", f"must be >= 0, got {wd}")
    _require(momentum is None or 0 <= momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {momentum}")
    if group.lr_peak_epoch is not None:
        _check_lr_peak_epoch(f"{key}.lr_peak_epoch", group.lr_peak_epoch, t.epochs)
    optimizer = group.optimizer or t.optimizer
    _require(not group.nesterov or optimizer != "adamw", f"{key}.nesterov", "applies to sgd and muon only")
    _require(group.end_epoch is None or group.end_epoch > 0, f"{key}.end_epoch", f"must be > 0, got {group.end_epoch}")


def validate(cfg: Config) -> None:
    """Value checks that need no hardware. World-size checks happen in the trainer once processes exist."""
    t, d = cfg.train, cfg.data
    for key in ("epochs", "batch_size", "lr_ref_batch", "log_every", "eval_every", "max_skips"):
        _require(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("lr", "momentum", "weight_decay", "lr_peak_epoch"):
        value = getattr(t, key)
        _require(math.isfinite(value), f"train.{key}", f"must be a finite number, got {value}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0 <= t.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    _check_lr_peak_epoch("train.lr_peak_epoch", t.lr_peak_epoch, t.epochs)
    _require(
        t.grad_clip is None or (math.isfinite(t.grad_clip) and t.grad_clip > 0),
        "train.grad_clip",
        f"must be a finite number > 0, or none for no clipping, got {t.grad_clip}",
    )
    _require(
        t.target_acc is None or 0 < t.target_acc <= 1,
        "train.target_acc",
        f"is a fraction in (0, 1], e.g. 0.94, got {t.target_acc}",
    )
    _require(t.nesterov is False or t.optimizer != "adamw", "train.nesterov", "applies to sgd and muon only")
    _require(0 <= t.tta_level <= 2, "train.tta_level", f"is 0, 1 or 2, got {t.tta_level}")
    _require(t.eval_train_images >= 0, "train.eval_train_images", f"must be >= 0, got {t.eval_train_images}")
    _require(cfg.run.repeats >= 1, "run.repeats", f"must be >= 1, got {cfg.run.repeats}")
    _check_seeds(cfg.run)
    for name, group in cfg.param_groups.items():
        _check_group(name, group, t)
    _require(d.workers >= 1, "data.workers", f"must be >= 1, got {d.workers}")
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", f"must be >= 1, got {d.eval_batch_size}")
    _require(0 <= d.translate <= 8, "data.translate", f"must be in [0, 8] pixels, got {d.translate}")
    _require(0 <= d.cutout <= 32, "data.cutout", f"must be in [0, 32] pixels, got {d.cutout}")
    _require(d.subset is None or d.subset >= 10, "data.subset", f"must be >= 10 (one image per class), got {d.subset}")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    resume = cfg.run.resume
    _require(
        resume in ("no", "auto", "force") or Path(resume).exists(),
        "run.resume",
        f"is no, auto, force or an existing checkpoint directory; '{resume}' does not exist",
    )


def load_config(argv: list[str], default_recipe: str | None = None) -> Config:
    """The configuration for a command line: `--config` recipe (or `default_recipe`) plus overrides."""
    config_path, overrides = parse_overrides(argv)
    return build_config(config_path or default_recipe, overrides)


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """`section.key -> value` of a config as a dict of sections."""
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def recipe_changes(recipe: str) -> dict[str, Any]:
    """`section.key -> value` of every setting where the shipped `recipe` departs from the defaults."""
    defaults, changed = flatten(Config().to_dict()), flatten(build_config(recipe).to_dict())
    return {key: value for key, value in changed.items() if defaults.get(key, "<unset>") != value}


def help_text() -> str:
    def changes(recipe: str) -> str:
        return ", ".join(f"{key} {value}" for key, value in recipe_changes(recipe).items())

    lines = [
        "Options (--section.key value) with their defaults, which apply wherever a recipe sets nothing.",
        "Without --config the trainer takes the resnet9 recipe on a CUDA machine and cpu_quick elsewhere.",
        f"resnet9 sets the same, except: {changes('resnet9')}.",
        f"cpu_quick sets the same, except: {changes('cpu_quick')}.",
    ]
    options = [
        (f"--{name}.{f.name}", repr(getattr(cls(), f.name)), f.metadata.get("help", ""))
        for name, cls in [*SECTIONS.items(), ("param_groups.NAME", ParamGroup)]
        for f in dataclasses.fields(cls)
    ]
    width = max(len(key) for key, _, _ in options)
    lines += [f"  {key:<{width}}  {default:<12} {what}" for key, default, what in options]
    more = [
        (
            "--model.name NAME",
            f"default {DEFAULT_MODEL!r}, and that model's own arguments (see fasttrain.models.describe)",
        ),
        ("--config RECIPE", "a YAML file or a shipped recipe: " + ", ".join(recipe_names())),
        ("--resume auto|force|DIR", "short for --run.resume"),
    ]
    lines += [f"  {key:<{width}}  {what}" for key, what in more]
    return "\n".join(lines)
