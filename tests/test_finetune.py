"""Full finetuning and DeiT distillation: layer-wise lr decay, weights fitted to a new resolution and head, the
distillation losses against hand computations, the frozen teacher, the distilled student's two heads, and both
runs end to end through `python -m finetune`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torchvision.transforms import v2

from finetune.classify import RandAugment, finetune_train_transform, posterize
from finetune.cli import main as finetune_main
from finetune.config import AugmentConfig, FinetuneConfig
from finetune.distillation import DistillationLoss, FrozenTeacher, hard_distillation, soft_distillation
from pretrain.checkpoint import resolve_weights_file, save_checkpoint
from pretrain.config import DataConfig, EncoderConfig, OptimConfig, TrainConfig, load_config
from pretrain.encoders import build_encoder, pretraining_model_from_checkpoint
from pretrain.engine import Schedule, build_optimizer, build_scheduler
from pretrain.models import create_model
from pretrain.train_mae import model_metadata

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory, micro_model):
    """A micro MAE (16x16 images, 4x4 patches, 1 block) saved as `python -m pretrain` saves it; random weights,
    with a random (not sin-cos) position embedding so that resampling is visible."""
    torch.manual_seed(0)
    mae = create_model(micro_model)
    mae.pos_embed.data.normal_()
    root = tmp_path_factory.mktemp("mae") / "checkpoints"
    save_checkpoint(root, 1, mae.state_dict(), {"step": 1}, {}, model_metadata=model_metadata(mae, micro_model, "mae"))
    return root.parent


def finetune_argv(config, out, tiny_shards, *overrides):
    """`--config configs/<config>` on the tiny shards: 16 px, 64 training images, batch 16 (4 steps an epoch)."""
    train_dir, val_dir = tiny_shards
    return ["--config", str(REPO / "configs" / config), f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16", "data.num_workers=0",
            "data.shuffle_buffer=16", "train.batch_size=16", "train.epochs=2", "train.mixed_precision=no",
            "train.log_every=2", "optim.warmup_epochs=1", "logging.wandb=disabled", "logging.progress_bar=false",
            "eval_batch_size=8", f"output_dir={out}", *overrides]


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory, mae_checkpoint, tiny_shards):
    """The micro MAE finetuned for 2 epochs with the whole recipe on (Mixup + CutMix, RandAugment, erasing, EMA)."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("finetune") / "run"
    argv = finetune_argv("finetune_mae_tiny_fmnist.yaml", out, tiny_shards, f"encoder.checkpoint={mae_checkpoint}",
                         "ema_decay=0.5", "augment.rand_augment=rand-m9-mstd0.5-inc1", "augment.mixup=0.8",
                         "augment.cutmix=1.0", "augment.reprob=0.25")
    status = finetune_main(argv)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert status == 0
    return out


# ------------------------------------------------------------------------------------------------ the recipe


def test_layer_decay_gives_block_i_of_l_the_scale_decay_to_the_l_minus_i(micro_model):
    encoder = EncoderConfig(model_name=micro_model, model_kwargs={"depth": 3})
    model, _, _ = build_encoder(encoder, 16, num_classes=5)
    optimizer = build_optimizer(model, OptimConfig(), lr=1.0, layer_decay=0.5)
    scale = {name: group["lr_scale"] for group in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in group["params"])}
    assert len(scale) == sum(1 for _ in model.parameters())
    for name, value in scale.items():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            assert value == 0.5**4, name  # the embeddings sit below block 0
        elif name.startswith("blocks."):
            assert value == 0.5 ** (3 - int(name.split(".")[1])), name
        else:
            assert name.startswith(("fc_norm", "head")) and value == 1.0, name
    # the scheduler applies the scales: each group's lr is the scheduled lr times its scale
    schedule = Schedule.derive(64, TrainConfig(epochs=1, batch_size=8), OptimConfig(lr=1.0, warmup_epochs=0), 1)
    build_scheduler(optimizer, schedule, min_lr=0.0).step_update(0)
    assert all(group["lr"] == pytest.approx(group["lr_scale"]) for group in optimizer.param_groups)


