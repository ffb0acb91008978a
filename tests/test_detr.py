"""DETR: the Hungarian matcher against brute force, batched against per-image matching, empty targets, the losses
against hand computations, box conversions, the sine position encoding, backbones of any input size, the two
learning rates and the step decay, COCO evaluation of perfect predictions, and a tiny run end to end."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.cli import main as finetune_main
from finetune.detection import backbone_param_groups, build_backbone, coco_evaluate, detr_from_weights, step_decay
from finetune.detr import DETR, Backbone, postprocess, sine_position_encoding
from finetune.detr_loss import HungarianMatcher, SetCriterion, cxcywh_to_xyxy, xyxy_to_cxcywh
from pretrain.config import EncoderConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def random_outputs(generator, batch: int, queries: int, classes: int) -> dict:
    return {"pred_logits": torch.randn(batch, queries, classes + 1, generator=generator),
            "pred_boxes": torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25}


def random_target(generator, count: int, classes: int) -> dict:
    return {"boxes": torch.rand(count, 4, generator=generator) * 0.5 + 0.2,
            "labels": torch.randint(0, classes, (count,), generator=generator)}


def brute_force_cost(cost: np.ndarray) -> float:
    """The least total cost of a one-to-one assignment of every target (column) to a distinct query (row)."""
    queries, targets = cost.shape
    return min(sum(cost[row, column] for column, row in enumerate(rows))
               for rows in itertools.permutations(range(queries), targets))


# ------------------------------------------------------------------------------------------------ matching

@pytest.mark.parametrize("seed", range(6))
def test_matcher_finds_the_least_cost_assignment_that_brute_force_finds(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, targets, classes = 5, 1 + seed % 4, 3
    outputs = random_outputs(generator, 1, queries, classes)
    target = random_target(generator, targets, classes)
    matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    rows, columns = matcher(outputs, [target])[0]
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], target["labels"],
                               target["boxes"]).numpy()
    assert len(rows) == targets and sorted(columns.tolist()) == list(range(targets))
    assert len(set(rows.tolist())) == targets
    assert cost[rows.numpy(), columns.numpy()].sum() == pytest.approx(brute_force_cost(cost), abs=1e-5)


def test_the_cost_matrix_is_the_weighted_sum_of_its_three_terms():
    logits = torch.tensor([[2.0, 0.0, 1.0]])  # one query, classes 0 and 1 + no object
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    labels, target_boxes = torch.tensor([1]), torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    probability = torch.tensor([2.0, 0.0, 1.0]).softmax(0)[1].item()
    l1 = 0.1
    giou = (0.1 * 0.2) / (0.04 + 0.04 - 0.02)  # overlap 0.1 x 0.2; the enclosing box is the union here
    cost = HungarianMatcher(1, 5, 2).cost_matrix(logits, boxes, labels, target_boxes)
    assert cost.item() == pytest.approx(-probability + 5 * l1 - 2 * giou, abs=1e-6)


def test_batched_matching_equals_matching_each_image_alone():
    generator = torch.Generator().manual_seed(0)
    outputs = random_outputs(generator, 4, 6, 5)
    targets = [random_target(generator, count, 5) for count in (3, 0, 6, 1)]
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for index, target in enumerate(targets):
        alone = matcher({k: v[index:index + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[index][0], alone[0]) and torch.equal(batched[index][1], alone[1])
    assert [len(rows) for rows, _ in batched] == [3, 0, 6, 1]


def test_images_without_boxes_match_nothing_and_learn_no_object_only():
    generator = torch.Generator().manual_seed(1)
    outputs = random_outputs(generator, 2, 4, 3)
    outputs["pred_logits"].requires_grad_(True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert [len(rows) for rows, _ in HungarianMatcher()(outputs, [empty, empty])] == [0, 0]
    losses = SetCriterion(3, HungarianMatcher())(outputs, [empty, empty])
    no_object = torch.full((2, 4), 3)
    expected_ce = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), no_object)  # one class: weights cancel
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


# ------------------------------------------------------------------------------------------------ losses

def test_losses_against_a_hand_computation():
    """Two queries, one target: query 1 sits on the target and is matched; query 0 must say no object."""
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.5, 0.0]]])  # classes 0, 1, no object
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.2]]])
    target = {"boxes": torch.tensor([[0.5, 0.55, 0.4, 0.3]]), "labels": torch.tensor([0])}
    criterion = SetCriterion(2, HungarianMatcher(), no_object_weight=0.1)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [target])

    log_p = logits[0].log_softmax(-1)
    expected_ce = -(0.1 * log_p[0, 2] + 1.0 * log_p[1, 0]) / (0.1 + 1.0)  # weighted mean over the queries
    expected_l1 = 0.0 + 0.05 + 0.0 + 0.1  # |cx|, |cy|, |w|, |h| differences, over 1 box
    # prediction x 0.3-0.7, y 0.4-0.6; target x 0.3-0.7, y 0.4-0.7: IoU = 0.08 / 0.12, the union is the hull
    expected_giou_loss = 1 - 0.08 / 0.12
    assert losses["loss_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(expected_l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(expected_giou_loss, rel=1e-5)
    assert losses["class_error"].item() == 0.0
    total = 1 * expected_ce + 5 * expected_l1 + 2 * expected_giou_loss
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_every_auxiliary_layer_adds_its_own_matched_loss_and_boxes_are_normalised_by_their_count():
    generator = torch.Generator().manual_seed(2)
    final, aux = random_outputs(generator, 2, 5, 3), random_outputs(generator, 2, 5, 3)
    targets = [random_target(generator, 2, 3), random_target(generator, 3, 3)]
    criterion = SetCriterion(3, HungarianMatcher())
    alone = [criterion.weighted(criterion.layer_losses(o, targets, num_boxes=5.0)) for o in (final, aux)]
    assert criterion({**final, "aux_outputs": [aux]}, targets)["loss"].item() == pytest.approx(sum(alone).item(), rel=1e-6)
    half = criterion.layer_losses(final, targets, num_boxes=10.0)
    full = criterion.layer_losses(final, targets, num_boxes=5.0)
    assert half["loss_bbox"].item() == pytest.approx(full["loss_bbox"].item() / 2, rel=1e-6)


def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.05, 0.1]])
    corners = cxcywh_to_xyxy(boxes)
    assert torch.allclose(corners[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(xyxy_to_cxcywh(corners), boxes, atol=1e-7)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(corners)), corners, atol=1e-7)


def test_postprocess_scales_boxes_to_each_images_size_and_skips_no_object():
    logits = torch.tensor([[[1.0, 3.0, 5.0]]])  # no object most likely; the best real class is 1
    outputs = {"pred_logits": logits, "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])}
    result = postprocess(outputs, torch.tensor([[100, 200]]))[0]  # height 100, width 200
    assert result["labels"].tolist() == [1]
    assert result["scores"].item() == pytest.approx(logits[0, 0].softmax(0)[1].item())
    assert torch.allclose(result["boxes"], torch.tensor([[50.0, 37.5, 150.0, 62.5]]))


# ------------------------------------------------------------------------------------------------ the model

def test_sine_encoding_describes_positions_within_each_unpadded_image():
    mask = torch.zeros(2, 6, 8, dtype=torch.bool)
    mask[1, 4:, :] = True  # image 1 is 4 x 5 inside a 6 x 8 batch
    mask[1, :, 5:] = True
    alone = sine_position_encoding(torch.zeros(1, 4, 5, dtype=torch.bool), 16)
    batched = sine_position_encoding(mask, 16)
    assert batched.shape == (2, 16, 6, 8)
    assert torch.allclose(batched[1, :, :4, :5], alone[0], atol=1e-5)
    assert torch.allclose(batched[0, :8, :, 0], batched[0, :8, :, 7])  # the y half does not change along x
    assert not torch.allclose(batched[0, 8:, :, 0], batched[0, 8:, :, 7])


@pytest.mark.parametrize("model_name, stride", [("mae_vit_tiny_patch4", 4), ("ummae_swin_tiny_cpu", 8)])
def test_vit_and_swin_backbones_take_any_input_size(model_name, stride):
    torch.manual_seed(0)
    backbone, spec, _ = build_backbone(EncoderConfig(model_name=model_name, image_size=32, global_pool=None, drop_path=0.0))
    assert backbone.stride == stride and spec["kwargs"]["dynamic_img_size"]
    images, mask = torch.randn(2, 3, 45, 61), torch.zeros(2, 45, 61, dtype=torch.bool)
    mask[1, :, 30:] = True
    features, small_mask = backbone(images, mask)
    grid = (math.ceil(45 / stride), math.ceil(61 / stride))
    assert features.shape == (2, backbone.num_channels, *grid) and small_mask.shape == (2, *grid)
    assert small_mask[1, :, -1].all() and not small_mask[1, :, 0].any()  # image 1's padded right half



def test_a_classifier_finetuned_with_average_pooling_is_a_backbone_with_its_own_weights(tmp_path):
    """The Fashion-MNIST DETR's backbone is the finetuned MAE classifier (global average pooling: fc_norm, no final
    token norm). With encoder.global_pool=avg every trunk weight loads as it was finetuned; with token pooling the
    missing norm is refused with the setting that fits."""
    from pretrain.checkpoint import save_weights
    from pretrain.encoders import CLASSIFIER_OBJECTIVE, SPEC_KEY, CheckpointError, build_encoder

    torch.manual_seed(0)
    classifier = build_encoder(EncoderConfig(model_name="mae_vit_tiny_patch4", image_size=32, global_pool="avg",
                                             drop_path=0.0), num_classes=10)
    save_weights(tmp_path / "last" / "model.safetensors", classifier.model.state_dict(),
                 {"objective": CLASSIFIER_OBJECTIVE, SPEC_KEY: json.dumps(classifier.spec)})

    backbone, _, description = build_backbone(EncoderConfig(checkpoint=str(tmp_path / "last"), image_size=32,
                                                            global_pool="avg", drop_path=0.0))
    assert description.startswith("finetuned classifier")
    trained = classifier.model.state_dict()
    loaded = backbone.trunk.state_dict()
    assert "norm.weight" not in loaded and "head.weight" not in loaded
    for name, value in loaded.items():
        assert torch.equal(value, trained[name]), name

    with pytest.raises(CheckpointError, match="set encoder.global_pool=avg"):
        build_backbone(EncoderConfig(checkpoint=str(tmp_path / "last"), image_size=32, global_pool=None, drop_path=0.0))


def test_detr_gives_final_and_auxiliary_outputs_of_every_decoder_layer():
    torch.manual_seed(0)
    backbone, _, _ = build_backbone(EncoderConfig(model_name="mae_vit_tiny_patch4", image_size=32, global_pool=None, drop_path=0.0))
    model = DETR(backbone, num_classes=4, hidden_dim=32, num_heads=2, encoder_layers=1, decoder_layers=3,
                 ffn_dim=64, num_queries=7)
    outputs = model(torch.randn(2, 3, 32, 40), torch.zeros(2, 32, 40, dtype=torch.bool))
    assert outputs["pred_logits"].shape == (2, 7, 5) and outputs["pred_boxes"].shape == (2, 7, 4)
    assert len(outputs["aux_outputs"]) == 2
    assert ((outputs["pred_boxes"] > 0) & (outputs["pred_boxes"] < 1)).all()


def test_backbone_gets_its_own_lr_and_every_lr_drops_tenfold_every_lr_drop_epochs():
    from pretrain.config import OptimConfig, TrainConfig
    from pretrain.engine import Schedule, build_optimizer

    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optim = OptimConfig(lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999), warmup_epochs=0)
    schedule = Schedule.derive(40, TrainConfig(batch_size=4, epochs=30), optim, 1)  # 10 steps an epoch
    optimizer = build_optimizer(model, optim, schedule.lr, param_group_fn=backbone_param_groups(0.1))
    scheduler = step_decay(20)(optimizer, schedule)
    lrs = {}
    for step in (0, 199, 200, 299):
        scheduler.step_update(step)
        lrs[step] = [group["lr"] for group in optimizer.param_groups]
    assert lrs[0] == pytest.approx([1e-4, 1e-5]) and lrs[199] == pytest.approx([1e-4, 1e-5])
    assert lrs[200] == pytest.approx([1e-5, 1e-6]) and lrs[299] == pytest.approx([1e-5, 1e-6])
    assert all(group["weight_decay"] == 1e-4 for group in optimizer.param_groups)  # DETR: on every weight


# ------------------------------------------------------------------------------------------------ COCO evaluation

def test_coco_evaluation_of_perfect_predictions_is_ap_one():
    ground_truth = {"images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in (1, 2)],
                    "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}], "annotations": []}
    boxes = [(1, 1, [10, 10, 20, 30]), (1, 3, [50, 60, 120, 100]), (2, 3, [0, 0, 40, 40]), (2, 1, [120, 100, 70, 80])]
    for index, (image_id, category, box) in enumerate(boxes):
        ground_truth["annotations"].append({"id": index + 1, "image_id": image_id, "category_id": category,
                                            "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    perfect = [{"image_id": i, "category_id": c, "bbox": b, "score": 0.9} for i, c, b in boxes]
    metrics = coco_evaluate(ground_truth, perfect)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert metrics[key] == pytest.approx(1.0), key
    wrong_class = [{**d, "category_id": 1 if d["category_id"] == 3 else 3} for d in perfect]
    assert coco_evaluate(ground_truth, wrong_class)["AP"] == 0.0
    assert coco_evaluate(ground_truth, [])["AP"] == 0.0


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def square_shards(tmp_path_factory):
    """Detection shards of 32 x 32 canvases with 1-2 grey (category 1) or white (category 2) squares."""
    from data import ShardOptions, read_coco, write_detection_shards

    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    dirs = {}
    for split, count in (("train", 16), ("val", 6)):
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "grey"}, {"id": 2, "name": "white"}]}
        (root / split).mkdir()
        for image_id in range(1, count + 1):
            pixels = np.zeros((32, 32, 3), dtype=np.uint8)
            for _ in range(rng.integers(1, 3)):
                size, x, y, category = int(rng.integers(6, 12)), int(rng.integers(0, 20)), int(rng.integers(0, 20)), int(rng.integers(1, 3))
                pixels[y:y + size, x:x + size] = 128 * category - 1
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                            "category_id": category, "bbox": [x, y, size, size], "iscrowd": 0})
            Image.fromarray(pixels).save(root / split / f"{image_id}.png")
            coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": 32, "height": 32})
        (root / f"{split}.json").write_text(json.dumps(coco))
        source = read_coco(root / f"{split}.json", root / split)
        write_detection_shards(source.images, root / "shards" / split, source.categories,
                               options=ShardOptions(shard_size=8, progress=False))
        dirs[split] = root / "shards" / split
    return dirs


def test_tiny_detr_run_trains_evaluates_and_writes_metrics_weights_and_picture(square_shards, tmp_path, micro_model):
    out = tmp_path / "run"
    argv = [
        "task=detr", f"output_dir={out}", f"data.train={square_shards['train']}", f"data.val={square_shards['val']}",
        "data.num_workers=0", "data.shuffle_buffer=8", f"encoder.model_name={micro_model}", "encoder.image_size=16",
        "model.hidden_dim=32", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=2",
        "model.ffn_dim=64", "model.num_queries=5", "augment.scales=[24,32]", "augment.max_size=40",
        "augment.crop_scales=[32]", "augment.crop_size=[20,32]", "augment.eval_size=32", "augment.eval_max_size=40",
        "train.batch_size=4", "train.epochs=2", "train.mixed_precision=no", "train.log_every=2",
        "logging.wandb=disabled", "logging.progress_bar=false", "eval_batch_size=4", "num_pictures=2", "lr_drop=1",
    ]
    assert finetune_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "best_AP"):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert metrics["num_images"] == 6 and metrics["num_classes"] == 3 and metrics["epochs"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_bbox", "loss_giou", "class_error"} <= set(log[-1])
    assert log[-1]["lr"] == pytest.approx(1e-5)  # lr_drop=1: 1e-4 dropped tenfold after epoch 1
    assert (out / "boxes.png").is_file() and (out / "best" / "model.safetensors").is_file()

    model, spec, _ = detr_from_weights(out)
    assert isinstance(model.backbone, Backbone) and spec["num_classes"] == 3
    from finetune.draw_boxes import main as draw_main

    assert draw_main([str(out), "--weights", "last", "--num-images", "3", "--threshold", "0"]) == 0
    assert (out / "boxes_last.png").is_file()


def test_two_processes_count_every_evaluation_image_once(square_shards, tmp_path):
    """torchrun, 2 gloo processes: the box count is reduced across them, and the evaluation gathers each
    process's share of data.val to the main process, every image once."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = [
        "task=detr", f"output_dir={out}", f"data.train={square_shards['train']}", f"data.val={square_shards['val']}",
        "data.num_workers=0", "data.shuffle_buffer=8", "encoder.model_name=mae_vit_tiny_patch4", "encoder.image_size=32",
        "model.hidden_dim=32", "model.num_heads=2", "model.encoder_layers=1", "model.decoder_layers=1", "model.ffn_dim=64",
        "model.num_queries=5", "augment.scales=[32]", "augment.max_size=40", "augment.crop_scales=[32]",
        "augment.crop_size=[24,32]", "augment.eval_size=32", "augment.eval_max_size=40", "train.batch_size=4",
        "train.epochs=1", "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false",
        "eval_batch_size=2", "num_pictures=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "finetune", *argv], cwd=Path(__file__).resolve().parents[1], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and metrics["steps"] == 2  # 16 images, global batch 8
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [2]  # the main process alone writes the log


def test_evaluation_shards_with_other_categories_or_too_few_classes_are_refused(square_shards, tmp_path, capsys):
    import shutil

    renamed = tmp_path / "val"
    shutil.copytree(square_shards["val"], renamed)
    stats = json.loads((renamed / "stats.json").read_text())
    stats["categories"] = [{"id": 1, "name": "white"}, {"id": 2, "name": "grey"}]
    (renamed / "stats.json").write_text(json.dumps(stats))
    common = ["task=detr", "data.num_workers=0", "encoder.checkpoint=null", "logging.wandb=disabled",
              "logging.progress_bar=false", f"data.train={square_shards['train']}"]
    assert finetune_main([*common, f"output_dir={tmp_path / 'a'}", f"data.val={renamed}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: the evaluation shards {renamed} have other categories than the training shards")
    assert finetune_main([*common, f"output_dir={tmp_path / 'b'}", f"data.val={square_shards['val']}",
                          "num_classes=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: 'num_classes' is 2 but the training shards {square_shards['train']} have category id 2 (class ids "
        f"run from 0 to num_classes - 1)")
