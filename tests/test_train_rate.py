"""benchmarks/train_rate.py runs the real loop from memory and from the shards and reports both rates."""
from __future__ import annotations

import json

import pytest
from benchmark_helpers import load_benchmark


@pytest.mark.usefixtures("single_thread")
def test_train_rate_rows_and_json(tmp_path, capsys, micro_model, tiny_shards):
    train_dir, val_dir = tiny_shards
    overrides = [f"model.name={micro_model}", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
                 "train.batch_size=8", "train.mixed_precision=no"]
    result = load_benchmark("train_rate").main(["--steps", "4", "--workers", "0", "--rounds", "1", "--compile",
                                                "--set", *overrides, "--json", str(tmp_path / "rate.json")])
    rows = {row["row"]: row for row in result["rows"]}
    assert set(rows) == {"step only (batches in memory)", "end to end, 0 workers",
                         "step only, torch.compile (train.compile)"}
    assert rows["step only (batches in memory)"]["vs_step_only"] == 1.0
    assert rows["step only (batches in memory)"]["vs_step_only_median"] == 1.0
    end_to_end = rows["end to end, 0 workers"]  # one round: its paired ratio is the ratio of the bests
    assert end_to_end["vs_step_only_median"] == pytest.approx(end_to_end["vs_step_only"])
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert json.loads((tmp_path / "rate.json").read_text()) == result
    assert len(result["data_only_images_per_s"]) == 1 and result["data_only_images_per_s"][0] > 0
    assert result["data_only_vs_step_time"] > 0
    out = capsys.readouterr().out
    assert "| end to end, 0 workers |" in out and "| step only, torch.compile (train.compile) |" in out
    assert "The data path alone (0 workers, no step" in out
