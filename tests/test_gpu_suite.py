"""benchmarks/gpu_suite.py: its smoke mode through main() (every row on the CPU with tiny stand-ins, the resume
check in-process), the peak table it computes MFU from, and the one-process FSDP config it launches on a GPU.
Structure and sanity only, never timings."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = ("mae_vit_b16", "mae_vit_l16", "clip_vit_b16")


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_prints_one_table_and_writes_the_same_figures(suite, tmp_path, capsys, single_thread):
    from pretrain.run import resolve_precision

    out = tmp_path / "suite.json"
    # --peak-tflops: a made-up peak, so that the MFU column is computed on a CPU too
    assert suite.main(["--smoke", "--peak-tflops", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len([line for line in table if line.startswith("| row |")]) == 1  # one table
    # header, rule, eager + compile per model, resume, engine loop, precision
    assert len(table) == 2 + 2 * len(MODELS) + 3

    report = json.loads(out.read_text())
    assert report["settings"]["smoke"] and report["machine"]["device"] == "cpu"
    assert report["peak"] == {"tflops": 1.0, "gpu": report["machine"]["device_name"], "source": "--peak-tflops"}
    rows = {(r["key"], r["mode"]): r for r in report["rows"]}
    assert list(rows) == [(key, mode) for key in MODELS for mode in ("eager", "compile")]
    for (key, mode), r in rows.items():
        assert r["status"] == "ok" and r["error"] is None, (key, mode, r["error"])
        assert r["images_per_s"] > 0 and r["step_s_median"] > 0 and len(r["step_s_all"]) == 2
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_s_median"])
        assert r["gflop_per_step"] > 0 and r["parameters"] > 0
        assert r["mfu"] == pytest.approx(r["achieved_tflop_per_s"] / 1.0)
        assert r["achieved_tflop_per_s"] == pytest.approx(r["gflop_per_step"] / 1e3 / r["step_s_median"])
        assert r["peak_memory_bytes"] is None  # CUDA only
        assert (r["compile_s"] is not None) == (mode == "compile")
        assert f"| {r['label']} | {r['model']} | {mode} |" in printed
    for key in MODELS:  # FLOPs are counted once per model: both rows carry the same count
        assert rows[key, "eager"]["gflop_per_step"] == rows[key, "compile"]["gflop_per_step"]
    # the ViT-L stand-in has more blocks than the ViT-B one
    assert rows["mae_vit_l16", "eager"]["gflop_per_step"] > rows["mae_vit_b16", "eager"]["gflop_per_step"]

    resume = report["fsdp_resume"]
    assert resume["error"] is None, resume
    assert resume["launch"] == "inprocess" and resume["distributed_type"] == "NO"
    assert resume["exit_codes"] == {"uninterrupted": 0, "uninterrupted_again": 0, "stopped": 0, "resumed": 0}
    assert resume["bit_identical"] and resume["max_abs_diff"] == 0 and resume["tensors_differing"] == 0
    assert resume["losses_identical"] and resume["repeat_bit_identical"]
    assert any("no FSDP" in note for note in resume["notes"])  # the CPU says what it ran instead
    assert re.search(r"\| exact resume \|.*bit-identical: yes \(max abs diff 0\)", printed)

    loop = report["engine_loop"]  # the step flags read one step late (forced on the CPU) change no weight
    assert loop["error"] is None and loop["steps"] == 8 and loop["bit_identical"] and loop["max_abs_diff"] == 0
    assert all(len(rates) == 2 and min(rates) > 0 for rates in loop["images_per_s"].values())
    assert loop["late_over_at_once"] == pytest.approx(loop["best_images_per_s"]["late"]
                                                      / loop["best_images_per_s"]["at_once"])
    assert re.search(r"\| engine loop \|.*flags read late / at once: [0-9.]+x .*same weights: yes \|", printed)

    precision = report["mixed_precision_auto"]
    assert precision["choice"] == resolve_precision("auto") == precision["engine_run"]
    assert precision["choice"] in printed.splitlines()[printed.splitlines().index(table[-1])]


def test_mfu_peaks_by_device_name(suite):
    assert suite.published_peak("NVIDIA H200")["tflops"] == 989
    assert suite.published_peak("NVIDIA H200 NVL")["tflops"] == 835
    assert suite.published_peak("NVIDIA H100 80GB HBM3")["tflops"] == 989
    assert suite.published_peak("NVIDIA H100 PCIe")["tflops"] == 756
    assert suite.published_peak("NVIDIA A100-SXM4-80GB")["tflops"] == 312
    assert suite.published_peak("NVIDIA L40S")["tflops"] == 362
    assert suite.published_peak("NVIDIA A10")["tflops"] == 125
    assert "datasheet" in suite.published_peak("NVIDIA H200")["source"]
    for unknown in ("Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 3090", "AMD EPYC"):
        assert suite.published_peak(unknown) is None


def test_the_one_process_fsdp_config_is_the_shipped_one_with_one_process(suite, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    path = suite.fsdp_1gpu_config(tmp_path / "fsdp_1gpu.yaml")
    config = load_config_from_file(str(path))
    assert config.distributed_type == "FSDP" and config.num_processes == 1 and config.num_machines == 1
    shipped = yaml.safe_load((REPO / "configs/accelerate/fsdp_1node_8gpu.yaml").read_text())
    assert yaml.safe_load(path.read_text())["fsdp_config"] == shipped["fsdp_config"]


def test_failed_and_skipped_rows_keep_the_table_whole(suite):
    spec = suite.model_specs(smoke=False)[0]
    rows = [suite.other_row(spec, "eager", "failed", "OutOfMemoryError: CUDA out of memory | 2 GiB free"),
            suite.other_row(spec, "compile", "skipped", "400 s gone, past --budget-s 360")]
    resume = {"launch": "accelerate", "model": "mae_vit_tiny_patch4 (32 px)", "batch_size": 8, "steps": 8,
              "stopped_after_step": 3, "error": "the resumed run exited 1", "distributed_type": "FSDP",
              "fsdp_version": 2}
    loop = {"model": "mae_vit_tiny_patch4", "batch_size": 8, "steps": None, "error": "RuntimeError: a | b"}
    lines = suite.table(rows, resume, loop, {"choice": "bf16"}).splitlines()
    assert len(lines) == 2 + 2 + 3
    assert all(len(re.findall(r"(?<!\\)\|", line)) == 13 for line in lines)  # 12 cells each, none split by a "|"
    assert "failed: OutOfMemoryError" in lines[2] and "skipped: 400 s gone" in lines[3]
    assert "FSDP2, 1 process, accelerate launch" in lines[4] and "FAILED: the resumed run exited 1" in lines[4]
    assert "| engine loop |" in lines[5] and "failed: RuntimeError: a \\| b" in lines[5]
