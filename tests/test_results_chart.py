"""benchmarks/results_chart.py: the results picture drawn from the summary rows the benchmark scripts write, and
linear_probe.py's summary rows (the best MAE probe and k-NN against the same probe of each baseline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


load = load_benchmark


ROWS = [  # linear_probe.py's rows, abridged
    {"features": "MAE pretrained, cls", "probe": "MAE protocol (LARS)", "top1": 83.9},
    {"features": "MAE pretrained, cls", "probe": "L-BFGS protocol", "top1": 85.5},
    {"features": "MAE pretrained, cls+avg", "probe": "L-BFGS protocol", "top1": 87.1},
    {"features": "MAE pretrained, cls+avg", "probe": "k-NN (k=20)", "top1": 82.4},
    {"features": "MAE pretrained, cls", "probe": "k-NN (k=20)", "top1": 81.8},
    {"features": "random init (same ViT), cls", "probe": "MAE protocol (LARS)", "top1": 64.0},
    {"features": "random init (same ViT), cls", "probe": "L-BFGS protocol", "top1": 72.6},
    {"features": "random init (same ViT), cls", "probe": "k-NN (k=20)", "top1": 55.8},
    {"features": "raw pixels", "probe": "MAE protocol (LARS)", "top1": 85.25},
    {"features": "raw pixels", "probe": "L-BFGS protocol", "top1": 85.38},
    {"features": "raw pixels", "probe": "scikit-learn LogisticRegression (same C, same standardisation)", "top1": 99},
    {"features": "raw pixels", "probe": "k-NN (k=20)", "top1": 85.25},
]


def test_linear_probe_summary_takes_each_encoders_best_under_the_same_kind_of_probe():
    summary = load("linear_probe").summary_rows(ROWS)
    assert summary == [
        {"row": "MAE tiny ViT, linear probe", "metric": "top-1 (%)", "value": 87.1, "target": 88.0,
         "baselines": {"raw pixels": 85.38, "random init": 72.6}},  # scikit-learn's check is not a probe of ours
        {"row": "MAE tiny ViT, k-NN (k=20)", "metric": "top-1 (%)", "value": 82.4, "target": 85.0,
         "baselines": {"raw pixels": 85.25, "random init": 55.8}},
    ]
    assert load("linear_probe").summary_rows([row for row in ROWS if not row["features"].startswith("MAE")]) == []


def test_linear_probe_keeps_the_other_encoders_rows_from_an_earlier_run():
    """--encoders mae --keep-rows: a new MAE's rows replace the earlier MAE's; the baselines' rows are kept."""
    probe = load("linear_probe")
    labels = {"mae": ["MAE pretrained, cls", "MAE pretrained, avg", "MAE pretrained, cls+avg"],
              "random": ["random init (same ViT), cls"], "pixels": ["raw pixels"]}
    new_mae = [{"features": "MAE pretrained, cls+avg", "probe": "L-BFGS protocol", "top1": 88.9}]
    rows = probe.with_kept_rows({"mae": new_mae}, ROWS, ["random", "pixels"], labels)
    assert rows == new_mae + ROWS[5:]  # the earlier MAE rows dropped, the rest in the encoders' order
    assert probe.summary_rows(rows)[0]["value"] == 88.9 and probe.summary_rows(rows)[0]["baselines"] == {
        "raw pixels": 85.38, "random init": 72.6}
    # nothing kept: only what was measured
    assert probe.with_kept_rows({"mae": new_mae}, ROWS, [], labels) == new_mae


def test_wall_times_sum_every_steps_seconds_and_say_where_they_ran(tmp_path):
    """Each file's hours and the total; where: the hours on each kind of machine its stretches recorded (the rates
    as a range), the time no stretch accounts for (timed before machines were recorded) as not recorded."""
    epyc = {"cpu": "AMD EPYC", "cores": 2, "bf16_units": ["avx512_bf16"]}
    finetune, clip = tmp_path / "finetune.json", tmp_path / "clip.json"
    finetune.write_text(json.dumps({
        "seconds": {"MAE pretraining": 1800.0, "finetune from MAE": 3600.0},
        # the finetune resumed on a slower machine of the same kind; the MAE timed before machines were recorded
        "machines": {"finetune from MAE": [
            {"seconds": 1800.0, "ended": "2026-12-07 23:00 UTC",
             "machine": {**epyc, "matmul_gflops": {"float32": 144, "bfloat16": 396}}},
            {"seconds": 1800.0, "ended": "2026-12-08 10:00 UTC",
             "machine": {**epyc, "matmul_gflops": {"float32": 90, "bfloat16": 210}}}]}}))
    clip.write_text(json.dumps({"summary": [], "seconds": {"CLIP pretraining": 1800.0}, "machines": {
        "CLIP pretraining": [{"seconds": 1800.0, "ended": "2026-12-08 11:00 UTC", "machine": {
            "cpu": "Intel Xeon", "cores": 2, "bf16_units": [], "matmul_gflops": {"float32": 300}}}]}}))
    assert load("results_chart").wall_times([finetune, clip]) == [
        "| results | steps | wall time (h) | where (h) |", "|---|---:|---:|---|",
        "| finetune.json | 2 | 1.50 | AMD EPYC, 2 cores, avx512_bf16 (bf16 matmul 210-396 GFLOP/s): 1.00; "
        "not recorded: 0.50 |",
        "| clip.json | 1 | 0.50 | Intel Xeon, 2 cores (float32 matmul 300 GFLOP/s): 0.50 |",
        "| all | | **2.00** | AMD EPYC, 2 cores, avx512_bf16 (bf16 matmul 210-396 GFLOP/s): 1.00; "
        "Intel Xeon, 2 cores (float32 matmul 300 GFLOP/s): 0.50; not recorded: 0.50 |"]


