"""Normalisation statistics: grey images normalised per channel with ImageNet's statistics turn every flat patch
into a coloured one (MAE's per-patch normalised targets amplify the channel offsets), so Fashion-MNIST runs use
its own grey statistics, and a run whose statistics do not fit its shards says so at start-up."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, ShardOptions
from data import write_labelled_shards
from data.sources import LabelledImage
from pretrain.config import DataConfig, MAEPretrainConfig
from pretrain.models import create_model
from pretrain.run import check_normalisation
from pretrain.visualize import reconstruction_panels



def grey_images(count: int = 4, size: int = 16) -> torch.Tensor:
    """Fashion-MNIST-like grey images in [0, 1]: a bright object on black, the same in every channel."""
    images = torch.zeros(count, 1, size, size)
    for i in range(count):
        images[i, :, 4:12, 2 + i:10 + i] = 0.5 + 0.1 * i
    return images.expand(-1, 3, -1, -1)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("statistics, grey", [((FASHION_MNIST_MEAN, FASHION_MNIST_STD), True),
                                              ((IMAGENET_MEAN, IMAGENET_STD), False)])
def test_a_blurry_reconstruction_of_grey_images_stays_grey_only_with_grey_statistics(statistics, grey,
                                                                                     micro_model):
    """A decoder that predicts each patch's mean (all zeros in the per-patch normalised target space, what an
    undertrained MAE approaches) gives grey pixels with grey statistics, coloured ones with ImageNet's: per-patch
    normalisation over the three channels turns their different offsets into the target."""
    torch.manual_seed(0)
    model = create_model(micro_model).eval()
    torch.nn.init.zeros_(model.decoder_pred.weight)
    torch.nn.init.zeros_(model.decoder_pred.bias)
    mean, std = statistics
    images = normalise(grey_images(), mean, std)
    with torch.no_grad():
        _, pred, _ = model(images, mask_ratio=0.75)
        reconstruction = model.unpatchify(model.pred_to_pixels(pred, images))
    pixels = reconstruction * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    spread = (pixels.amax(dim=1) - pixels.amin(dim=1)).max().item()  # how far the channels of a pixel differ
    assert (spread < 1e-5) if grey else (spread > 0.05), spread


def test_grey_images_are_drawn_grey_and_colour_images_in_colour(micro_model):
    """A trained model's channels disagree a little; a grey image's reconstruction is drawn as their mean."""
    torch.manual_seed(0)
    model = create_model(micro_model)  # random decoder: every channel predicted differently
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    colour = torch.rand(2, 3, 16, 16)
    images = torch.cat([grey_images(2), colour])
    panels = reconstruction_panels(model, normalise(images, mean, std), mean, std, mask_ratio=0.75)
    spread = (panels[:, 2].amax(dim=1) - panels[:, 2].amin(dim=1)).flatten(1).amax(dim=1)
    assert spread[:2].max() < 1e-6 and spread[2:].min() > 0.05, spread
    torch.testing.assert_close(panels[2:, 0], colour)  # the colour originals drawn as they are


def test_the_demo_defaults_normalise_the_embedded_images_by_their_own_grey_statistics():
    data = MAEPretrainConfig().data
    assert data.train == "embedded" and (data.mean, data.std) == (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert len(set(data.mean)) == 1 and len(set(data.std)) == 1


def grey_shards(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        samples.append(LabelledImage(key=f"{i:04d}", image_bytes=buffer.getvalue(), ext="png", label=i % 2,
                                     source=f"image {i}"))
    write_labelled_shards(samples, tmp_path / "grey", ["a", "b"], options=ShardOptions(progress=False))
    return tmp_path / "grey"


def test_start_up_warns_when_grey_shards_meet_per_channel_statistics_naming_the_fix(tmp_path, caplog):
    shards = grey_shards(tmp_path)
    with caplog.at_level(logging.INFO, logger="pretrain.run"):
        check_normalisation(DataConfig(train=str(shards), val=None), str(shards))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the shards' images are grey" in warnings[0]
    assert "set data.mean=[" in warnings[0] and "data.std=[" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain.run"):
        check_normalisation(DataConfig(train=str(shards), val=None, mean=(0.5,) * 3, std=(0.29,) * 3), str(shards))
    assert not [record for record in caplog.records if record.levelno == logging.WARNING]
    assert any("shards' pixel mean" in record.getMessage() for record in caplog.records)  # the figures, logged

    caplog.clear()  # grey statistics far from these shards' (mean ~0.5): said, with the shards' own figures
    with caplog.at_level(logging.INFO, logger="pretrain.run"):
        check_normalisation(DataConfig(train=str(shards), val=None, mean=(0.1,) * 3, std=(0.29,) * 3), str(shards))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is far from the shards' own pixel mean" in warnings[0]


# ------------------------------------------------------------------------------------------------ carried by weights


def test_an_encoder_of_ours_is_fed_as_it_was_trained_unless_the_config_says_otherwise(tmp_path, caplog):
    """Our weights files record the statistics of their run (as timm's pretrained_cfg does); a task over such an
    encoder uses them when its config leaves data.mean / data.std out, and warns when it sets other ones."""
    from finetune.config import KNNConfig, LinearProbeConfig, ZeroShotConfig
    from pretrain.checkpoint import normalisation_metadata, recorded_normalisation, save_weights
    from pretrain.config import load_config

    weights = tmp_path / "run" / "model.safetensors"
    save_weights(weights, {"w": torch.zeros(1)}, {"objective": "mae", **normalisation_metadata((0.3,) * 3, (0.4,) * 3)})
    assert recorded_normalisation(weights) == ((0.3,) * 3, (0.4,) * 3)
    assert recorded_normalisation(tmp_path / "run") == ((0.3,) * 3, (0.4,) * 3)  # a folder holding it

    for schema in (KNNConfig, LinearProbeConfig):
        cfg = load_config(schema, None, [f"encoder.checkpoint={weights}"])
        assert (cfg.data.mean, cfg.data.std) == ((0.3,) * 3, (0.4,) * 3)
    pixels = load_config(KNNConfig, None, ["encoder.source=pixels"])  # no encoder: the schema's default
    assert (pixels.data.mean, pixels.data.std) == (IMAGENET_MEAN, IMAGENET_STD)
    zero_shot = load_config(ZeroShotConfig, None, [f"model.checkpoint={weights}"])
    assert zero_shot.data.mean == (0.3,) * 3

    with caplog.at_level(logging.WARNING, logger="pretrain.config"):
        cfg = load_config(KNNConfig, None, [f"encoder.checkpoint={weights}", "data.mean=[0.5,0.5,0.5]",
                                            "data.std=[0.4,0.4,0.4]"])
    assert cfg.data.mean == (0.5,) * 3  # what the config says, but said
    assert [record.getMessage() for record in caplog.records] == [
        f"data.mean [0.5, 0.5, 0.5] / data.std [0.4, 0.4, 0.4] differ from the statistics {weights} was trained with "
        "([0.3, 0.3, 0.3] / [0.4, 0.4, 0.4]): its inputs will not look as they did in training"]

    # weights that record nothing (other origins, older runs), or no file at all: the schema's default, silently
    save_weights(tmp_path / "plain.safetensors", {"w": torch.zeros(1)})
    for path in (tmp_path / "plain.safetensors", tmp_path / "missing"):
        assert recorded_normalisation(path) is None
        assert load_config(KNNConfig, None, [f"encoder.checkpoint={path}"]).data.mean == IMAGENET_MEAN


def test_an_open_clip_export_is_read_for_its_preprocessing_statistics(tmp_path):
    from pretrain.checkpoint import recorded_normalisation

    export = tmp_path / "open_clip"
    export.mkdir()
    (export / "open_clip_config.json").write_text(
        '{"model_cfg": {}, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}')
    assert recorded_normalisation(export) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
