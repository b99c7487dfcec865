"""The run configuration: recipes, overrides, types and the errors for bad input."""

import pytest

from fasttrain import models
from fasttrain.config import Config, build_config, coerce, help_text, load_config, recipe_changes, recipe_names
from fasttrain.errors import ConfigError
from fasttrain.loop.optim import assign_params, build_optimizers, lr_factor, scaled_lr


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_loads(recipe):
    cfg = load_config(["--config", recipe])
    assert cfg.model["name"] in models.names()


def test_the_former_model_name_resnet9_builds_the_myrtle_net_under_its_current_name(tmp_path):
    old_recipe = tmp_path / "old.yaml"
    old_recipe.write_text("model:\n  name: resnet9\n  width_mult: 0.5\n")
    for argv in (["--config", str(old_recipe)], ["--model.name", "resnet9"]):
        assert load_config(argv).model["name"] == "resnet9_myrtle"
    assert load_config(["--config", str(old_recipe)]).model["width_mult"] == 0.5
    assert load_config(["--config", "resnet9_myrtle"]).model == {"name": "resnet9_myrtle"}


def test_defaults_differ_from_the_resnet9_recipe_exactly_where_the_help_says():
    """The defaults are general-purpose; the resnet9 recipe is FFCV's example, which departs from them in these
    settings only (a changed default or recipe must update this list and the config docstring)."""
    changes = recipe_changes("resnet9")
    assert changes == {
        "model.name": "resnet9_ffcv",
        "data.translate_fill": "mean",
        "data.cutout_fill": "mean",
        "train.wd_on_bn_and_bias": True,
        "checkpoint.every": 0,
    }
    assert Config().model == {"name": "resnet9_myrtle"}
    text = help_text()
    assert "defaults shown are the resnet9 recipe's" not in text
    assert all(key in text for key in changes)
    # Both recipes the trainer picks without --config are spelled out, and every option's default is in one column.
    cpu_line = next(line for line in text.splitlines() if line.startswith("cpu_quick sets the same, except: "))
    assert all(f"{key} {value}" in cpu_line for key, value in recipe_changes("cpu_quick").items())
    keyed = [(line, line[2:].split("  ")[0]) for line in text.splitlines() if line.startswith("  --")]
    columns = {len(line) - len(line[2 + len(key) :].lstrip()) for line, key in keyed}
    assert len(keyed) > 40 and len(columns) == 1, keyed


def test_old_data_mode_names_are_the_data_packages_aliases():
    from fasttrain.data.loaders import MODE_ALIASES

    for old, new in MODE_ALIASES.items():
        assert load_config(["--data.mode", old]).data.mode == new


def test_overrides_take_types_from_sections_and_model_signature():
    cfg = load_config(
        [
            "--config",
            "resnet9",
            "--train.lr",
            "0.3",
            "--train.tta_level=2",
            "--model.name",
            "deepcnn",
            "--model.widths",
            "16,32",
            "--model.blocks",
            "1,1",
            "--model.dropout",
            "0.1",
            "--model.block",
            "skip",
            "--data.subset",
            "none",
            "--resume",
            "auto",
        ]
    )
    assert cfg.train.lr == 0.3 and cfg.train.tta_level == 2
    assert cfg.model == {"name": "deepcnn", "widths": (16, 32), "blocks": (1, 1), "dropout": 0.1, "block": "skip"}
    assert cfg.data.subset is None and cfg.run.resume == "auto"


def test_recipe_values_are_overridden_by_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\n  lr: 0.2\nmodel:\n  name: deepcnn\n  widths: [8, 16]\n  blocks: [1, 1]\n")
    cfg = load_config(["--config", str(recipe), "--train.lr", "0.1"])
    assert (cfg.train.epochs, cfg.train.lr) == (7, 0.1)
    assert cfg.model["widths"] == (8, 16)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--train.lrr", "1"], ["train.lrr", "train.lr", "Valid keys"]),
        (["--trian.lr", "1"], ["trian", "train", "Valid sections"]),
        (["--train.epochs", "two"], ["train.epochs", "integer"]),
        (["--train.lr", "-0.1"], ["train.lr", "> 0"]),
        (["--train.grad_clip", "inf"], ["train.grad_clip", "finite number > 0", "none for no clipping", "got inf"]),
        (["--train.grad_clip", "0"], ["train.grad_clip", "finite number > 0", "got 0.0"]),
        (["--train.mixed_precision", "fp8"], ["train.mixed_precision", "bf16", "fp16"]),
        (["--model.name", "resnet50"], ["model.name", "resnet9", "deepcnn"]),
        (["--model.name", "deepcnn", "--model.dropout", "1.0"], ["dropout"]),
        (["--model.name", "deepcnn", "--model.depth", "3"], ["model.depth", "widths"]),
        (["--train.channels_last", "maybe"], ["train.channels_last", "true or false"]),
        (["--train.tta_level", "3"], ["train.tta_level", "0, 1 or 2"]),
        (["--param_groups.head.lr", "0.1"], ["param_groups.head.params", "pattern"]),
        (["--param_groups.head.params", "nothing*"], ["param_groups.head", "nothing*", "matches no"]),
        (["--param_groups.head.nonsense", "1"], ["param_groups.head.nonsense", "Valid keys"]),
        (["--config", "nonexistent"], ["nonexistent", "resnet9"]),
        (["--train.lr"], ["--train.lr needs a value"]),
        (["epochs=3"], ["unexpected argument"]),
        (["--resume", "/no/such/dir"], ["run.resume", "does not exist"]),
    ],
)
def test_bad_input_names_the_key_and_the_valid_choices(argv, words):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    for word in words:
        assert word in str(err.value)


