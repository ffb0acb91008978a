"""CLIP: the contrastive loss, its 2-process equivalence, captions, checkpoints through open_clip, zero-shot."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_helpers import train_tiny_clip, write_tiny_clip_config
from data import FASHION_MNIST_MEAN, caption_for, expand_shards
from data.captions import CAPTION_PHRASINGS, CLASS_NOUNS
from pretrain.config import CLIPPretrainConfig, ConfigError, load_config
from pretrain.models.clip import create_clip, load_clip, tokenizer_for
from pretrain.tasks import CLIPTask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(model, config name, config JSON path) of a ~1M-parameter open_clip model on 16x16 images."""
    config = write_tiny_clip_config(tmp_path_factory.mktemp("clip_config"))
    torch.manual_seed(0)
    model, name, _ = create_clip(str(config))
    return model, name, config


def test_clip_loss_equals_symmetric_cross_entropy_by_hand(tiny_clip):
    model, name, _ = tiny_clip
    batch = {"image": torch.randn(6, 3, 16, 16), "text": tokenizer_for(name)([f"item {i}" for i in range(6)])}
    outputs = CLIPTask()(model, batch)
    with torch.no_grad():
        image = F.normalize(model.encode_image(batch["image"]), dim=-1)
        text = F.normalize(model.encode_text(batch["text"]), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        targets = torch.arange(6)
        by_hand = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        accuracy = (logits.argmax(1) == targets).float().mean()
    assert torch.allclose(outputs["loss"], by_hand, atol=1e-5)
    assert torch.allclose(outputs["logit_scale"], model.logit_scale.exp())
    assert torch.allclose(outputs["image_to_text_acc"], accuracy)
    assert math.isclose(float(model.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-4)  # CLIP's initial temperature


def test_two_gloo_processes_compute_the_one_process_loss_and_gradients(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "distributed_clip_loss.py"), str(tmp_path), str(report)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(report.read_text())
    assert figures["two_processes"] == pytest.approx(figures["alone"], abs=1e-5)
    assert figures["local"] != pytest.approx(figures["alone"], abs=1e-3)  # each half alone differs: it gathered
    assert figures["max_grad_relative_difference"] < 1e-5, figures


def test_the_temperature_is_clamped_at_100_after_each_step(tiny_clip):
    model, _, _ = tiny_clip
    saved = model.logit_scale.detach().clone()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    CLIPTask().after_optimizer_step(model)
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.copy_(saved)


def test_captions_are_varied_natural_and_never_use_the_prompt_phrasings():
    rng = random.Random(0)
    attributes = ("small", "dark", "patterned")
    captions = [caption_for("Ankle boot", rng, attributes) for _ in range(200)]
    assert len(set(captions)) > 40
    assert all(any(noun in c.lower() for noun in CLASS_NOUNS["Ankle boot"]) for c in captions)
    # every caption says one or two of the image's words, in their order, and none it does not have
    for caption in captions:
        said = [word for word in attributes if word in caption.lower().replace(",", " ").split()]
        assert 1 <= len(said) <= 2 and not {"large", "bright", "grey", "plain"} & set(caption.lower().split())
    assert {"Close-up of a small dark heeled ankle boot", "This ankle boot is dark and patterned"} & set(captions)
    assert not any("photo" in c.lower() or "picture" in c.lower() for c in captions)
    assert not any("a a" in c.lower() or " a ankle" in c.lower() or "a old" in c.lower() for c in captions)
    openai_prompts = {t("ankle boot").lower() for t in open_clip.OPENAI_IMAGENET_TEMPLATES}
    assert not openai_prompts & {c.lower() for c in captions}
    plain = {caption_for("Zebra", random.Random(seed)) for seed in range(20)}  # no attributes: no adjective
    assert all(c.lower().count("zebra") == 1 for c in plain)  # unknown classes use their name
    assert plain <= {"A zebra", "A zebra for sale", "Product shot: a zebra", "Someone's zebra"}
    assert len(CAPTION_PHRASINGS) >= 10


def test_visual_attributes_say_what_the_image_shows():
    from PIL import Image

    from data.captions import visual_attributes

    def item(side, grey, stripes=False):  # an item of side x side pixels on a black 28x28 frame
        pixels = np.zeros((28, 28), np.uint8)
        block = np.full((side, side), grey, np.uint8)
        if stripes:
            block[::2] = grey // 3
        pixels[2:2 + side, 2:2 + side] = block
        return Image.fromarray(pixels)

    assert visual_attributes(item(10, 80)) == ("small", "dark", "plain")
    assert visual_attributes(item(24, 230)) == ("large", "bright", "plain")
    assert visual_attributes(item(18, 170, stripes=True))[-1] == "patterned"
    assert visual_attributes(item(18, 170)) == ("grey", "plain")  # 41% of the frame: neither small nor large
    white = Image.fromarray(np.where(np.asarray(item(10, 80)) > 0, 40, 255).astype(np.uint8))  # white background
    assert visual_attributes(white) == ("small", "dark", "plain")
    assert visual_attributes(Image.new("L", (28, 28), 255)) == ()  # a blank frame: nothing to describe
    photo = item(10, 80).convert("RGB").resize((560, 560), Image.Resampling.NEAREST)  # judged on a 64-px copy
    assert visual_attributes(photo) == ("small", "dark", "plain") and photo.size == (560, 560)


def test_captions_command_turns_labelled_shards_into_pairs(tiny_shards, tmp_path):
    from data.__main__ import main

    assert main(["captions", "--shards", str(tiny_shards[0]), "--out", str(tmp_path), "--no-progress"]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["samples"] == 64 and stats["kind"] == "image-text"
    import webdataset as wds

    first = next(iter(wds.WebDataset(expand_shards(tmp_path), shardshuffle=False)))
    assert first["txt"].decode() and "png" in first


def test_clip_config_takes_gradient_accumulation_and_keeps_its_own_defaults(tmp_path):
    # accumulation keeps the whole step's negatives (tests/test_clip_accumulation.py)
    assert load_config(CLIPPretrainConfig, None, ["train.grad_accum_steps=2"]).train.grad_accum_steps == 2
    config = tmp_path / "clip.yaml"
    config.write_text("objective: clip\ndata:\n  image_size: 32\noptim:\n  weight_decay: 0.1\n")
    cfg = load_config(CLIPPretrainConfig, str(config), [])
    # sections given in YAML keep the CLIP defaults of the keys they leave out
    assert cfg.data.mean == FASHION_MNIST_MEAN and cfg.data.crop_scale == (0.9, 1.0)  # the embedded demo data's
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.weight_decay == 0.1 and cfg.optim.lr == 1e-3


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, tiny_pair_shards, tiny_clip, single_thread):
    """A 3-step CLIP run of the tiny model through `python -m pretrain`."""
    return train_tiny_clip(tmp_path_factory.mktemp("clip_run") / "run", tiny_clip[2], tiny_pair_shards)


def test_clip_run_logs_the_contrastive_metrics(clip_run):
    records = [json.loads(line) for line in (clip_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["loss"] > 0 and 0 < record["logit_scale"] <= 100
        assert 0 <= record["image_to_text_acc"] <= 1 and 0 <= record["text_to_image_acc"] <= 1


def test_checkpoint_and_export_reload_through_open_clip(clip_run, tiny_clip):
    _, name, config = tiny_clip
    ours, _ = load_clip(clip_run)
    images, text = torch.randn(2, 3, 16, 16), tokenizer_for(name)(["a coat", "a bag"])
    expected = ours.encode_image(images), ours.encode_text(text)

    weights = next((clip_run / "checkpoints").iterdir()) / "model.safetensors"
    open_clip.add_model_config(config)
    plain, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_run / 'open_clip'}")
    for model in (plain.eval(), exported.eval()):
        assert torch.allclose(model.encode_image(images), expected[0], atol=1e-6)
        assert torch.allclose(model.encode_text(text), expected[1], atol=1e-6)
    exported_config = json.loads((clip_run / "open_clip" / "open_clip_config.json").read_text())
    assert exported_config["preprocess_cfg"]["mean"] == list(FASHION_MNIST_MEAN)  # the run's own, carried along


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_prompt_embeddings(tiny_clip):
    from pretrain.clip_eval import zero_shot_weights

    model, name, _ = tiny_clip
    tokenizer = tokenizer_for(name)
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]
    names = ["coat", "bag", "sandal"]
    classifier = zero_shot_weights(model.eval(), tokenizer, names, templates, "cpu")
    with torch.no_grad():
        for column, class_name in enumerate(names):
            prompts = F.normalize(model.encode_text(tokenizer([t.format(class_name) for t in templates])), dim=-1)
            expected = F.normalize(prompts.mean(0), dim=0)
            assert torch.allclose(classifier[:, column], expected, atol=1e-5)


def test_zero_shot_writes_metrics_with_per_class_accuracy(clip_run, tiny_shards, tmp_path, single_thread):
    from finetune.cli import main

    templates = tmp_path / "templates.txt"
    templates.write_text("# two prompts\na photo of a {}.\na blurry photo of the {}.\n")
    out = tmp_path / "zeroshot"
    code = main(["--config", str(REPO / "configs" / "zeroshot_clip_tiny_demo.yaml"), f"output_dir={out}",
                 f"model.checkpoint={clip_run}", f"data.val={tiny_shards[1]}", "data.image_size=16",
                 "data.num_workers=0", f"templates={templates}", "train.mixed_precision=no"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["num_templates"] == 2 and metrics["num_classes"] == 10
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert sum(metrics["per_class_samples"].values()) == 16
    weighted = sum(metrics["per_class_top1"][c] * n for c, n in metrics["per_class_samples"].items()) / 16
    assert weighted == pytest.approx(metrics["top1"])
    assert (out / "confusion_matrix.png").stat().st_size > 0


def test_zero_shot_names_a_bad_template_file(tmp_path):
    from pretrain.clip_eval import prompt_templates

    bad = tmp_path / "bad.txt"
    bad.write_text("a photo without a slot\n")
    with pytest.raises(ConfigError, match="need '\\{\\}'"):
        prompt_templates(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        prompt_templates(str(tmp_path / "missing.txt"))
    assert len(prompt_templates("openai")) == 80 and prompt_templates("a {} in a box") == ["a {} in a box"]


@pytest.mark.parametrize("mae_name, tower, other_tower", [("mae_vit_tiny_patch4", "vitpretrain-tiny-32", "vitpretrain-tiny12-32"),
                                                         ("mae_vit_tiny_d12_patch4", "vitpretrain-tiny12-32", "vitpretrain-tiny-32")])
def test_an_mae_checkpoint_initialises_the_timm_image_tower_of_its_depth(tmp_path, mae_name, tower, other_tower):
    from pretrain.checkpoint import CheckpointError, save_checkpoint
    from pretrain.encoders import init_image_tower
    from pretrain.models import create_model

    torch.manual_seed(0)
    mae = create_model(mae_name)
    metadata = {"objective": "mae", "model_name": mae_name, "model_config": json.dumps(mae.config)}
    save_checkpoint(tmp_path / "checkpoints", 1, mae.state_dict(), {}, {}, model_metadata=metadata)
    model, _, _ = create_clip(tower)
    init_image_tower(model, tmp_path)
    trunk = model.visual.trunk.state_dict()
    for key, value in mae.encoder_state_dict().items():
        assert torch.equal(trunk[key], value), key
    with pytest.raises(CheckpointError, match="does not fit the VisionTransformer"):  # 6 blocks into 12, 12 into 6
        init_image_tower(create_clip(other_tower)[0], tmp_path)


@pytest.mark.parametrize("model_name", ["ummae_swin_tiny_cpu", "simmim_swin_tiny_cpu"])
def test_a_swin_checkpoint_initialises_a_swin_image_tower_and_a_vit_tower_refuses_it(tmp_path, model_name):
    """UM-MAE's and SimMIM's Swin encoders through the one road into open_clip's timm Swin tower; a ViT tower says
    which architectures differ instead of a traceback."""
    from pretrain.checkpoint import CheckpointError, save_checkpoint
    from pretrain.encoders import init_image_tower
    from pretrain.models import create_model
    from pretrain.train_mae import model_metadata

    torch.manual_seed(0)
    swin = create_model(model_name)
    save_checkpoint(tmp_path / "checkpoints", 1, swin.state_dict(), {}, {},
                    model_metadata=model_metadata(swin, model_name, "mae"))
    model, _, _ = create_clip("vitpretrain-swin-tiny-32")
    assert "MAE checkpoint" in init_image_tower(model, tmp_path)
    trunk = model.visual.trunk.state_dict()
    for key, value in swin.encoder_state_dict().items():
        assert torch.equal(trunk[key], value), key
    with pytest.raises(CheckpointError, match=r"\(SwinTransformer\) does not fit the VisionTransformer: .*missing"):
        init_image_tower(create_clip("vitpretrain-tiny-32")[0], tmp_path)


def test_zero_shot_takes_any_open_clip_config_with_a_local_weights_file(clip_run, tiny_clip, tiny_shards, tmp_path,
                                                                       single_thread):
    """The path for weights of other origins: an open_clip model config plus a plain weights file."""
    from finetune.cli import main

    _, _, config = tiny_clip
    weights = next((clip_run / "checkpoints").iterdir()) / "model.safetensors"
    out = tmp_path / "zeroshot"
    code = main(["--config", str(REPO / "configs" / "zeroshot_clip_tiny_demo.yaml"), f"output_dir={out}",
                 f"model.checkpoint={weights}", f"model.open_clip_config={config}", f"data.val={tiny_shards[1]}",
                 "data.image_size=16", "data.num_workers=0", "templates=simple", "train.mixed_precision=no"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["open_clip_config"] == config.stem and metrics["num_templates"] == 7
    assert metrics["num_samples"] == 16
