"""train.attention: the attention layers' kernel, set by the config or a rule (auto), or timed on the first step's
inputs (timed)."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from pretrain import attention_kernels
from pretrain.checkpoint import MODEL_FILE, load_train_state
from pretrain.cli import main
from pretrain.config import ConfigError, TrainConfig, load_config, MAEPretrainConfig
from pretrain.models import create_model

pytestmark = pytest.mark.usefixtures("single_thread")


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_each_distinct_layer_is_timed_on_its_recorded_inputs_and_keeps_its_faster_kernel(micro_model):
    torch.manual_seed(0)
    model = create_model(micro_model, mask_ratio=0.75).train()
    layers = attention_kernels.attention_layers(model)
    assert sorted(layers) == ["blocks.0.attn", "decoder_blocks.0.attn"]
    recorder = attention_kernels.FirstCallInputs(layers)
    with bf16_autocast():
        model(torch.randn(3, 3, 16, 16))[0].backward()
    recorder.close()
    # the encoder sees the 4 visible patches and the class token, the decoder every patch and the class token
    assert {name: tuple(args[0].shape) for name, (args, _) in recorder.inputs.items()} == {
        "blocks.0.attn": (3, 5, 32), "decoder_blocks.0.attn": (3, 17, 32)}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert "blocks.0.attn.qkv.weight" in grads
    rng = torch.get_rng_state()

    chosen, lines = attention_kernels.choose_kernels(layers, recorder.inputs, bf16_autocast)

    assert chosen.keys() == layers.keys() and set(chosen.values()) <= {"fused", "math"}
    for name, layer in layers.items():
        assert layer.fused_attn == (chosen[name] == "fused")
    assert len(lines) == 2  # two distinct shapes, each timed once
    for line in lines:  # the kept kernel is the one with the smaller time on the line
        times = {kernel: float(line.split(f"{kernel} ")[1].split(" ms")[0]) for kernel in ("fused", "math")}
        assert line.endswith(f"-> {min(times, key=times.get)}")
    # timing touched neither the weights' gradients nor the random stream the run draws its masks from
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters() if name in grads)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in grads)
    assert torch.equal(torch.get_rng_state(), rng)


def test_layers_alike_share_one_timing(micro_model):
    model = create_model(micro_model, mask_ratio=0.75, depth=3)
    layers = attention_kernels.attention_layers(model)
    recorder = attention_kernels.FirstCallInputs(layers)
    with torch.no_grad(), bf16_autocast():
        model(torch.randn(2, 3, 16, 16))
    recorder.close()
    chosen, lines = attention_kernels.choose_kernels(layers, recorder.inputs, bf16_autocast)
    assert len(chosen) == 4 and len(lines) == 2
    assert lines[0].startswith("blocks.0.attn and 2 like it [2x5x32]")
    assert len({chosen[f"blocks.{i}.attn"] for i in range(3)}) == 1


def tiny_bf16_run(tiny_args, output_dir, *overrides):
    return tiny_args(output_dir, "train.mixed_precision=bf16", "train.epochs=1", "train.log_every=1", *overrides)


def final_weights(run_dir, step=8):
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / MODEL_FILE)


def same_weights(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


def test_timed_choice_is_logged_checkpointed_and_kept_on_resume(tmp_path, tiny_args, monkeypatch, caplog):
    # a stand-in for the clock: the fused kernel "wins" everywhere, so both runs choose alike and the choice differs
    # from the math kernel that auto's rule (a CPU in bf16) would fall back to on a resume forgetting it
    timed = []

    def fused_wins(layer, args, kwargs, autocast):
        timed.append(tuple(args[0].shape))
        return {"fused": 1.0, "math": 2.0}

    monkeypatch.setattr(attention_kernels, "_time_kernels", fused_wins)
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    with caplog.at_level(logging.INFO, logger="pretrain.engine"):
        assert main(tiny_bf16_run(tiny_args, run_a, "train.attention=timed", "train.save_every=2",
                                  "train.keep_last=100")) == 0
    assert len(timed) == 2  # once per distinct layer, after the first step only
    assert "attention kernels (bf16" in caplog.text and "-> fused" in caplog.text
    expected = {"blocks.0.attn": "fused", "decoder_blocks.0.attn": "fused"}
    assert load_train_state(run_a / "checkpoints" / "step_00000002")["attention_kernels"] == expected

    assert main(tiny_bf16_run(tiny_args, run_b, "train.attention=timed", "train.save_every=2",
                              "train.stop_after_steps=4")) == 0
    monkeypatch.setattr(attention_kernels, "_time_kernels", lambda *a: pytest.fail("a resumed run timed again"))
    assert main(tiny_bf16_run(tiny_args, run_b, "train.attention=timed", "train.save_every=2",
                              "train.resume=latest")) == 0
    assert load_train_state(run_b / "checkpoints" / "step_00000008")["attention_kernels"] == expected
    assert same_weights(final_weights(run_a), final_weights(run_b))

    # a checkpoint's timed choice is kept when the run goes on under auto (runs started before auto was a rule)
    monkeypatch.setattr(attention_kernels, "_time_kernels", fused_wins)
    assert main(tiny_bf16_run(tiny_args, run_c, "train.attention=timed", "train.save_every=2",
                              "train.stop_after_steps=4")) == 0
    assert main(tiny_bf16_run(tiny_args, run_c, "train.save_every=2", "train.resume=latest")) == 0  # auto
    assert same_weights(final_weights(run_a), final_weights(run_c))


def test_bf16_auto_on_a_cpu_is_math_by_rule_and_times_nothing(tmp_path, tiny_args, monkeypatch):
    monkeypatch.setattr(attention_kernels, "_time_kernels", lambda *a: pytest.fail("auto timed kernels"))
    # bf16 on a CPU: explicit matmuls in every layer, the same weights as train.attention=math, not as fused
    runs = {kernel: tmp_path / kernel for kernel in ("auto", "math", "fused")}
    for kernel, run_dir in runs.items():
        assert main(tiny_bf16_run(tiny_args, run_dir, f"train.attention={kernel}")) == 0
        assert load_train_state(run_dir / "checkpoints" / "step_00000008")["attention_kernels"] == {}
    auto, math, fused = (final_weights(runs[kernel]) for kernel in ("auto", "math", "fused"))
    assert same_weights(auto, math) and not same_weights(auto, fused)


def test_float32_auto_and_fixed_kernels_time_nothing(tmp_path, tiny_args, monkeypatch, micro_model):
    monkeypatch.setattr(attention_kernels, "_time_kernels", lambda *a: pytest.fail("float32 auto timed kernels"))
    assert main(tiny_args(tmp_path / "fp32", "train.stop_after_steps=2")) == 0  # mixed_precision=no
    model = create_model(micro_model)
    attention_kernels.set_kernels(model, "math")
    assert not any(layer.fused_attn for layer in attention_kernels.attention_layers(model).values())


def test_an_unknown_kernel_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.attention"):
        load_config(MAEPretrainConfig, None, [f"output_dir={tmp_path}", "train.attention=flash"])
    assert TrainConfig().attention == "auto"


def test_only_timed_unsharded_and_eager_times_kernels_and_the_rule_otherwise():
    """The rules the Trainer and benchmarks/mae_speed.py share."""
    assert attention_kernels.times_kernels("timed")
    assert not any(attention_kernels.times_kernels(kernel) for kernel in ("auto", "fused", "math"))
    assert not attention_kernels.times_kernels("timed", sharded=True)
    assert not attention_kernels.times_kernels("timed", compiled=True)
    rule = attention_kernels.rule_kernel
    assert rule("auto", "cpu", "bf16") == rule("auto", "cpu", "fp16") == rule("timed", "cpu", "bf16") == "math"
    assert rule("auto", "cpu", "no") is rule("auto", "cuda", "bf16") is rule("auto", "cuda", "no") is None  # timm's
    assert rule("fused", "cpu", "bf16") == "fused" and rule("math", "cuda", "bf16") == "math"