def test_checkpoint_at_one_resolution_finetunes_at_another_with_resampled_pos_embed(mae_checkpoint):
    from timm.layers import resample_abs_pos_embed

    mae, _ = pretraining_model_from_checkpoint(mae_checkpoint)
    source = mae.encoder_state_dict()
    encoder = EncoderConfig(checkpoint=str(mae_checkpoint), global_pool="avg", drop_path=0.0)
    model, spec, description = build_encoder(encoder, 32, num_classes=7)  # 16 px -> 32 px: 4x4 -> 8x8
    assert "MAE checkpoint" in description and spec["kwargs"]["img_size"] == 32
    expected = resample_abs_pos_embed(source["pos_embed"], new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 1 + 64, 32) and torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, 0], source["pos_embed"][:, 0])  # the class token's entry is kept
    for name in ("cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        assert torch.equal(model.state_dict()[name], source[name]), name
    # global pooling: the encoder's final norm gives way to a fresh fc_norm; the new head starts tiny
    assert isinstance(model.norm, torch.nn.Identity) and torch.equal(model.fc_norm.weight, torch.ones(32))
    assert model.head.weight.abs().max() < 1e-4 and torch.equal(model.head.bias, torch.zeros(7))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)

    # a distilled student: its distillation token's position starts as the class token's
    encoder = EncoderConfig(checkpoint=str(mae_checkpoint), global_pool="token")
    student, spec, _ = build_encoder(encoder, 16, num_classes=7, distill_token=True)
    assert spec["distilled"] and student.pos_embed.shape == (1, 2 + 16, 32)
    assert torch.equal(student.pos_embed[:, 1], source["pos_embed"][:, 0])
    assert torch.equal(student.pos_embed[:, 2:], source["pos_embed"][:, 1:])


def test_timm_model_with_a_local_weights_file_loads_all_but_the_head(tmp_path):
    import timm

    kwargs = dict(img_size=32, patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **kwargs)  # e.g. our Swin export
    torch.save({"model": swin.state_dict()}, tmp_path / "swin.pth")
    encoder = EncoderConfig(source="timm", model_name="swin_tiny_patch4_window7_224", global_pool=None,
                                    model_kwargs={k: v for k, v in kwargs.items() if k != "img_size"},
                                    checkpoint=str(tmp_path / "swin.pth"))
    model, spec, _ = build_encoder(encoder, 32, num_classes=3)
    assert spec["kwargs"]["img_size"] == 32
    loaded = model.state_dict()
    for name, value in swin.state_dict().items():
        assert torch.equal(loaded[name], value), name
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_rand_augment_and_erasing_work_on_uint8_tensors_and_follow_the_torch_seed():
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    augment = RandAugment("rand-m9-mstd0.5-inc1", 20, (0.5, 0.5, 0.5))
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(augment(image))
    assert outputs[0].dtype == torch.uint8 and outputs[0].shape == image.shape
    assert torch.equal(outputs[0], outputs[1])
    # timm's increasing posterize keeps 0 bits at the top magnitude: a black image (Pillow 13 refuses 0 bits)
    picture = v2.functional.to_pil_image(image)
    assert not any(v2.functional.pil_to_tensor(posterize(picture, 0)).flatten().tolist())
    assert torch.equal(v2.functional.pil_to_tensor(posterize(picture, 8)), image)
    transform = finetune_train_transform(DataConfig(image_size=16), AugmentConfig(reprob=1.0))
    torch.manual_seed(0)
    assert transform(image).shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------ distillation


