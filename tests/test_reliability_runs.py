"""Bad input to the training and evaluation runs (`python -m pretrain`, `python -m finetune`): one line naming the
key or file and exit status 2, caught before the run writes anything where the config alone shows the problem."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.wandb=disabled", "logging.progress_bar=false", "data.num_workers=0"]


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("config, image_size, expected", [
    ("mae_vit_tiny_demo.yaml", 30, "img_size 30 is not divisible by patch_size 4"),
    ("ummae_swin_tiny_demo.yaml", 36, "img_size 36 must be divisible by 2 x mask_patch_size (8)"),
    ("simmim_swin_tiny_demo.yaml", 36, "img_size 36 is not divisible by mask_patch_size 8"),
])
def test_an_image_size_the_model_cannot_cut_into_patches_stops_at_start_up(tmp_path, capsys, config, image_size,
                                                                          expected):
    out = tmp_path / "run"
    status = pretrain_main(["--config", str(REPO / "configs" / config), f"output_dir={out}",
                            f"data.image_size={image_size}", *QUIET])
    assert status == 2
    line = last_error_line(capsys)
    assert line.startswith("error: 'model.name' ") and f"'data.image_size' {image_size}" in line and expected in line
    assert not out.exists()  # refused before the output folder, the data or a step


def test_a_clip_image_size_its_tower_does_not_take_stops_at_start_up(tmp_path, capsys):
    out = tmp_path / "run"
    status = pretrain_main(["--config", str(REPO / "configs/clip_vit_tiny_demo.yaml"), f"output_dir={out}",
                            "data.image_size=30", *QUIET])
    assert status == 2
    assert last_error_line(capsys) == ("error: 'data.image_size' is 30 but the image tower of vitpretrain-tiny-32 "
                                       "takes 32x32 images")
    assert not out.exists()


def test_a_teacher_that_is_not_our_classifier_names_the_formats_and_teacher_model(tiny_shards, tmp_path, capsys):
    weights = tmp_path / "resnet_from_elsewhere.pth"
    torch.save({"model": {"fc.weight": torch.zeros(10, 4)}}, weights)
    train_dir, val_dir = tiny_shards
    status = finetune_main(["--config", str(REPO / "configs/distill_vit_tiny_fmnist.yaml"), f"data.train={train_dir}",
                            f"data.val={val_dir}", "data.image_size=16", "encoder.checkpoint=null",
                            f"distillation.teacher={weights}", f"output_dir={tmp_path / 'run'}", *QUIET])
    assert status == 2
    line = last_error_line(capsys)
    assert line.startswith(f"error: 'distillation.teacher' {weights} is not a finetuned classifier of this project")
    assert ".safetensors, .pth, .pt, .bin, .ckpt" in line and "distillation.teacher_model" in line


def test_probe_weights_from_elsewhere_name_the_accepted_formats(tiny_shards, tmp_path, capsys):
    weights = tmp_path / "encoder.pth"
    torch.save({"weight": torch.zeros(2)}, weights)
    train_dir, val_dir = tiny_shards
    status = finetune_main(["--config", str(REPO / "configs/linprobe_mae_tiny_demo.yaml"), f"data.train={train_dir}",
                            f"data.val={val_dir}", "data.image_size=16", f"encoder.checkpoint={weights}",
                            f"output_dir={tmp_path / 'run'}", *QUIET])
    assert status == 2
    line = last_error_line(capsys)
    assert f"{weights} is not a checkpoint of this project" in line
    assert ".safetensors, .pth, .pt, .bin, .ckpt" in line and "encoder.source=timm" in line


@pytest.fixture(scope="module")
def renamed_val_shards(tmp_path_factory) -> Path:
    """16 embedded images written as evaluation shards under another class list (the names in reverse order)."""
    import itertools

    from data import ShardOptions, read_embedded, write_labelled_shards

    class_names, samples = read_embedded()
    out = tmp_path_factory.mktemp("renamed") / "val"
    write_labelled_shards(list(itertools.islice(iter(samples), 16)), out, list(reversed(class_names)), prefix="val",
                          options=ShardOptions(progress=False))
    return out


def test_a_probe_whose_evaluation_shards_name_other_classes_is_refused(tiny_shards, renamed_val_shards, tmp_path,
                                                                      capsys):
    status = finetune_main(["--config", str(REPO / "configs/linprobe_mae_tiny_demo.yaml"),
                            f"data.train={tiny_shards[0]}", f"data.val={renamed_val_shards}", "data.image_size=16",
                            "encoder.source=pixels", "encoder.checkpoint=null", f"output_dir={tmp_path / 'run'}",
                            *QUIET])
    assert status == 2
    line = last_error_line(capsys)
    assert line.startswith(f"error: the evaluation shards {renamed_val_shards} name other classes than the training "
                           f"shards {tiny_shards[0]}: ['Ankle boot', 'Bag'")
    assert "vs ['T-shirt/top', 'Trouser'" in line


def test_a_finetune_with_fewer_outputs_than_classes_is_refused(tiny_shards, tmp_path, capsys):
    status = finetune_main(["--config", str(REPO / "configs/finetune_mae_tiny_fmnist.yaml"),
                            f"data.train={tiny_shards[0]}", f"data.val={tiny_shards[1]}", "data.image_size=16",
                            "encoder.checkpoint=null", "num_classes=5", f"output_dir={tmp_path / 'run'}", *QUIET])
    assert status == 2
    assert last_error_line(capsys).startswith(f"error: 'num_classes' is 5 but the training shards {tiny_shards[0]} "
                                              f"have 10 classes (T-shirt/top, Trouser,")


def test_zero_shot_class_names_of_another_count_than_the_shards_are_refused(tiny_shards, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("shirt\ntrousers\nshoe\n")
    status = finetune_main(["--config", str(REPO / "configs/zeroshot_clip_tiny_demo.yaml"),
                            f"data.val={tiny_shards[1]}", f"classes={names}", "model.checkpoint=/nowhere",
                            f"output_dir={tmp_path / 'run'}", *QUIET])
    assert status == 2
    assert last_error_line(capsys).startswith(f"error: 'classes' {names} gives 3 class names but the shards "
                                              f"{tiny_shards[1]} have 10 classes (T-shirt/top,")


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    assert pretrain_main([f"output_dir={out}", *QUIET]) == 2
    assert last_error_line(capsys) == f"error: 'output_dir' {out} cannot be written: Not a directory"
