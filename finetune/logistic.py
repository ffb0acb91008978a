"""Multinomial logistic regression fit with L-BFGS: the CLIP paper's linear probe (Radford et al. 2021, appendix
A.3), which fits scikit-learn's L-BFGS logistic regression on frozen features, chooses the L2 strength on a
validation part of the training set, then refits on the whole training set.

The objective is scikit-learn's `LogisticRegression(C=C)` (multinomial, solver lbfgs), divided by the number of
samples N as scikit-learn divides it:

    loss(W, b) = ( sum_i CE(W x_i + b, y_i) + ||W||^2 / (2C) ) / N        W [K, D]; the bias b [K] is not penalised

so the same C gives the same model, and `tol` means what it means there: stop once the largest entry of this
loss's gradient is at most tol. Everything runs in the features' dtype (float64, as scikit-learn's lbfgs, matches
it best; float32 is about twice as fast) on the features' device, full batch.

The features are standardised first (`Standardiser`: mean and std of the training features), as scikit-learn users
do with a StandardScaler in front of LogisticRegression: one C grid then suits any encoder, and L-BFGS converges in
far fewer iterations than on raw feature scales.

    fit = fit_logistic_regression(features, labels, num_classes, C=1.0)   # weight [K, D], bias [K]
    sweep = sweep_C(features, labels, num_classes, Cs=[1e-3, 1e-2, 0.1, 1], val_fraction=0.1, seed=0)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


class Standardiser(NamedTuple):
    """Per-dimension mean and std [D] of training features; calling it standardises features [N, D]."""
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> "Standardiser":
        """The population mean / std (StandardScaler's); a constant dimension keeps std 1, as there, rather than
        turning rounding noise into unit-variance noise."""
        mean = features.mean(dim=0)
        std = features.std(dim=0, correction=0)
        constant = std <= 1e-8 * mean.abs().clamp(min=1.0)
        return cls(mean, torch.where(constant, torch.ones_like(std), std))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class LogisticFit(NamedTuple):
    """A fitted classifier: logits = features @ weight.T + bias."""
    weight: torch.Tensor  # [K, D]
    bias: torch.Tensor  # [K]
    iterations: int  # L-BFGS iterations used
    converged: bool  # stopped by a tolerance (gradient at most tol, or the loss flat), not by max_iter

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] (standardised like the training features) -> logits [N, K]"""
        return torch.addmm(self.bias, features, self.weight.T)


def logistic_loss(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                  C: float) -> torch.Tensor:
    """scikit-learn's multinomial objective divided by N (module docstring): a scalar."""
    cross_entropy = F.cross_entropy(torch.addmm(bias, features, weight.T), labels, reduction="sum")
    return (cross_entropy + weight.square().sum() / (2.0 * C)) / len(features)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, C: float,
                            max_iter: int = 1000, tol: float = 1e-4, init: Optional[LogisticFit] = None
                            ) -> LogisticFit:
    """Minimise `logistic_loss` over W [num_classes, D] and b [num_classes] with full-batch L-BFGS (strong Wolfe
    line search, the last 10 steps remembered, as scipy's L-BFGS-B under scikit-learn) from zeros, or from `init`
    (a warm start: the solution for a neighbouring C). features [N, D], labels [N] int64."""
    dtype, device = features.dtype, features.device
    weight = torch.zeros(num_classes, features.shape[1], dtype=dtype, device=device)
    bias = torch.zeros(num_classes, dtype=dtype, device=device)
    if init is not None:
        weight.copy_(init.weight), bias.copy_(init.bias)
    weight.requires_grad_(True), bias.requires_grad_(True)
    labels = labels.to(device)
    # tolerance_change: scikit-learn's scipy ftol, 64 float64 eps, whatever the dtype (a float32 fit then stops on
    # the loss only when it no longer changes at all, not early where a larger C makes small progress)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                                  tolerance_grad=tol, tolerance_change=64 * torch.finfo(torch.float64).eps,
                                  history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = logistic_loss(weight, bias, features, labels, C)
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]  # torch's LBFGS keeps its counters with the first parameter
    iterations, evaluations = state.get("n_iter", 0), state.get("func_evals", 1)
    return LogisticFit(weight.detach(), bias.detach(), iterations, iterations < max_iter and evaluations < 2 * max_iter)


