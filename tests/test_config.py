"""Configs: YAML + dotted overrides -> typed dataclasses; every mistake is one line naming the key or the file."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.cli import main
from pretrain.config import ConfigError, MAEPretrainConfig, load_config, save_config, to_dict

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "mae_vit_tiny_demo.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


def error_line(capsys) -> str:
    """The CLI's stderr, which must be exactly one `error: ...` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# ------------------------------------------------------------------------------------------------ mistakes


@pytest.mark.parametrize(
    "override, wrong, suggestion",
    [
        ("optim.lrr=1", "optim.lrr", "optim.lr"),
        ("train.epoch=3", "train.epoch", "train.epochs"),
        ("data.image_sise=16", "data.image_sise", "data.image_size"),
        ("ouput_dir=runs/x", "ouput_dir", "output_dir"),
        ("trian.epochs=1", "trian", "train"),
    ],
)
def test_unknown_key_is_one_line_naming_it_and_the_closest_valid_key(capsys, tmp_path, override, wrong, suggestion):
    assert main([override, f"output_dir={tmp_path / 'run'}"]) == 2
    line = error_line(capsys)
    assert f"'{wrong}'" in line
    assert f"did you mean '{suggestion}'" in line
    assert not (tmp_path / "run").exists()  # nothing ran


def test_unknown_key_in_a_yaml_file_is_named_with_its_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"batch_size": 8, "warmup_epochs": 1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.warmup_epochs'"):
        load_config(MAEPretrainConfig, path)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.epochs=abc", "train.epochs", "integer"),
        ("train.epochs=1.5", "train.epochs", "integer"),
        ("optim.base_lr=fast", "optim.base_lr", "number"),
        ("logging.progress_bar=maybe", "logging.progress_bar", "true or false"),
        ("logging.wandb=sometimes", "logging.wandb", "one of"),
        ("optim.betas=[0.9]", "optim.betas", "2 items"),
        ("train=3", "train", "mapping"),
        ("train.epochs=0", "train.epochs", ">= 1"),
        ("model.mask_ratio=1.5", "model.mask_ratio", "(0, 1)"),
        ("data.mean=[0.5]", "data.mean", "3 items"),
        ("data.std=[0.3,0,0.3]", "data.mean", "std positive"),
    ],
)
def test_wrong_type_or_value_names_the_key(capsys, override, key, expected):
    assert main([override]) == 2
    line = error_line(capsys)
    assert f"'{key}'" in line and expected in line


def test_override_below_a_plain_value_names_the_plain_key(capsys):
    assert main(["output_dir=runs/x", "output_dir.name=x"]) == 2
    assert "cannot set 'output_dir.name': 'output_dir' is not a section" in error_line(capsys)
    assert main(["output_dir.name=x"]) == 2
    assert "'output_dir' must be a string" in error_line(capsys)


def test_override_without_equals_sign_is_rejected(capsys):
    assert main(["train.epochs"]) == 2
    assert "'train.epochs' is not of the form key=value" in error_line(capsys)


def test_missing_config_file_names_the_file(capsys, tmp_path):
    missing = tmp_path / "no_such_config.yaml"
    assert main(["--config", str(missing)]) == 2
    assert str(missing) in error_line(capsys)