def test_target_label_names_a_baseline_set_target_and_says_when_it_is_missed():
    target_text = load("results_chart").target_text
    assert target_text({"value": 93.4, "target": 93.0}) == "target 93"
    assert target_text({"value": 92.8, "target": 93.0}) == "target 93: missed"
    assert target_text({"value": 91.6, "target": 91.89, "target_label": "mean single + 1"}) == (
        "target 91.9 (mean single + 1): missed")
    assert target_text({"value": 75.6, "target": 73.92, "target_label": "no distillation + 1"}) == (
        "target 73.9 (no distillation + 1)")


def test_chart_draws_every_summary_row_and_refuses_files_without_one(tmp_path, capsys):
    chart = load("results_chart")
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"rows": ROWS, "summary": load("linear_probe").summary_rows(ROWS)}))
    detr = tmp_path / "detr.json"
    detr.write_text(json.dumps({"summary": [{"row": "DETR, AP50", "metric": "AP50 (%)", "value": 51.0,
                                             "target": 50, "baselines": {}}]}))
    empty = tmp_path / "old.json"
    empty.write_text(json.dumps({"rows": []}))
    out = tmp_path / "docs" / "chart.png"
    assert chart.main([str(probe), str(detr), str(empty), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "3 rows drawn" in captured.out and f"{empty}: no summary rows, left out" in captured.err
    assert "| detr.json | 0 | not recorded |" in captured.out and "| all | | **0.00** |" in captured.out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.height > image.width / 4

    assert chart.main([str(empty), "--out", str(tmp_path / "none.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: none of the files holds summary rows")
    assert chart.main([str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such file: {tmp_path / 'missing.json'}"
    assert not (tmp_path / "none.png").exists()


def test_finetune_and_clip_summaries_name_each_method_its_baselines_and_target():
    finetuned = {"MAE pretrained": {"top1": 93.4}, "from scratch": {"top1": 88.0}}
    students = {"none": {"top1": 85.0}, "soft": {"top1": 85.5}, "hard": {"top1": 86.2}}
    assert load("finetune_fmnist").summary_rows(finetuned, {"top1": 93.1}, students) == [
        {"row": "MAE tiny ViT -> finetune", "metric": "top-1 (%)", "value": 93.4, "target": 93.0,
         "baselines": {"same ViT from scratch": 88.0}},
        {"row": "DeiT teacher (ResNet-18 from scratch)", "metric": "top-1 (%)", "value": 93.1, "target": 93.0,
         "baselines": {}},
        {"row": "DeiT student, hard distillation", "metric": "top-1 (%)", "value": 86.2, "target": 86.0,
         "target_label": "no distillation + 1",
         "baselines": {"no distillation": 85.0, "soft distillation": 85.5, "teacher": 93.1}},
    ]
    rows = [{"top1": 88.5, "mean_single_template_top1": 86.9, "best_single_template_top1": 88.0}]
    retrieval = {"image_to_text_R@1": 1.5, "text_to_image_R@1": 0.9, "num_pairs": 6000}
    zero_shot, ensemble, recall = load("clip_zeroshot").summary_rows(rows, retrieval)
    assert zero_shot["value"] == 88.5 and zero_shot["target"] == 88.0 and zero_shot["baselines"] == {"chance": 10.0}
    assert ensemble["value"] == 88.5 and ensemble["target"] == pytest.approx(87.9)
    assert ensemble["target_label"] == "mean single + 1"
    assert ensemble["baselines"] == {"mean single template": 86.9, "best single template": 88.0}
    assert recall["value"] == 1.5 and recall["baselines"] == {"text->image R@1": 0.9, "chance": 100 / 6000}
    detr = load("detr_fmnist").summary_rows({"history": [{"AP50": 0.1, "AP": 0.05}, {"AP50": 0.52, "AP": 0.27}]})
    assert [(row["row"], row["value"], row["target"]) for row in detr] == [
        ("DETR on the canvases, AP50", 52.0, 50.0), ("DETR on the canvases, AP", 27.0, 25.0)]
