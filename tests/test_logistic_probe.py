"""The CLIP paper's linear probe (protocol lbfgs, finetune/logistic.py): the L-BFGS fit against scikit-learn's
LogisticRegression, the C sweep on a validation part of the training features only, the `linear_probe` task end to
end (raw pixels, a ViT's average patch token, feature folders of the `features` task), and its config errors."""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from finetune.cli import main as finetune_main
from finetune.logistic import Standardiser, fit_logistic_regression, sweep_C, validation_split

from test_knn import micro_checkpoint, torchrun_finetune


def blobs(n: int = 300, dim: int = 20, num_classes: int = 4, seed: int = 0, spread: float = 2.0):
    """Overlapping Gaussian classes (not separable: the penalty matters) -> (features [n, dim] float64, labels)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(num_classes, (n,), generator=generator)
    scales = torch.rand(dim, generator=generator) * 10  # unequal scales, as raw features have
    return ((centres[labels] + spread * torch.randn(n, dim, generator=generator)) * scales).double(), labels


# ------------------------------------------------------------------------------------------------ the solver

@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_lbfgs_fit_matches_scikit_learn(C, single_thread):
    """Same objective, same standardisation: on 300 x 20 features and 4 classes the float64 fit predicts every
    point as scikit-learn does, probabilities within ~1e-6 and coefficients within ~4e-6 (measured; asserted 1e-5
    and 1e-4)."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    features, labels = blobs()
    standardised = Standardiser.of(features)(features)
    fit = fit_logistic_regression(standardised, labels, 4, C, max_iter=1000, tol=1e-8)
    reference = LogisticRegression(C=C, max_iter=10_000, tol=1e-10).fit(standardised.numpy(), labels.numpy())
    assert fit.converged and 0 < fit.iterations < 1000
    probabilities = fit.logits(standardised).softmax(dim=1)
    expected = torch.from_numpy(reference.predict_proba(standardised.numpy()))
    assert torch.equal(probabilities.argmax(dim=1), expected.argmax(dim=1))
    assert (probabilities - expected).abs().max() < 1e-5
    assert (fit.weight - torch.from_numpy(reference.coef_)).abs().max() < 1e-4
    assert (fit.bias - torch.from_numpy(reference.intercept_)).abs().max() < 1e-4


def test_standardiser_is_scikit_learns_standard_scaler():
    pytest.importorskip("sklearn")
    from sklearn.preprocessing import StandardScaler

    features, _ = blobs(n=50, dim=6)
    features[:, 2] = 3.7  # a constant dimension keeps scale 1 in both
    expected = StandardScaler().fit_transform(features.numpy())
    assert torch.allclose(Standardiser.of(features)(features), torch.from_numpy(expected), atol=1e-12)


def test_float32_fit_predicts_as_float64(single_thread):
    features, labels = blobs(seed=1)
    standardised = Standardiser.of(features)(features)
    exact = fit_logistic_regression(standardised, labels, 4, C=1.0)
    fast = fit_logistic_regression(standardised.float(), labels, 4, C=1.0)
    agree = (exact.logits(standardised).argmax(1) == fast.logits(standardised.float()).argmax(1)).double().mean()
    assert fast.weight.dtype == torch.float32 and agree >= 0.99


def test_validation_split_is_a_seeded_partition():
    fit, val = validation_split(103, 0.1, seed=4)
    assert len(val) == 10 and sorted(torch.cat([fit, val]).tolist()) == list(range(103))
    assert torch.equal(validation_split(103, 0.1, seed=4)[1], val)
    assert not torch.equal(validation_split(103, 0.1, seed=5)[1], val)


