"""Pictures of runs, written as PNG files: an MAE reconstruction grid, a loss curve, a confusion matrix.

Uses matplotlib's object-oriented API (``Figure`` + Agg canvas), never ``pyplot``, so nothing here touches the
global backend or needs a display.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.evaluation import LOG_PREFIX
from pretrain.models.mae import MaskedAutoencoderViT

GRID_COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")
MASKED_GREY = 0.5  # display value of a masked patch
PANEL_INCHES = 1.6
DPI = 100


@torch.no_grad()
def reconstruction_panels(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """images: [N, C, H, W], normalised with ``mean``/``std`` -> panels: [N, 4, C, H, W] in display space [0, 1],
    in the order of ``GRID_COLUMNS``. The model runs in eval mode; its previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)  # pred [N, L, p*p*C], mask [N, L]
        reconstruction = model.unpatchify(model.pred_to_pixels(pred, images))
        patch_pixels = pred.shape[-1]
        masked_pixels = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, patch_pixels).to(images.dtype))
    finally:
        model.train(was_training)

    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    def to_display(x: torch.Tensor) -> torch.Tensor:
        return (x * std_t + mean_t).clamp(0.0, 1.0)

    original = to_display(images)
    reconstruction = to_display(reconstruction)
    # a grey image (its three channels equal) is reconstructed channel by channel; drawn as the grey it stands for,
    # so that the channels' small disagreements do not speckle it with colour
    grey = (original.amax(dim=1) - original.amin(dim=1)).flatten(1).amax(dim=1) < 1e-6  # [N]
    grey_reconstruction = reconstruction.mean(dim=1, keepdim=True).expand_as(reconstruction)
    reconstruction = torch.where(grey.view(-1, 1, 1, 1), grey_reconstruction, reconstruction)
    masked_input = original * (1 - masked_pixels) + MASKED_GREY * masked_pixels
    pasted = original * (1 - masked_pixels) + reconstruction * masked_pixels
    return torch.stack([original, masked_input, reconstruction, pasted], dim=1)


def save_reconstruction_grid(
    model: MaskedAutoencoderViT,
    images: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float | None = None,
    noise: torch.Tensor | None = None,
    max_images: int = 8,
) -> torch.Tensor:
    """Write a PNG with one row per image and the columns of ``GRID_COLUMNS`` (titled on the first row).

    images: [N, C, H, W] normalised with ``mean``/``std``; only the first ``max_images`` are drawn.
    Returns the drawn panels [min(N, max_images), 4, C, H, W] in [0, 1].
    """
    images = images[:max_images]
    if noise is not None:
        noise = noise[:max_images]
    panels = reconstruction_panels(model, images, mean, std, mask_ratio, noise).float().cpu()
    num_rows = panels.shape[0]

    figure = Figure(figsize=(PANEL_INCHES * len(GRID_COLUMNS), PANEL_INCHES * num_rows), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(num_rows, len(GRID_COLUMNS), squeeze=False)
    for row in range(num_rows):
        for column, title in enumerate(GRID_COLUMNS):
            ax = axes[row][column]
            picture = panels[row, column].permute(1, 2, 0).numpy()  # [H, W, C]
            picture = picture[..., 0] if picture.shape[-1] == 1 else picture  # single-channel images as grey
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.25 / num_rows, wspace=0.05, hspace=0.05)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return panels


def save_loss_curve(log_jsonl_path: str | Path, png_path: str | Path) -> None:
    """Plot loss (and lr on a second y axis, where logged) against step from a JSON-lines log with records like
    {"step": 10, "loss": 0.9, "lr": 1e-4}; records without "loss" are skipped. The evaluations the log holds
    ("eval/<name>" entries, e.g. eval/knn_top1) get a second panel below, against the same steps."""
    steps, losses, lr_steps, lrs = [], [], [], []
    evaluations: dict[str, tuple[list, list]] = {}  # name -> (steps, values)
    with open(log_jsonl_path) as log:
        for line_number, line in enumerate(log, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{log_jsonl_path}:{line_number}: not valid JSON ({error})") from error
            if "loss" not in record or "step" not in record:
                continue
            steps.append(record["step"])
            losses.append(record["loss"])
            if record.get("lr") is not None:
                lr_steps.append(record["step"])
                lrs.append(record["lr"])
            for key, value in record.items():
                if key.startswith(LOG_PREFIX) and value is not None:
                    points = evaluations.setdefault(key[len(LOG_PREFIX):], ([], []))
                    points[0].append(record["step"])
                    points[1].append(value)
    if not steps:
        raise ValueError(f"{log_jsonl_path}: no records with both 'step' and 'loss'")

    figure = Figure(figsize=(6, 7 if evaluations else 4), dpi=DPI)
    FigureCanvasAgg(figure)
    if evaluations:
        loss_axis, eval_axis = figure.subplots(2, 1, sharex=True)
    else:
        loss_axis = figure.subplots()
    loss_axis.plot(steps, losses, color="tab:blue", label="loss")
    if not evaluations:  # else the evaluation panel below carries the shared axis
        loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss", color="tab:blue")
    if lrs:
        lr_axis = loss_axis.twinx()
        lr_axis.plot(lr_steps, lrs, color="tab:orange", label="lr")
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    if evaluations:
        for name, (eval_steps, values) in evaluations.items():
            eval_axis.plot(eval_steps, values, marker="o", markersize=3, label=name)
        eval_axis.set_xlabel("step")
        eval_axis.set_ylabel("evaluation")
        eval_axis.grid(alpha=0.3)
        eval_axis.legend(fontsize=8)
    figure.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")


def save_confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str], png_path: str | Path,
                          title: str = "") -> Path:
    """Draw a [true, predicted] count matrix, each row normalised to percent of its true class (the diagonal is
    per-class recall), counts written in the cells when there are at most 30 classes."""
    confusion = confusion.double()
    num_classes = confusion.shape[0]
    percent = 100.0 * confusion / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(24.0, max(4.5, 0.45 * num_classes + 2.5))
    figure = Figure(figsize=(side, side * 0.9), dpi=DPI)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    image = axis.imshow(percent.numpy(), cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="% of the true class")
    if num_classes <= 30:
        for true in range(num_classes):
            for predicted in range(num_classes):
                count = int(confusion[true, predicted])
                if count:
                    axis.text(predicted, true, str(count), ha="center", va="center", fontsize=6,
                              color="white" if percent[true, predicted] > 50 else "black")
    if num_classes <= 60:
        names = [str(name)[:20] for name in class_names]
        axis.set_xticks(range(num_classes), names, rotation=90, fontsize=7)
        axis.set_yticks(range(num_classes), names, fontsize=7)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    total = float(confusion.sum())
    accuracy = 100.0 * float(confusion.diagonal().sum()) / max(total, 1.0)
    axis.set_title(f"{title + ': ' if title else ''}top-1 {accuracy:.2f}% of {int(total)} images", fontsize=9)
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")
    return png_path
