"""`python -m finetune.export`: ours -> Hugging Face ViTMAE / ViTModel -> the same outputs, Hugging Face -> ours ->
the same outputs (and pretraining continues from it), ONNX against torch through the CLI, and the model card
listing what the run recorded. No network: the Hugging Face models are small, random and saved locally."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from finetune.cli import main as finetune_main
from finetune.export import main as export_main
from pretrain.checkpoint import read_weights_metadata, recorded_normalisation
from pretrain.cli import main as pretrain_main
from pretrain.config import EncoderConfig
from pretrain.encoders import build_encoder, encoder_of, pretraining_model_from_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, micro_model, tiny_shards, single_thread):
    """A micro MAE pretrained through `python -m pretrain`, k-NN monitoring on (the run's own metrics.json)."""
    train_dir, val_dir = tiny_shards
    out = tmp_path_factory.mktemp("mae_run")
    argv = [f"model.name={micro_model}", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
            "data.num_workers=0", "train.batch_size=8", "train.epochs=1", "train.mixed_precision=no",
            "eval.every_epochs=1", "eval.k=5", "logging.wandb=disabled", "logging.progress_bar=false",
            "num_pictures=0", f"output_dir={out}"]
    assert pretrain_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory, mae_run, tiny_shards, single_thread):
    train_dir, val_dir = tiny_shards
    out = tmp_path_factory.mktemp("knn") / "run"
    assert finetune_main(["task=knn", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
                          "data.num_workers=0", "train.batch_size=16", "train.mixed_precision=no",
                          "logging.progress_bar=false", "k=[5]", f"encoder.checkpoint={mae_run}",
                          f"output_dir={out}"]) == 0
    return out


def _images_and_noise(n=3, channels=3, size=16, patches=16):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=generator), torch.rand(n, patches, generator=generator)


def test_hf_export_gives_the_same_loss_prediction_and_mask(mae_run, knn_run, tmp_path):
    out = tmp_path / "hf"
    assert export_main(["hf", str(mae_run), "--out", str(out), "--eval", str(knn_run)]) == 0
    ours, _ = pretraining_model_from_checkpoint(mae_run)
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    images, noise = _images_and_noise()
    with torch.no_grad():
        loss, pred, mask = ours.eval()(images, noise=noise)
        outputs = hf.eval()(pixel_values=images, noise=noise)
    assert torch.equal(mask, outputs.mask)
    torch.testing.assert_close(outputs.logits, pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs.loss, loss, atol=1e-6, rtol=0)
    # the image processor carries the run's normalisation
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    mean, std = recorded_normalisation(mae_run)
    assert processor.image_mean == pytest.approx(list(mean)) and processor.image_std == pytest.approx(list(std))
    assert processor.size == {"height": 16, "width": 16}


def test_model_card_lists_what_the_run_recorded(mae_run, knn_run, tmp_path):
    out = tmp_path / "hf"
    assert export_main(["hf", str(mae_run), "--out", str(out), "--eval", str(knn_run)]) == 0
    card = (out / "README.md").read_text()
    monitor = json.loads((mae_run / "metrics.json").read_text())
    knn = json.loads((knn_run / "metrics.json").read_text())
    meta = json.loads(next((mae_run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"- steps: {meta['step']} (1 epochs)" in card
    assert "| samples | 64 |" in card and "T-shirt/top" in card  # the training shards' stats.json
    assert f"knn_top1 {monitor['knn_top1']:.4g}" in card  # the pretraining run's k-NN monitor
    assert f"k/5/top1 {knn['k']['5']['top1']:.4g}" in card and f"`{knn_run}` | task knn" in card  # the --eval run
    assert "mask ratio: 0.75" in card and '"embed_dim": 32' in card
    assert f"python -m finetune.export hf {mae_run} --out {out} --eval {knn_run}" in card
    assert f'ViTMAEForPreTraining.from_pretrained("{out}")' in card
    assert f'upload_folder(repo_id="YOUR_NAME/hf", folder_path="{out}")' in card
    assert meta["mixed_precision"] == "no" and "accumulation; mixed precision no\n" in card


def test_model_card_shows_what_mixed_precision_auto_resolved_to(mae_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mae_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["mixed_precision"] = "auto"  # as a run on the default config records it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert export_main(["hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "accumulation; mixed precision auto -> no\n" in (tmp_path / "hf" / "README.md").read_text()


def test_hf_encoder_export_gives_our_encoders_hidden_states(mae_run, tmp_path):
    out = tmp_path / "vit"
    assert export_main(["hf", str(mae_run), "--out", str(out), "--encoder-only"]) == 0
    vit, info = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours, _ = pretraining_model_from_checkpoint(mae_run)
    images, _ = _images_and_noise()
    with torch.no_grad():
        expected = encoder_of(ours, 16).forward_features(images)  # every token, after the final norm
        hidden = vit.eval()(pixel_values=images).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)


def _small_hf_mae(folder, **config):
    """A randomly initialised Hugging Face ViTMAE saved the way the Hub's facebook/vit-mae-* are (transformers'
    own defaults: LayerNorm eps 1e-12), with an image processor."""
    torch.manual_seed(0)
    cfg = transformers.ViTMAEConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, norm_pix_loss=True, **config)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.3, 0.3, 0.3],
                                   image_std=[0.35, 0.35, 0.35]).save_pretrained(folder)
    return model