def test_sweep_keeps_the_C_of_the_best_validation_accuracy(single_thread):
    """Every grid C is fit on the training part and measured on the carved validation part; refinement bisects
    around the best; the choice is the best of all tried (the smaller C on a tie)."""
    features, labels = blobs(n=400, spread=3.0, seed=2)
    seen = []
    sweep = sweep_C(features, labels, 4, [1e-4, 1e-2, 1.0, 100.0], val_fraction=0.25, seed=3, refine=1,
                    tol=1e-6, report=seen.append)
    assert (sweep.num_fit, sweep.num_val) == (300, 100) and len(seen) == len(sweep.results)
    tried = [result["C"] for result in sweep.results]
    assert tried == sorted(tried) and len(tried) in (5, 6)  # the grid + 1 or 2 geometric midpoints
    best = max(result["top1"] for result in sweep.results)
    assert sweep.C == min(result["C"] for result in sweep.results if result["top1"] == best)
    # each result is the accuracy of that C fit from scratch on the split (warm starts change no solution)
    fit_index, val_index = validation_split(400, 0.25, seed=3)
    standardise = Standardiser.of(features[fit_index])
    for result in sweep.results:
        fit = fit_logistic_regression(standardise(features[fit_index]), labels[fit_index], 4, result["C"], tol=1e-6)
        predictions = fit.logits(standardise(features[val_index])).argmax(dim=1)
        assert 100.0 * float((predictions == labels[val_index]).double().mean()) == pytest.approx(result["top1"])


def test_patience_stops_going_up_the_grid_after_the_best(single_thread):
    features, labels = blobs(n=400, spread=3.0, seed=2)
    grid = [10.0 ** e for e in range(-5, 4)]
    full = sweep_C(features, labels, 4, grid, val_fraction=0.25, seed=3)
    early = sweep_C(features, labels, 4, grid, val_fraction=0.25, seed=3, patience=1)
    tried = [result["C"] for result in early.results]
    assert tried == grid[:len(tried)] and early.results == full.results[:len(tried)]  # the same path, cut short
    assert len(tried) == tried.index(early.C) + 2 < len(grid)  # stopped at the first C past the best


# ------------------------------------------------------------------------------------------------ the task

def lbfgs_argv(out, shards, *overrides):
    train_dir, val_dir = shards
    return [f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16", "data.num_workers=0",
            "protocol=lbfgs", "lbfgs.Cs=[0.001,0.01,0.1,1]", "lbfgs.refine=1", "lbfgs.val_fraction=0.25",
            "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false",
            "feature_batch_size=32", f"output_dir={out}", *overrides]


@pytest.fixture(scope="module")
def pixel_probe(tmp_path_factory, tiny_shards, single_thread):
    out = tmp_path_factory.mktemp("lbfgs") / "pixels"
    assert finetune_main(lbfgs_argv(out, tiny_shards, "encoder.source=pixels")) == 0
    return out


def test_lbfgs_probe_on_raw_pixels_writes_metrics_and_confusion_matrix(pixel_probe):
    metrics = json.loads((pixel_probe / "metrics.json").read_text())
    assert metrics["protocol"] == "lbfgs" and metrics["encoder"] == "raw pixels" and metrics["feature_dim"] == 768
    assert metrics["num_train"] == 64 and (metrics["num_fit_split"], metrics["num_val_split"]) == (48, 16)
    assert metrics["num_samples"] == 16 and 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["C"] in [result["C"] for result in metrics["sweep"]] and len(metrics["sweep"]) >= 5
    assert all({"C", "top1", "iterations", "converged"} <= set(result) for result in metrics["sweep"])
    assert metrics["iterations"] >= 0 and metrics["dtype"] == "float64" and metrics["num_classes"] == 10
    assert (pixel_probe / "confusion_matrix.png").stat().st_size > 0


