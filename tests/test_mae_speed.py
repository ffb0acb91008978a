"""benchmarks/mae_speed.py in its smoke mode, the full-grid ablation it measures (`encoder_mask_tokens`), and
`train.compile` (torch.compile of the training step): the same losses as eager. Structure and sanity only, never
timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from pretrain.models import MaskedAutoencoderViT, create_model

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("mae_speed", REPO / "benchmarks" / "mae_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_row_with_positive_figures(tmp_path, capsys, single_thread):
    pytest.importorskip("transformers", reason="the benchmark extra: pip install -e .[bench]")
    out = tmp_path / "mae_speed.json"
    assert load_benchmark().main(["--smoke", "--json", str(out)]) == 0
    assert "| precision | model |" in capsys.readouterr().out

    report = json.loads(out.read_text())
    assert report["settings"]["model"] == "mae_vit_tiny_patch4" and report["settings"]["hf_attention"]
    results = {(r["precision"], r["row"]): r for r in report["results"]}
    assert {("fp32", "ours"), ("fp32", "hf"), ("fp32", "full_grid")} <= set(results)
    for r in results.values():
        for key in ("step_s_median", "images_per_s", "gflop_per_step", "achieved_gflop_per_s", "share_of_matmul",
                    "peak_memory_bytes", "persistent_bytes", "parameters"):
            assert r[key] > 0, (r["row"], key)
        assert r["peak_memory_bytes"] >= r["persistent_bytes"]
    ours, hf, full = results["fp32", "ours"], results["fp32", "hf"], results["fp32", "full_grid"]
    assert ours["vs_hf"] > 0 and hf["vs_hf"] == pytest.approx(1.0)
    # Same sizes: the same parameter count and (to rounding of the qkv split) the same FLOPs per step.
    assert ours["parameters"] == hf["parameters"]
    assert ours["gflop_per_step"] == pytest.approx(hf["gflop_per_step"], rel=0.02)
    assert full["gflop_per_step"] > 1.5 * ours["gflop_per_step"]  # the encoder sees 4x the tokens
    assert report["matmul_gflop_per_s"]["fp32"]["encoder_mlp"] > 0
    if not report["machine"]["cpu_has_fast_bf16"] and report["machine"]["device"] == "cpu":
        assert "bf16" in report["skipped"]
    assert {t["target"] for t in report["targets"]} >= {">= 1.0x HF"}


def test_bf16_rows_choose_the_attention_kernels_as_the_trainer_does(tmp_path, single_thread):
    # forced bf16 (reference kernels on a CPU without bf16 units: slow, but the smoke model is tiny)
    def kernels(*extra):
        out = tmp_path / "bf16.json"
        assert load_benchmark().main(["--smoke", "--precisions", "bf16", "--rows", "ours,ours_fused_attention",
                                      "--no-memory", "--json", str(out), *extra]) == 0
        results = {r["row"]: r for r in json.loads(out.read_text())["results"]}
        assert results["ours_fused_attention"]["gflop_per_step"] == pytest.approx(results["ours"]["gflop_per_step"])
        return results["ours"]["attention_kernels"], results["ours_fused_attention"]["attention_kernels"]

    # the Trainer's default, auto: explicit matmuls on a CPU in bf16, by rule
    assert kernels() == (["every layer: math (train.attention auto)"], ["every layer: fused (train.attention fused)"])
    chosen, _ = kernels("--attention", "timed")  # encoder and decoder blocks: two shapes, each timed once
    assert len(chosen) == 2 and chosen[0].startswith("blocks.0.attn and 5 like it [2x17x192]")
    assert all(line.endswith(("-> fused", "-> math")) for line in chosen)


def test_encoder_mask_tokens_runs_the_encoder_over_the_full_grid():
    torch.manual_seed(0)
    default = create_model("mae_vit_tiny_patch4")
    full = create_model("mae_vit_tiny_patch4", encoder_mask_tokens=True)
    assert "encoder_mask_token" not in default.state_dict()  # the released layout is untouched
    assert set(full.state_dict()) - set(default.state_dict()) == {"encoder_mask_token"}
    MaskedAutoencoderViT(**full.config).load_state_dict(full.state_dict())  # the config rebuilds it

    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, full.num_patches)
    latent, mask, _ = full.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + full.num_patches, 192)
    assert torch.equal(mask, default.forward_encoder(imgs, 0.75, noise)[1])  # same noise, same mask
    loss, pred, mask = full(imgs, noise=noise)
    assert pred.shape == (2, full.num_patches, 4 * 4 * 3) and mask.sum() == 2 * 48 and torch.isfinite(loss)
    loss.backward()
    assert full.encoder_mask_token.grad.abs().sum() > 0


def test_train_compile_trains_like_eager_and_checkpoints_plain_weights(tmp_path, tiny_args, single_thread):
    import torch._inductor.config as inductor_config

    # compiled torch.rand draws eager's masks; torch's own patch, as monkeypatch's undo deleted the setting for
    # good (torch.export reads it later, e.g. the ONNX export tests)
    with inductor_config.patch(fallback_random=True):
        _compiled_and_eager_runs(tmp_path, tiny_args)


def _compiled_and_eager_runs(tmp_path, tiny_args):
    from pretrain.checkpoint import find_latest, read_weights
    from pretrain.cli import main

    losses, weights = {}, {}
    for name, compile_flag in (("eager", "false"), ("compiled", "true")):
        out = tmp_path / name
        argv = tiny_args(out, f"train.compile={compile_flag}", "train.stop_after_steps=2", "train.log_every=1",
                         "num_pictures=2")
        try:
            assert main(argv) == 0
        except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor on this machine
            if name == "compiled" and any(w in f"{type(err).__module__} {err}".lower() for w in ("inductor", "dynamo")):
                pytest.skip(f"torch.compile cannot compile here: {type(err).__name__}: {str(err)[:200]}")
            raise
        losses[name] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        weights[name], _ = read_weights(find_latest(out / "checkpoints"))
        assert (out / "reconstructions.png").is_file()
    assert len(losses["compiled"]) == 2 and losses["eager"][1] != losses["eager"][0]
    # the second loss is after one AdamW update: the compiled step moved the weights as the eager one did
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)
    assert set(weights["compiled"]) == set(weights["eager"])  # no "_orig_mod." prefixes in the checkpoint
    for key, value in weights["eager"].items():
        assert torch.allclose(weights["compiled"][key], value, rtol=1e-4, atol=1e-6), key