def test_yaml_with_wrong_shape_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="sections"):
        load_config(["--config", str(bad)])


def test_coerce_handles_optional_literal_and_tuples():
    assert coerce("k", "none", float | None) is None
    assert coerce("k", "0.5", float | None) == 0.5
    assert coerce("k", [1, 2], tuple[int, ...]) == (1, 2)
    with pytest.raises(ConfigError):
        coerce("k", "1.5", int)


@pytest.mark.parametrize("recipe", recipe_names())
def test_config_round_trips_through_the_run_directorys_config_yaml(recipe, tmp_path):
    """What a run writes as config.yaml (report.py) builds the same configuration again (eval and --config read it)."""
    import yaml

    cfg = load_config(["--config", recipe, "--train.lr", "0.3", "--data.flip", "false"])
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert build_config(str(written)).to_dict() == cfg.to_dict()
    assert cfg.to_dict()["train"]["lr"] == 0.3 and cfg.to_dict()["data"]["flip"] is False


def test_lr_scaling_rules():
    """The peak LR for a global batch: lr x batch / lr_ref_batch (linear), x its square root (sqrt), or lr (none)."""
    t = build_config(None).train
    t.lr, t.lr_ref_batch = 0.4, 256
    assert scaled_lr(t, 256) == pytest.approx(0.4)
    assert scaled_lr(t, 1024) == pytest.approx(0.4 * 4)
    t.lr_scaling = "sqrt"
    assert scaled_lr(t, 1024) == pytest.approx(0.4 * 2)
    t.lr_scaling = "none"
    assert scaled_lr(t, 4096) == pytest.approx(0.4)


def test_triangular_schedule_peaks_then_reaches_zero():
    total, peak = 100, 20
    factors = [lr_factor(s, total, peak, "triangular") for s in range(total)]
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == peak
    assert factors[0] > 0 and factors[-1] == pytest.approx(1 / 80)
    assert all(a <= b for a, b in zip(factors[:peak], factors[1 : peak + 1]))
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1 :]))


def test_no_weight_decay_on_batchnorm_and_bias():
    from fasttrain.config import TrainSection

    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1))
    (optimizer,) = build_optimizers(model, TrainSection(), {}, 512)
    decay, no_decay = optimizer.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) > 0


def test_param_groups_from_yaml_take_their_parameters_by_pattern(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  name: deepcnn\n  widths: [8, 16]\n  blocks: [1, 1]\n"
        "param_groups:\n  head:\n    params: ['head.*']\n    lr: 0.05\n    end_epoch: 2\n"
    )
    cfg = load_config(["--config", str(recipe), "--param_groups.head.optimizer", "adamw"])
    group = cfg.param_groups["head"]
    assert (group.params, group.lr, group.end_epoch, group.optimizer) == (("head.*",), 0.05, 2.0, "adamw")
    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1))
    assigned = assign_params(model, cfg.param_groups)
    assert [n for n, _ in assigned["head"]] == [n for n, _ in model.named_parameters() if n.startswith("head.")]
    assert not any(n.startswith("head.") for n, _ in assigned["default"])
    assert cfg.to_dict()["param_groups"]["head"]["lr"] == 0.05


def test_adamw_groups_of_one_optimiser_keep_their_own_beta1():
    groups = ["--param_groups.head.params", "head.*", "--param_groups.head.momentum", "0.5"]
    cfg = load_config(["--config", "deepcnn", "--train.optimizer", "adamw", "--train.momentum", "0.8", *groups])
    model = models.create("deepcnn", widths=(8, 16), blocks=(1, 1))
    (optimizer,) = build_optimizers(model, cfg.train, cfg.param_groups, 512)
    assert type(optimizer).__name__ == "AdamW"
    assert {g["group"]: g["betas"][0] for g in optimizer.param_groups} == {"head": 0.5, "default": 0.8}
    with pytest.raises(ConfigError, match="param_groups.head.nesterov: applies to sgd and muon only"):
        load_config(
            ["--config", "deepcnn", "--train.optimizer", "adamw", *groups, "--param_groups.head.nesterov", "true"]
        )