def test_lbfgs_probe_of_a_vit_average_patch_token(tiny_shards, micro_model, tmp_path, single_thread):
    checkpoint = micro_checkpoint(tmp_path / "vit", micro_model)
    out = tmp_path / "probe"
    assert finetune_main(lbfgs_argv(out, tiny_shards, f"encoder.checkpoint={checkpoint}", "feature.pool=avg")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature"] == "avg" and metrics["feature_dim"] == 32 and "MAE checkpoint" in metrics["encoder"]
    assert metrics["protocol"] == "lbfgs" and (out / "confusion_matrix.png").is_file()


def test_the_evaluation_labels_never_choose_C(pixel_probe, tiny_shards, tmp_path, single_thread):
    """The same training shards with evaluation shards whose labels are shuffled: the same sweep and C."""
    from data import ShardOptions, read_embedded, write_labelled_shards

    class_names, samples = read_embedded()
    val_samples = list(itertools.islice(iter(samples), 64, 80))
    shuffled = [dataclasses.replace(sample, label=(sample.label + 3) % 10) for sample in val_samples]
    write_labelled_shards(shuffled, tmp_path / "val", class_names, prefix="val", options=ShardOptions(progress=False))
    out = tmp_path / "probe"
    assert finetune_main(lbfgs_argv(out, (tiny_shards[0], tmp_path / "val"), "encoder.source=pixels")) == 0
    metrics, original = (json.loads((path / "metrics.json").read_text()) for path in (out, pixel_probe))
    assert metrics["sweep"] == original["sweep"] and metrics["C"] == original["C"]
    assert metrics["top1"] != original["top1"] or metrics["top5"] != original["top5"]


@pytest.mark.parametrize("protocol", ["lbfgs", "mae"])
def test_probe_of_exported_feature_folders_equals_extracting(protocol, pixel_probe, tiny_shards, tmp_path,
                                                             single_thread):
    exported = tmp_path / "features"
    train_dir, val_dir = tiny_shards
    assert finetune_main(["task=features", "encoder.source=pixels", f"data.train={train_dir}",
                          f"data.val={val_dir}", "data.image_size=16", "data.num_workers=0", "train.batch_size=16",
                          "train.mixed_precision=no", "logging.progress_bar=false", "chunk_size=20",
                          f"output_dir={exported}"]) == 0
    mae_keys = ["train.epochs=2", "train.batch_size=16", "optim.warmup_epochs=1"]
    runs = {"extracting": [], "files": [f"train_features={exported / 'train'}", f"val_features={exported / 'val'}"]}
    metrics = {}
    for name, overrides in runs.items():
        if protocol == "lbfgs" and name == "extracting":
            metrics[name] = json.loads((pixel_probe / "metrics.json").read_text())
            continue
        out = tmp_path / name
        argv = lbfgs_argv(out, tiny_shards, "encoder.source=pixels", f"protocol={protocol}", *overrides,
                          *(mae_keys if protocol == "mae" else []))
        assert finetune_main(argv) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert metrics["files"] == metrics["extracting"] and metrics["files"]["protocol"] == protocol


def test_two_process_lbfgs_probe_equals_one_process(pixel_probe, tiny_shards, tmp_path):
    """Each process extracts its share; the training features are gathered and sorted by key, so both fit the
    one-process model; each evaluates its share of data.val and the counts are summed."""
    out = tmp_path / "two"
    torchrun_finetune(*lbfgs_argv(out, tiny_shards, "encoder.source=pixels", "feature_batch_size=8"))
    assert json.loads((out / "metrics.json").read_text()) == json.loads((pixel_probe / "metrics.json").read_text())
    assert (out / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("override, message", [
    ("lbfgs.Cs=[0.1,0]", "error: 'lbfgs.Cs' must be a non-empty list of positive numbers, got [0.1, 0.0]"),
    ("lbfgs.Cs=[]", "error: 'lbfgs.Cs' must be a non-empty list of positive numbers, got []"),
    ("lbfgs.val_fraction=1.5", "error: 'lbfgs.val_fraction' must be in (0, 1), got 1.5"),
    ("lbfgs.val_fraction=0", "error: 'lbfgs.val_fraction' must be in (0, 1), got 0.0"),
    ("protocol=sgd", "error: 'protocol' must be one of 'mae', 'lbfgs', got 'sgd'"),
])
def test_bad_lbfgs_settings_are_one_clear_error(override, message, tiny_shards, tmp_path, capsys):
    assert finetune_main(lbfgs_argv(tmp_path / "x", tiny_shards, "encoder.source=pixels", override)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
