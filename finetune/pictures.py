"""Pictures of the heads' results: predicted and true boxes of a DETR model on evaluation images."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from data import ShardStream

from .detr import postprocess
from .detr_loss import cxcywh_to_xyxy


@torch.no_grad()
def draw_predictions(model: nn.Module, shards: str, transform, out: str | Path, class_names: dict[int, str],
                     mean, std, num_images: int = 8, threshold: float = 0.5) -> Path:
    """The first `num_images` images of `shards` (evaluation transform, un-normalised for display) with the model's
    predictions scoring at least `threshold` and the true boxes, in a grid; written to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    batch = next(iter(ShardStream(shards, transform, num_images, train=False, kind="detection")))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = model(batch["image"].to(device), batch["mask"].to(device))
    model.train(was_training)
    sizes = torch.stack([t["size"] for t in batch["target"]])
    results = postprocess(outputs, sizes.to(device))

    count = len(batch["target"])
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    pixels = batch["image"] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        target, result = batch["target"][index], {k: v.cpu() for k, v in results[index].items()}
        height, width = target["size"].tolist()
        axis.imshow(pixels[index, :, :height, :width].clamp(0, 1).permute(1, 2, 0).numpy())
        scale = torch.tensor([width, height, width, height])
        for box, label in zip(cxcywh_to_xyxy(target["boxes"]) * scale, target["labels"].tolist()):
            x0, y0, x1, y1 = box.tolist()
            axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linestyle="--", lw=1.5))
        keep = result["scores"] >= threshold
        for box, label, score in zip(result["boxes"][keep], result["labels"][keep], result["scores"][keep]):
            x0, y0, x1, y1 = box.tolist()
            axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
            axis.text(x0, y0, f"{class_names.get(int(label), int(label))} {score:.2f}", color="white", fontsize=6,
                      va="bottom", bbox=dict(facecolor="red", alpha=0.7, pad=1, lw=0))
        axis.set_title(f"image {target['image_id']}: {len(target['labels'])} true, {int(keep.sum())} found", fontsize=8)
    figure.suptitle(f"DETR predictions (red, score >= {threshold}) and true boxes (green)", fontsize=9)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