def test_hf_import_gives_the_same_outputs_and_feeds_pretraining_and_heads(tmp_path, tiny_args, tiny_shards,
                                                                           single_thread):
    hf = _small_hf_mae(tmp_path / "hf")
    ours_dir = tmp_path / "ours"
    assert export_main(["from-hf", str(tmp_path / "hf"), "--out", str(ours_dir)]) == 0
    ours, _ = pretraining_model_from_checkpoint(ours_dir)
    assert ours.config["norm_eps"] == 1e-12 and ours.config["depth"] == 2
    images, noise = _images_and_noise()
    with torch.no_grad():
        loss, pred, mask = ours.eval()(images, noise=noise)
        outputs = hf(pixel_values=images, noise=noise)
    assert torch.equal(mask, outputs.mask)
    torch.testing.assert_close(pred, outputs.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, outputs.loss, atol=1e-6, rtol=0)
    assert recorded_normalisation(ours_dir) == ((0.3, 0.3, 0.3), (0.35, 0.35, 0.35))
    assert "model.checkpoint=" in (ours_dir / "README.md").read_text()

    # any head takes it: its encoder is the model just compared with HF's
    encoder = build_encoder(EncoderConfig(checkpoint=str(ours_dir), global_pool=None, drop_path=0.0), 16).model
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in ours.encoder_state_dict().items())
    assert encoder.norm.eps == 1e-12

    # pretraining continues from it, in its architecture
    run = tmp_path / "continued"
    assert pretrain_main(tiny_args(run, f"model.checkpoint={ours_dir}", "train.stop_after_steps=2")) == 0
    continued = read_weights_metadata(run)
    assert json.loads(continued["model_config"])["depth"] == 2 and continued["model_name"] == "hf_vit_mae"


def test_hf_import_of_an_encoder_alone_keeps_our_decoder_initialised(tmp_path):
    hf = _small_hf_mae(tmp_path / "full")
    hf.vit.save_pretrained(tmp_path / "encoder")  # a ViTMAEModel: no decoder, no "vit." prefix
    assert export_main(["from-hf", str(tmp_path / "encoder"), "--out", str(tmp_path / "ours")]) == 0
    ours, _ = pretraining_model_from_checkpoint(tmp_path / "ours")
    full = tmp_path / "full_ours"
    assert export_main(["from-hf", str(tmp_path / "full"), "--out", str(full)]) == 0
    expected = pretraining_model_from_checkpoint(full)[0].encoder_state_dict()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())
    assert "the file has no decoder: it is freshly initialised" in (tmp_path / "ours" / "README.md").read_text()


