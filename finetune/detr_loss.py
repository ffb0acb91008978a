"""DETR's set prediction loss: a Hungarian matching of predictions to ground truth, then per matched pair a class
cross-entropy (every unmatched query learns "no object"), an L1 and a generalised-IoU box loss; on the final and
every auxiliary decoder layer.

Targets are a list over the batch of {"boxes": [n, 4] (cx, cy, w, h in [0, 1]), "labels": [n] (class ids)}, as
data.samples.DetectionSamples gives them; outputs as finetune.detr.DETR returns them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


class HungarianMatcher(nn.Module):
    """The one-to-one assignment of predictions to targets with the least cost

        cost = class_cost x (-p(target class)) + bbox_cost x L1(boxes) + giou_cost x (-GIoU(boxes))

    (DETR: 1 / 5 / 2), solved per image by scipy's `linear_sum_assignment`. The cost matrix is computed once for the
    whole batch (every query against every target of the batch) and cut into per-image blocks.

    forward(outputs {"pred_logits" [B, N, K+1], "pred_boxes" [B, N, 4]}, targets) -> per image (query indices,
    target indices), two int64 tensors of length min(N, n_i), query indices ascending.
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0):
        super().__init__()
        if class_cost == bbox_cost == giou_cost == 0:
            raise ValueError("all matching costs are 0")
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """logits [M, K+1], boxes [M, 4] against target_labels [T], target_boxes [T, 4] -> cost [M, T]."""
        probabilities = logits.float().softmax(-1)
        class_cost = -probabilities[:, target_labels]  # 1 - p, less the constant
        bbox_cost = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        giou_cost = -generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
        return self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch, queries = outputs["pred_logits"].shape[:2]
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).reshape(-1, 4)
        cost = self.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1),
                                target_labels, target_boxes)
        cost = cost.view(batch, queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        matches = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            rows, columns = linear_sum_assignment(block[image].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(columns, dtype=torch.int64)))
        return matches


def global_box_count(targets: list[dict], device: torch.device) -> float:
    """The number of target boxes per process, averaged over all processes (at least 1): the losses' normaliser,
    so that each box weighs the same however the boxes fall across processes (DETR's num_boxes)."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count /= torch.distributed.get_world_size()
    return max(float(count.item()), 1.0)


class SetCriterion(nn.Module):
    """DETR's loss. Per decoder layer (the final one and every "aux_outputs" entry, each matched on its own):

        loss_ce    cross-entropy over all queries, the class of the matched target or "no object" (weight
                   `no_object_weight`, 0.1, on that class: most queries are empty)
        loss_bbox  L1 between matched boxes (cx, cy, w, h), summed, / number of boxes
        loss_giou  1 - GIoU between matched boxes, summed, / number of boxes

    The number of boxes is the batch's over all processes divided by the world size (`global_box_count`).
    forward -> {"loss": sum over layers of the weighted losses, "loss_ce", "loss_bbox", "loss_giou" (final layer,
    unweighted), "class_error" (percent of matched queries of the final layer with the wrong class)}.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, ce_weight: float = 1.0, bbox_weight: float = 5.0,
                 giou_weight: float = 2.0, no_object_weight: float = 0.1):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_ce": ce_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight)

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        matches = self.matcher(outputs, targets)
        logits = outputs["pred_logits"].float()
        batch_index = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)]).to(logits.device)
        query_index = torch.cat([rows for rows, _ in matches]).to(logits.device)

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        matched_labels = torch.cat([t["labels"][columns.to(t["labels"].device)] for t, (_, columns) in
                                    zip(targets, matches)]).to(logits.device)
        target_classes[batch_index, query_index] = matched_labels
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_weight.to(logits.device))

        boxes = outputs["pred_boxes"].float()[batch_index, query_index]
        matched_boxes = torch.cat([t["boxes"].reshape(-1, 4)[columns.to(t["boxes"].device)] for t, (_, columns) in
                                   zip(targets, matches)]).to(boxes)
        loss_bbox = F.l1_loss(boxes, matched_boxes, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(matched_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes

        if len(matched_labels):
            wrong = logits[batch_index, query_index].argmax(-1) != matched_labels
            class_error = 100.0 * wrong.float().mean()
        else:
            class_error = logits.new_zeros(())
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou, "class_error": class_error}

    def weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * losses[name] for name in self.weights)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        num_boxes = global_box_count(targets, outputs["pred_logits"].device)
        final = self.layer_losses(outputs, targets, num_boxes)
        total = self.weighted(final)
        for aux in outputs.get("aux_outputs", []):
            total = total + self.weighted(self.layer_losses(aux, targets, num_boxes))
        return {"loss": total, **{name: value.detach() for name, value in final.items()}}