@pytest.mark.parametrize(
    "recipe_bytes, words",
    [
        (b"train: {epochs: }\n", ["train.epochs", "expected an integer", "None"]),
        (b"train: {epochs: [1, 2]}\n", ["train.epochs", "expected an integer", "[1, 2]"]),
        (b"run: {name: }\n", ["run.name", "expected a string", "None"]),
        (b"train: {1: 2}\n", ["unknown key 'train.1'", "Valid keys"]),
        (b"1: {a: b}\n", ["unknown section '1'", "Valid sections"]),
        (b"param_groups: {1: {params: ['nothing*']}}\n", ["param_groups.1", "nothing*", "matches no"]),
        (b"run: {name: caf\xe9}\n", ["not UTF-8 text", "0xe9", "save it as UTF-8"]),
        (b"model: {name: [deepcnn]}\n", ["model.name", "['deepcnn']", "deepcnn"]),
        (b"train: {epochs: 3\nmodel: x\n", ["not valid YAML: expected ',' or '}', but got ':' at line 2, column 6"]),
    ],
)
def test_recipe_of_wrong_types_or_encoding_is_one_config_error(tmp_path, recipe_bytes, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(recipe_bytes)
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(recipe)])
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--run.seed", "-1"], ["run.seed", "[0, 4294967295]", "got -1"]),
        (["--run.seed", "99999999999"], ["run.seed", "[0, 4294967295]", "got 99999999999"]),
        (["--run.seed", str(2**32 - 2), "--run.repeats", "3"], ["run.seed", "[0, 4294967293]", "seed+2"]),
    ],
)
def test_seeds_outside_numpys_range_are_refused(argv, words):
    """Repeat i trains with seed + i, and accelerate's set_seed hands each to numpy, which takes 0 .. 2**32 - 1."""
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    for word in words:
        assert word in str(err.value)


def test_the_highest_seeds_numpy_takes_are_accepted():
    assert load_config(["--run.seed", str(2**32 - 1)]).run.seed == 2**32 - 1
    assert load_config(["--run.seed", str(2**32 - 3), "--run.repeats", "3"]).run.seed == 2**32 - 3


def test_lr_peak_epoch_past_the_epochs_says_its_value_and_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(["--config", "resnet9", "--train.epochs", "1"])
    message = str(err.value)
    assert "train.lr_peak_epoch: 5.0 is past the last epoch (train.epochs=1)" in message
    assert "--train.lr_peak_epoch N with N <= 1" in message


@pytest.mark.parametrize(
    "setting, value, words",
    [
        ("lr", "inf", ["param_groups.head.lr", "finite", "inf"]),
        ("lr", "nan", ["param_groups.head.lr", "finite", "nan"]),
        ("momentum", "nan", ["param_groups.head.momentum", "finite"]),
        ("weight_decay", "inf", ["param_groups.head.weight_decay", "finite"]),
        ("end_epoch", "inf", ["param_groups.head.end_epoch", "finite"]),
        ("lr_peak_epoch", "-1", ["param_groups.head.lr_peak_epoch", ">= 0", "got -1.0"]),
        ("lr_peak_epoch", "nan", ["param_groups.head.lr_peak_epoch", "finite"]),
        ("lr_peak_epoch", "31", ["param_groups.head.lr_peak_epoch", "train.epochs=30", "N <= 30"]),
    ],
)
def test_param_group_settings_must_be_finite_and_in_range(setting, value, words):
    head = ["--param_groups.head.params", "head.*", f"--param_groups.head.{setting}", value]
    with pytest.raises(ConfigError) as err:
        load_config(["--config", "deepcnn", *head])
    for word in words:
        assert word in str(err.value)


def test_a_setting_of_bytes_that_are_not_utf8_is_refused():
    name = "runs/r_" + b"\xff".decode("utf-8", "surrogateescape")  # how Python passes such a file name in argv
    with pytest.raises(ConfigError, match=r"run.dir: 'runs/r_\\udcff' holds bytes that are not UTF-8 text"):
        load_config(["--config", "cpu_quick", "--run.dir", name])


def test_config_that_is_neither_a_file_nor_a_recipe_is_refused_naming_the_recipes(tmp_path):
    with pytest.raises(ConfigError, match=r"no file 'resnet-9' and no recipe of that name\. Recipes: airbench94, "):
        load_config(["--config", "resnet-9"])
    with pytest.raises(ConfigError, match=rf"'{tmp_path}' is a folder; pass a YAML file in it or a recipe: "):
        load_config(["--config", str(tmp_path)])