def test_unparsable_yaml_names_the_file(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: 2\n")
    assert main(["--config", str(broken)]) == 2
    assert str(broken) in error_line(capsys)


def test_unknown_objective_lists_the_known_ones(capsys):
    assert main(["objective=dino"]) == 2
    assert "unknown objective 'dino' (known: mae" in error_line(capsys)


def test_the_installed_command_exits_2_with_one_error_line():
    """`python -m pretrain` itself (not only `main`) turns a typo into exit status 2 and one line on stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", str(DEMO_CONFIG), "optim.lrr=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    ]


# ------------------------------------------------------------------------------------------------ values


def test_exponent_notation_becomes_a_float_from_yaml_and_from_the_command_line(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` without a dot as the *string* "1e-3"; the schema makes it a float.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 1e-3\n  min_lr: 5e-6\n")
    assert yaml.safe_load(path.read_text())["optim"]["base_lr"] == "1e-3"
    cfg = load_config(MAEPretrainConfig, path, ["optim.lr=2e-4", "optim.weight_decay=0"])
    assert type(cfg.optim.base_lr) is float and cfg.optim.base_lr == 1e-3
    assert type(cfg.optim.min_lr) is float and cfg.optim.min_lr == 5e-6
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 2e-4
    assert type(cfg.optim.weight_decay) is float and cfg.optim.weight_decay == 0.0  # int -> float


def test_yaml_booleans_that_spell_a_choice_are_read_as_that_choice(tmp_path):
    # YAML 1.1 reads `no` as False; `mixed_precision: no` must still mean the choice "no".
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(MAEPretrainConfig, path).train.mixed_precision == "no"
    assert load_config(MAEPretrainConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="'train.mixed_precision' must be one of"):
        load_config(MAEPretrainConfig, None, ["train.mixed_precision=yes"])  # True spells no valid choice


def test_nested_sections_merge_file_and_overrides_key_by_key(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "output_dir": "runs/from_file",
        "data": {"image_size": 16, "crop_scale": [0.5, 1.0]},
        "train": {"epochs": 3, "batch_size": 32},
    })
    cfg = load_config(MAEPretrainConfig, path, ["train.batch_size=16", "optim.betas=[0.9, 0.999]", "data.val=null"])
    defaults = MAEPretrainConfig()
    assert cfg.train.epochs == 3  # from the file, untouched by an override of a sibling key
    assert cfg.train.batch_size == 16  # the override wins over the file
    assert cfg.train.log_every == defaults.train.log_every  # neither: the default
    assert cfg.data.image_size == 16 and cfg.data.crop_scale == (0.5, 1.0)  # lists become typed tuples
    assert cfg.data.val is None
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.output_dir == "runs/from_file"
    assert cfg.model == defaults.model  # a section absent everywhere is all defaults


def test_print_config_prints_the_resolved_config_and_runs_nothing(capsys, tmp_path):
    out = tmp_path / "never_written"
    argv = ["--config", str(DEMO_CONFIG), "--print-config", "optim.lr=1e-3", "train.epochs=2", f"output_dir={out}"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(MAEPretrainConfig, DEMO_CONFIG, argv[3:])
    assert printed == to_dict(expected)
    assert printed["optim"]["lr"] == 1e-3 and printed["train"]["epochs"] == 2
    assert printed["model"]["name"] == "mae_vit_tiny_patch4"  # from the file
    assert not out.exists()


def test_resolved_config_is_written_to_the_output_dir_and_loads_back_the_same(capsys, tmp_path, tiny_args):
    out = tmp_path / "run"
    argv = tiny_args(out, "optim.base_lr=1e-3", "optim.betas=[0.9,0.999]", "train.stop_after_steps=1")
    assert main(["--config", str(DEMO_CONFIG), *argv]) == 0
    expected = load_config(MAEPretrainConfig, DEMO_CONFIG, argv)

    written = out / "config.yaml"
    reloaded = load_config(MAEPretrainConfig, written)
    assert reloaded == expected
    assert reloaded.train.mixed_precision == "no"  # survives YAML's `no` -> False
    assert reloaded.optim.betas == (0.9, 0.999)

    # The written file is itself a valid --config: printing it gives the same resolved config again.
    capsys.readouterr()
    assert main(["--config", str(written), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(expected)


def test_save_config_round_trips_every_field_of_the_defaults(tmp_path):
    cfg = MAEPretrainConfig()
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    reloaded = load_config(MAEPretrainConfig, tmp_path / "sub" / "config.yaml")
    assert reloaded == cfg
    assert [f.name for f in dataclasses.fields(reloaded)] == list(yaml.safe_load((tmp_path / "sub" / "config.yaml").read_text()))


def test_unknown_model_name_is_one_clear_line(tmp_path, capsys):
    from pretrain.cli import main

    assert main([f"output_dir={tmp_path / 'run'}", "model.name=mae_vit_tinny_patch4", "logging.wandb=disabled"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "'model.name' mae_vit_tinny_patch4" in err[0] and "mae_vit_tiny_patch4" in err[0]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_with_its_schema(path):
    """configs/ stays true to the code: each file validates against the schema its objective or task names."""
    from finetune.cli import TASKS
    from pretrain.cli import OBJECTIVES

    raw = yaml.safe_load(path.read_text())
    table, key = (TASKS, "task") if "task" in raw else (OBJECTIVES, "objective")
    schema, _ = table[raw[key]]
    cfg = load_config(schema, str(path), [])
    assert getattr(cfg, key) == raw[key]