def test_soft_distillation_is_tau_squared_kl_of_softened_outputs():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, -2.0]])
    tau = 2.0
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p_s = [math.exp(x / tau) / sum(math.exp(y / tau) for y in s) for x in s]
        p_t = [math.exp(x / tau) / sum(math.exp(y / tau) for y in t) for x in t]
        expected += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = tau**2 * expected / len(student)
    assert soft_distillation(student, teacher, tau).item() == pytest.approx(expected, rel=1e-5)
    assert soft_distillation(teacher, teacher, tau).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_distillation_is_cross_entropy_to_the_teacher_argmax():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 5.0], [4.0, 3.0, -2.0]])  # decisions: class 2, class 0
    log_softmax = [[x - math.log(sum(math.exp(y) for y in row)) for x in row] for row in student.tolist()]
    expected = -(log_softmax[0][2] + log_softmax[1][0]) / 2
    assert hard_distillation(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_mixes_label_and_teacher_terms_on_the_right_heads():
    torch.manual_seed(0)
    class_logits, dist_logits, teacher = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    label_ce = F.cross_entropy(class_logits, labels)
    hard = DistillationLoss(F.cross_entropy, "hard", alpha=0.5)((class_logits, dist_logits), labels, teacher)
    # DeiT Eq. 3: 1/2 CE(class head, y) + 1/2 CE(distillation head, teacher argmax)
    expected = 0.5 * label_ce + 0.5 * F.cross_entropy(dist_logits, teacher.argmax(1))
    assert hard["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    soft = DistillationLoss(F.cross_entropy, "soft", alpha=0.3, tau=3.0)(class_logits, labels, teacher)
    expected = 0.7 * label_ce + 0.3 * soft_distillation(class_logits, teacher, 3.0)  # one head: it takes both
    assert soft["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    none = DistillationLoss(F.cross_entropy, "none")((class_logits, dist_logits), labels)
    assert none["loss"].item() == pytest.approx(label_ce.item())


def test_the_teacher_stays_frozen_and_gets_no_gradients(micro_model):
    teacher_model, _, _ = build_encoder(EncoderConfig(model_name=micro_model), 16, num_classes=5)
    teacher = FrozenTeacher(teacher_model)
    student, _, _ = build_encoder(EncoderConfig(model_name=micro_model, global_pool="token"), 16, num_classes=5,
                                  distill_token=True)
    student.set_distilled_training(True)
    container = torch.nn.ModuleDict({"student": student, "teacher": teacher}).train()  # .train() reaches both
    assert container.training and not teacher.training and not teacher_model.training
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    teacher_logits = teacher(images)
    assert not teacher_logits.requires_grad
    loss = DistillationLoss(F.cross_entropy, "soft", alpha=0.5, tau=2.0)(student(images), labels, teacher_logits)["loss"]
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.dist_token.grad is not None and student.head_dist.weight.grad is not None


def test_distilled_student_averages_its_two_heads_at_evaluation(micro_model):
    encoder = EncoderConfig(model_name=micro_model, global_pool="token", head_init_std=0.5)
    model, _, _ = build_encoder(encoder, 16, num_classes=6, distill_token=True)
    model.set_distilled_training(True)
    images = torch.randn(3, 3, 16, 16)
    cls_logits, dist_logits = model.train()(images)  # dropout-free model: training mode computes the same heads
    model.eval()
    tokens = model.forward_features(images)
    assert torch.allclose(cls_logits, model.head(tokens[:, 0]), atol=1e-6)
    assert torch.allclose(dist_logits, model.head_dist(tokens[:, 1]), atol=1e-6)
    assert not torch.allclose(cls_logits, dist_logits)
    assert torch.allclose(model(images), (cls_logits + dist_logits) / 2, atol=1e-6)


# ------------------------------------------------------------------------------------------------ end to end


def test_finetune_end_to_end_writes_metrics_and_best_and_last_weights(finetuned_run):
    out = finetuned_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]  # evaluated after every epoch
    assert [h["step"] for h in metrics["history"]] == [4, 8]  # 64 images / batch 16
    for record in metrics["history"]:
        assert 0 <= record["top1"] <= record["top5"] <= 100 and record["num_samples"] == 16
        assert 0 <= record["ema_top1"] <= 100 and math.isfinite(record["train_loss"])
    assert metrics["best_top1"] == max(h["top1"] for h in metrics["history"])
    assert metrics["top1"] == metrics["history"][-1]["top1"] and "MAE checkpoint" in metrics["model"]
    for directory in ("best", "last", "ema_best", "ema_last"):
        assert (out / directory / "model.safetensors").is_file(), directory
    with safe_open(str(out / "last" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == "2" and f.metadata()["objective"] == "finetune"
        data = load_config(FinetuneConfig, out / "config.yaml").data  # the statistics of its inputs, carried along
        assert (json.loads(f.metadata()["data_mean"]), json.loads(f.metadata()["data_std"])) == (list(data.mean),
                                                                                                 list(data.std))
    assert resolve_weights_file(out) == out / "best" / "model.safetensors"  # the run directory: its best weights
    model, spec, description = build_encoder(EncoderConfig(checkpoint=str(out)), keep_head=True)
    assert str(out / "best" / "model.safetensors") in description and spec["global_pool"] == "avg"
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 8 and "accuracy" not in log[-1]  # no hard-label accuracy under Mixup
    assert (out / "checkpoints" / "step_00000008" / "model.safetensors").is_file()


def test_distillation_end_to_end_from_a_finetuned_teacher(finetuned_run, tiny_shards, micro_model, tmp_path):
    out = tmp_path / "student"
    argv = finetune_argv("distill_vit_tiny_fmnist.yaml", out, tiny_shards, f"encoder.model_name={micro_model}", "encoder.model_kwargs={}", "encoder.checkpoint=null",
                         f"distillation.teacher={finetuned_run}", "distillation.kind=hard", "train.epochs=1")
    assert finetune_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"] == "hard" and metrics["classifier"] == "VisionTransformerDistilled"
    assert str(finetuned_run / "best") in metrics["teacher"]
    for key in ("top1", "cls_top1", "dist_top1"):  # the averaged heads, and each head alone
        assert 0 <= metrics[key] <= 100, key
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"label_loss", "distillation_loss"} <= log[-1].keys()


def test_a_convnet_trained_from_scratch_teaches_a_vit(tiny_shards, micro_model, tmp_path):
    """The Fashion-MNIST DeiT road: configs/teacher_cnn_fmnist.yaml trains a timm ResNet-18 from scratch at a larger
    input size than the student's; its checkpoint, read back as our classifier (its head included) with the size it
    was trained at, teaches a ViT student by hard distillation on the student's images resized to that size."""
    from accelerate.state import AcceleratorState, GradientState

    teacher_dir = tmp_path / "teacher"
    assert finetune_main(finetune_argv("teacher_cnn_fmnist.yaml", teacher_dir, tiny_shards, "train.epochs=1",
                                       "data.image_size=24")) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert teacher_metrics["classifier"] == "ResNet" and "random init (timm resnet18)" in teacher_metrics["model"]

    out = tmp_path / "student"
    weights = teacher_dir / "checkpoints" / "step_00000004"
    argv = finetune_argv("distill_vit_tiny_fmnist.yaml", out, tiny_shards, f"encoder.model_name={micro_model}",
                         "encoder.model_kwargs={}", f"distillation.teacher={weights}", "distillation.kind=hard",
                         "train.epochs=1")
    assert finetune_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"] == (f"finetuned classifier {weights / 'model.safetensors'} at 24x24 "
                                  f"(the students' images resized)")
    assert metrics["classifier"] == "VisionTransformerDistilled" and 0 <= metrics["dist_top1"] <= 100


def test_distillation_without_a_teacher_is_one_clear_error(tiny_shards, tmp_path, capsys):
    assert finetune_main(["task=finetune", "distillation.kind=soft", f"output_dir={tmp_path}"]) == 2
    assert "distillation.teacher" in capsys.readouterr().err.strip().splitlines()[-1]


def test_our_swin_mae_checkpoint_finetunes_as_a_timm_swin(tmp_path):
    """A UM-MAE Swin checkpoint (pretrain/models/swin_mae.py) -> timm SwinTransformer with the encoder's weights."""
    mae = create_model("ummae_swin_tiny_cpu")
    save_checkpoint(tmp_path / "checkpoints", 1, mae.state_dict(), {"step": 1}, {},
                    model_metadata=model_metadata(mae, "ummae_swin_tiny_cpu", "mae"))
    model, spec, _ = build_encoder(EncoderConfig(checkpoint=str(tmp_path), global_pool=None), 32, num_classes=10)
    assert spec["builder"] == "swin" and type(model).__name__ == "SwinTransformer"
    loaded = model.state_dict()
    for name, value in mae.encoder_state_dict().items():
        assert torch.equal(loaded[name], value), name
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_a_resumed_finetune_keeps_the_earlier_epochs_in_its_history(mae_checkpoint, tiny_shards, tmp_path):
    out = tmp_path / "run"
    argv = finetune_argv("finetune_mae_tiny_fmnist.yaml", out, tiny_shards, f"encoder.checkpoint={mae_checkpoint}",
                         "train.save_every=4")
    assert finetune_main([*argv, "train.stop_after_steps=4"]) == 0  # stopped after epoch 1 of 2
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1]
    assert finetune_main([*argv, "train.resume=latest"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 4), (2, 8)]


def test_clip_image_tower_finetunes_as_its_timm_model(tmp_path):
    from pretrain.models.clip import create_clip, export_open_clip

    clip, name, config = create_clip("vitpretrain-tiny-32")
    export_open_clip(clip, name, config, tmp_path / "export", 32, (0.5,) * 3, (0.5,) * 3)
    encoder = EncoderConfig(source="clip", checkpoint=str(tmp_path / "export"), global_pool="token")
    model, spec, description = build_encoder(encoder, 32, num_classes=4)
    assert spec["model_name"] == "vitpretrain_vit_tiny_patch4_32" and "CLIP image tower" in description
    loaded = model.state_dict()
    for key, value in clip.visual.trunk.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


# A finetuning process of its own, to be killed: it SIGKILLs itself inside update `kill_at` (after the backward
# pass, before the optimizer step's EMA update), as a pre-empted job dies, with no chance to save.
KILLED_FINETUNE = '''
import os, signal, sys
import torch
import finetune.tasks as tasks
from finetune.cli import main

kill_at = int(sys.argv[1])

class KilledTask(tasks.FinetuneTask):
    def after_optimizer_step(self, model):
        if self.updates + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        super().after_optimizer_step(model)

tasks.FinetuneTask = KilledTask
import finetune.classify
finetune.classify.FinetuneTask = KilledTask
torch.set_num_threads(1)
sys.exit(main(sys.argv[2:]))
'''


def test_a_finetune_with_ema_killed_and_resumed_ends_bit_identical(mae_checkpoint, tiny_shards, tmp_path):
    """SIGKILL in step 7 of 8 (checkpoints every 2 steps: the resumed run redoes step 7 from step 6): the weights,
    the EMA's weights, the checkpoint's task state and the evaluation history equal the uninterrupted run's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from pretrain.checkpoint import load_train_state

    def argv(out):
        return finetune_argv("finetune_mae_tiny_fmnist.yaml", out, tiny_shards, f"encoder.checkpoint={mae_checkpoint}",
                             "ema_decay=0.5", "train.save_every=2")

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert finetune_main(argv(reference)) == 0
    script = tmp_path / "killed_finetune.py"
    script.write_text(KILLED_FINETUNE)
    process = subprocess.run([sys.executable, str(script), "7", *argv(killed)], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == -9, process.stderr[-2000:]
    assert not (killed / "checkpoints" / "step_00000008").exists()
    assert (killed / "checkpoints" / "step_00000006").is_dir()
    assert finetune_main([*argv(killed), "train.resume=latest"]) == 0

    for weights in ("last", "ema_last", "checkpoints/step_00000008"):
        expected, got = load_file(reference / weights / "model.safetensors"), load_file(killed / weights / "model.safetensors")
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), weights
    expected_ema = load_train_state(reference / "checkpoints" / "step_00000008")["task"]["ema"]
    got_ema = load_train_state(killed / "checkpoints" / "step_00000008")["task"]["ema"]
    assert all(torch.equal(expected_ema[k], got_ema[k]) for k in expected_ema)
    # the EMA really averages: it is not the trained weights
    last = load_file(reference / "last" / "model.safetensors")
    assert not torch.equal(last["head.weight"], expected_ema["head.weight"])
    history = [json.loads((run / "metrics.json").read_text())["history"] for run in (reference, killed)]
    assert history[0] == history[1]