def validation_split(num_samples: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (fit indices, validation indices) partition of range(num_samples), each part non-empty and
    in increasing order; the validation part has round(fraction * num_samples) rows."""
    if num_samples < 2:
        raise ValueError(f"a validation split needs at least 2 samples, got {num_samples}")
    num_val = min(max(1, round(fraction * num_samples)), num_samples - 1)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[num_val:].sort().values, order[:num_val].sort().values


class Sweep(NamedTuple):
    """The outcome of `sweep_C`."""
    C: float  # the chosen C
    results: list[dict]  # {"C", "top1" (validation accuracy, percent), "iterations", "converged"}, by increasing C
    num_fit: int  # rows the sweep fit on
    num_val: int  # rows it measured on
    fits: dict[float, LogisticFit]  # each C's fit (on the sweep's standardised fit part)


def sweep_C(features: torch.Tensor, labels: torch.Tensor, num_classes: int, Cs: Sequence[float], *,
            val_fraction: float = 0.1, seed: int = 0, refine: int = 0, patience: Optional[int] = None,
            max_iter: int = 1000, tol: float = 1e-4, report: Optional[Callable[[dict], None]] = None) -> Sweep:
    """Choose C: carve a seeded `val_fraction` of the rows off as validation, standardise with the statistics of
    the rest, fit the grid's C on the rest (increasing C, each warm-started from the previous solution, as
    scikit-learn's regularisation path does; with `patience`, stopping once that many C past the best have not
    beaten it: the larger C are the slow fits), keep the C of the best validation top-1 (the smaller C on a tie:
    the stronger penalty). Then `refine` rounds of bisection in log C (the CLIP paper's parametric binary search):
    fit the geometric means of the best C and its tried neighbours, keep the best. `report` sees each result as it
    comes. features [N, D] (raw, not standardised), labels [N]: training data only."""
    fit_index, val_index = validation_split(len(features), val_fraction, seed)
    fit_features, val_features = features[fit_index], features[val_index]
    standardise = Standardiser.of(fit_features)  # the statistics of the part fit on only
    fit_features, val_features = standardise(fit_features), standardise(val_features)
    fit_labels, val_labels = labels[fit_index].to(features.device), labels[val_index].to(features.device)
    fits: dict[float, LogisticFit] = {}
    results: dict[float, dict] = {}

    def try_C(C: float, init: Optional[LogisticFit]) -> None:
        fit = fit_logistic_regression(fit_features, fit_labels, num_classes, C, max_iter, tol, init)
        top1 = 100.0 * float((fit.logits(val_features).argmax(dim=1) == val_labels).double().mean())
        fits[C] = fit
        results[C] = {"C": C, "top1": top1, "iterations": fit.iterations, "converged": fit.converged}
        if report is not None:
            report(results[C])

    def best() -> float:
        return max(sorted(results), key=lambda C: results[C]["top1"])  # max keeps the first (smallest C) of a tie

    previous = None
    for C in sorted(set(float(C) for C in Cs)):
        try_C(C, previous)
        previous = fits[C]
        if patience is not None and sum(tried > best() for tried in results) >= patience:
            break
    for _ in range(refine):
        tried, chosen = sorted(results), best()
        position = tried.index(chosen)
        for neighbour in tried[max(0, position - 1): position] + tried[position + 1: position + 2]:
            try_C(math.sqrt(chosen * neighbour), fits[chosen])
    return Sweep(best(), [results[C] for C in sorted(results)], len(fit_index), len(val_index), fits)
