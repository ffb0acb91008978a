"""Linear probing of frozen features, by one of two protocols (`protocol`):

- "mae", the MAE paper's (He et al. 2022): BatchNorm without affine + Linear, trained with LARS through the shared
  engine (`optim`, `train`);
- "lbfgs", the CLIP paper's (Radford et al. 2021, appendix A.3): multinomial logistic regression on standardised
  features, fit full-batch with L-BFGS, its L2 strength C chosen on a validation part carved from the training
  features and then refit on all of them (finetune/logistic.py, `lbfgs`).

The encoder is frozen and the images are not augmented, so the features (`feature`: which ones) are computed once,
or read from folders the `features` task wrote (`train_features` / `val_features`). The probe is evaluated on the
evaluation side: OUTPUT_DIR/metrics.json (top-1 / top-5 and the protocol's details) and confusion_matrix.png.
Several processes give the metrics of one: the MAE protocol trains one head on every process's share (the
engine's gradient averaging); the L-BFGS protocol gathers all training features, sorted by sample key, to every
process and fits the same model on each.

    python -m finetune --config configs/linprobe_fmnist.yaml          # protocol mae
    python -m finetune --config configs/linprobe_lbfgs_fmnist.yaml    # protocol lbfgs
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pretrain.engine import Trainer
from pretrain.metrics import TopKAccuracy
from pretrain.visualize import save_confusion_matrix

from .config import LinearProbeConfig
from .feature_sets import FeatureSet, class_names, load_feature_sets, setup_feature_run
from .logistic import Standardiser, fit_logistic_regression, sweep_C
from .tasks import ClassificationTask

log = logging.getLogger(__name__)


class LinearProbeHead(nn.Module):
    """features [B, D] -> logits [B, num_classes]. The BatchNorm (no affine) only rescales features: MAE features
    have very different scales per dimension, which a plain linear layer under LARS handles badly."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(feature_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def feature_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                    start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled passes over in-memory features; full batches only, running across passes.
    `start_batch` skips the batches a resumed run already consumed (index arithmetic, nothing recomputed)."""
    n = len(features)
    position = start_batch * batch_size  # in the concatenation of all passes
    while True:
        pass_index, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + pass_index))
        next_order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + pass_index + 1))
        indices = torch.cat([order, next_order])[offset: offset + batch_size]
        position += batch_size
        yield {"features": features[indices], "label": labels[indices]}


@torch.no_grad()
def evaluate(head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, labels: torch.Tensor,
             num_classes: int, accelerator, batch_size: int = 1024) -> TopKAccuracy:
    """This process's top-k counts and confusion matrix of `head` (features [B, D] -> logits [B, num_classes]) on
    its evaluation features; `.result(accelerator)` sums them over processes, each sample counted once."""
    accuracy = TopKAccuracy(num_classes)
    for start in range(0, len(features), batch_size):
        logits = head(features[start:start + batch_size].to(accelerator.device))
        accuracy.update(logits, labels[start:start + batch_size])
    return accuracy


def run_linear_probe(cfg: LinearProbeConfig) -> dict[str, Any]:
    run = setup_feature_run(cfg)
    accelerator = run.accelerator
    # L-BFGS fits on all training features, on every process; the MAE head trains on each process's share
    train, val, num_classes = load_feature_sets(cfg, run, cfg.feature_batch_size, whole_train=cfg.protocol == "lbfgs")
    num_train = len(train.features) if cfg.protocol == "lbfgs" else int(accelerator.reduce(
        torch.tensor(float(len(train.features)), device=accelerator.device), reduction="sum").item())
    described = train.described
    log.info("probing (%s protocol) %s: %d training and %d evaluation features of dimension %d, %d classes",
             cfg.protocol, described, num_train, len(val.features), train.features.shape[1], num_classes)

    if cfg.protocol == "lbfgs":
        head, details = lbfgs_probe(cfg, train, num_classes, accelerator)
    else:
        head, details = mae_probe(cfg, run, train, num_train, num_classes)
    accuracy = evaluate(head, val.features, val.labels, num_classes, accelerator)
    metrics = {"protocol": cfg.protocol, **accuracy.result(accelerator), "encoder": train.encoder,
               "feature": train.kind, "feature_dim": int(train.features.shape[1]), "num_classes": num_classes,
               "num_train": num_train, **details}
    confusion = accuracy.confusion_matrix(accelerator)
    if accelerator.is_main_process:
        (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        picture = save_confusion_matrix(confusion, class_names(train, num_classes),
                                        run.output_dir / "confusion_matrix.png",
                                        f"linear probe ({cfg.protocol}), {described}")
        chosen = f", C={metrics['C']:.3g}" if cfg.protocol == "lbfgs" else ""
        log.info("linear probe (%s protocol%s) of %s: top-1 %.2f%%, top-5 %.2f%% on %d images; metrics in %s, "
                 "confusion matrix in %s", cfg.protocol, chosen, described, metrics["top1"], metrics["top5"],
                 metrics["num_samples"], run.output_dir / "metrics.json", picture)
    return metrics


def mae_probe(cfg: LinearProbeConfig, run, train: FeatureSet, num_train: int, num_classes: int
              ) -> tuple[nn.Module, dict[str, Any]]:
    """The MAE protocol: train LinearProbeHead on this process's training features through the engine (LARS,
    `optim`, `train`). -> (the head in eval mode, its metrics)"""
    head = LinearProbeHead(train.features.shape[1], num_classes)
    trainer = Trainer.from_config(
        cfg, run, model=head, task=ClassificationTask(), samples_per_epoch=num_train,
        make_loader=lambda start_batch, rank, world_size: feature_batches(
            train.features, train.labels, cfg.train.batch_size, cfg.train.seed * 1000 + rank, start_batch),
        model_metadata={"objective": "linear_probe", "feature_dim": str(train.features.shape[1]),
                        "num_classes": str(num_classes)},
    )
    summary = trainer.fit()
    return trainer.unwrapped_model.eval(), {"epochs": cfg.train.epochs, "steps": summary["step"],
                                            "optimizer": cfg.optim.name, "base_lr": cfg.optim.base_lr,
                                            "lr": trainer.schedule.lr, "final_train_loss": summary.get("loss")}


def lbfgs_probe(cfg: LinearProbeConfig, train: FeatureSet, num_classes: int, accelerator
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """The CLIP paper's protocol on all training features (every process: the same rows in the same order, so the
    same model): choose C on a validation part of them, refit on all. -> (features -> logits, its metrics)"""
    settings = cfg.lbfgs
    dtype = {"float64": torch.float64, "float32": torch.float32}[settings.dtype]
    train = train.sorted_by_key()  # one order however many processes extracted, or wrote, the features
    features, labels = train.features.to(accelerator.device, dtype), train.labels.to(accelerator.device)

    def report(result: dict) -> None:
        if accelerator.is_main_process:
            log.info("L-BFGS sweep: C=%.3g, validation top-1 %.2f%% (%d iterations%s)", result["C"], result["top1"],
                     result["iterations"], "" if result["converged"] else ", max_iter reached")

    sweep = sweep_C(features, labels, num_classes, settings.Cs, val_fraction=settings.val_fraction,
                    seed=settings.seed, refine=settings.refine, patience=settings.patience,
                    max_iter=settings.max_iter, tol=settings.tol, report=report)
    if accelerator.is_main_process and sweep.C in (min(settings.Cs), max(settings.Cs)):  # refine only goes inwards
        log.warning("the best C, %.3g, is at an end of lbfgs.Cs: a wider grid may find a better one", sweep.C)
    standardise = Standardiser.of(features)  # the training features' statistics, applied to every input
    fit = fit_logistic_regression(standardise(features), labels, num_classes, sweep.C, settings.max_iter, settings.tol,
                                  init=sweep.fits[sweep.C])  # warm start: the sweep's solution for this C

    def head(batch: torch.Tensor) -> torch.Tensor:
        return fit.logits(standardise(batch.to(accelerator.device, dtype)))

    return head, {"C": sweep.C, "sweep": sweep.results, "num_fit_split": sweep.num_fit,
                  "num_val_split": sweep.num_val, "iterations": fit.iterations, "converged": fit.converged,
                  "dtype": settings.dtype}