def test_ours_to_hf_and_back_is_the_identity(mae_run, tmp_path):
    assert export_main(["hf", str(mae_run), "--out", str(tmp_path / "hf")]) == 0
    assert export_main(["from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    before, _ = pretraining_model_from_checkpoint(mae_run)
    after, _ = pretraining_model_from_checkpoint(tmp_path / "back")
    assert before.state_dict().keys() == after.state_dict().keys()
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())


def test_onnx_export_of_an_mae_encoder_through_the_cli(mae_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    assert export_main(["onnx", str(mae_run), "--out", str(out)]) == 0
    encoder = build_encoder(EncoderConfig(checkpoint=str(mae_run), global_pool=None, drop_path=0.0)).model.eval()
    images, _ = _images_and_noise(n=5)
    session = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(features), encoder(images), atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    assert "library_name: onnx" in card and "max |onnxruntime - torch|" in card


def test_onnx_export_of_a_finetuned_classifier_gives_its_logits(mae_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from pretrain.checkpoint import save_weights
    from pretrain.encoders import CLASSIFIER_OBJECTIVE, SPEC_KEY

    # a classifier's weights file as finetuning writes it (finetune/classify.py): its spec rebuilds the model
    classifier = build_encoder(EncoderConfig(checkpoint=str(mae_run), drop_path=0.0), 16, num_classes=10)
    save_weights(tmp_path / "best" / "model.safetensors", classifier.model.state_dict(),
                 {"objective": CLASSIFIER_OBJECTIVE, SPEC_KEY: json.dumps(classifier.spec)})
    out = tmp_path / "onnx"
    assert export_main(["onnx", str(tmp_path / "best"), "--out", str(out)]) == 0
    images, _ = _images_and_noise()
    session = onnxruntime.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), classifier.model.eval()(images), atol=1e-4, rtol=0)
    assert logits.shape == (3, 10) and "-> `logits`" in (out / "README.md").read_text()


def test_onnx_export_of_other_weights_by_their_timm_name(tmp_path):
    pytest.importorskip("onnxruntime")
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "weights.safetensors")
    out = tmp_path / "onnx"
    argv = ["onnx", str(tmp_path / "weights.safetensors"), "--timm-model", "test_resnet", "--out", str(out)]
    assert export_main([*argv, "--image-size", "64"]) == 0
    card = (out / "README.md").read_text()
    assert "timm test_resnet" in card and "`images` [batch, 3, 64, 64] -> `features`" in card


def test_onnx_export_of_a_clip_runs_two_towers(tmp_path, tiny_pair_shards, single_thread):
    pytest.importorskip("onnxruntime")
    from clip_helpers import train_tiny_clip, write_tiny_clip_config

    run = train_tiny_clip(tmp_path / "clip", write_tiny_clip_config(tmp_path), tiny_pair_shards, steps=1)
    out = tmp_path / "onnx"
    assert export_main(["onnx", str(run), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"image_encoder.onnx", "text_encoder.onnx", "README.md"}
    assert "text_encoder.onnx" in (out / "README.md").read_text()


@pytest.mark.parametrize("case", ["no config", "not ours", "not empty", "missing run", "eval without metrics"])
def test_bad_input_is_one_line_and_exit_2(case, mae_run, tmp_path, capsys):
    out = tmp_path / "out"
    if case == "no config":
        argv = ["from-hf", str(tmp_path), "--out", str(out)]
    elif case == "not ours":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
        argv = ["from-hf", str(tmp_path / "hf"), "--out", str(out)]
    elif case == "not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        argv = ["hf", str(mae_run), "--out", str(out)]
    elif case == "missing run":
        argv = ["hf", str(tmp_path / "nothing"), "--out", str(out)]
    else:
        argv = ["hf", str(mae_run), "--out", str(out), "--eval", str(tmp_path)]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (out.exists() and case != "not empty")  # nothing half written
    if case == "not empty":
        assert (out / "keep.txt").read_text() == "mine"


def test_continuing_pretraining_at_another_image_size_is_a_config_error(mae_run, tiny_args, capsys):
    assert pretrain_main(tiny_args(mae_run.parent / "x", f"model.checkpoint={mae_run}", "data.image_size=32")) == 2
    assert "data.image_size=16" in capsys.readouterr().err


def test_initial_weights_from_an_official_mae_release_load_its_encoder(micro_model, tmp_path):
    from pretrain.models import create_model
    from pretrain.train_mae import load_initial_weights

    released = create_model(micro_model, img_size=16)
    torch.save({"model": released.encoder_state_dict()}, tmp_path / "mae_pretrain_micro.pth")  # no decoder, as released
    model = create_model(micro_model, img_size=16)
    decoder_before = model.decoder_pred.weight.clone()
    assert "encoder only" in load_initial_weights(model, str(tmp_path / "mae_pretrain_micro.pth"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in released.encoder_state_dict().items())
    assert torch.equal(model.decoder_pred.weight, decoder_before)
