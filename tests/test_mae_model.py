"""MAE model: masking, loss, patches, position embeddings, checkpoint layout, timm interop, pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from pretrain.models import (
    MaskedAutoencoderViT,
    create_model,
    list_models,
    load_official_mae_checkpoint,
    sincos_pos_embed_2d,
)
from pretrain.visualize import GRID_COLUMNS, MASKED_GREY, save_loss_curve, save_reconstruction_grid

SMALL = dict(
    img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
)  # fmt: skip
NUM_PATCHES = (16 // 4) ** 2


@pytest.fixture
def model() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**SMALL)


def images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- masking ---


@pytest.mark.parametrize("mask_ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_random_masking_keeps_expected_count_and_restore_inverts_shuffle(model, mask_ratio):
    n, length, dim = 4, NUM_PATCHES, 5
    x = torch.randn(n, length, dim)
    noise = torch.rand(n, length)
    x_masked, mask, ids_restore = model.random_masking(x, mask_ratio, noise)

    len_keep = round(length * (1 - mask_ratio))
    assert x_masked.shape == (n, len_keep, dim)
    assert torch.equal(mask.sum(dim=1), torch.full((n,), float(length - len_keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}

    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(n, -1))
    # The kept tokens are the patches marked 0 in the mask, in ascending-noise order.
    for i in range(n):
        kept = ids_shuffle[i, :len_keep]
        assert torch.equal(x_masked[i], x[i, kept])
        assert torch.all(mask[i, kept] == 0)


def test_same_noise_gives_same_mask_and_other_noise_another(model):
    imgs = images()
    noise = torch.rand(imgs.shape[0], NUM_PATCHES)
    _, _, mask_a = model(imgs, noise=noise)
    _, _, mask_b = model(imgs, noise=noise.clone())
    _, _, mask_c = model(imgs, noise=torch.rand(imgs.shape[0], NUM_PATCHES))
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c)


def test_invalid_mask_ratio_and_noise_shape_are_rejected(model):
    with pytest.raises(ValueError, match="mask_ratio"):
        model(images(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="noise"):
        model(images(), noise=torch.rand(3, NUM_PATCHES + 1))


# --- loss and targets ---


def test_loss_counts_masked_patches_only(model):
    imgs = images()
    loss, pred, mask = model(imgs)
    visible = (mask == 0).unsqueeze(-1)
    masked = (mask == 1).unsqueeze(-1)

    pred_visible_changed = pred + 10.0 * visible
    assert torch.allclose(model.forward_loss(imgs, pred_visible_changed, mask), loss)
    pred_masked_changed = pred + 10.0 * masked
    assert not torch.allclose(model.forward_loss(imgs, pred_masked_changed, mask), loss)
    # Predicting the target exactly gives zero loss.
    assert model.forward_loss(imgs, model.patch_targets(imgs), mask).item() == pytest.approx(0.0, abs=1e-10)


def test_norm_pix_targets_are_per_patch_standardised(model):
    imgs = images() * 3.0 + 5.0
    targets = model.patch_targets(imgs)
    assert targets.shape == (3, NUM_PATCHES, 4 * 4 * 3)
    assert torch.allclose(targets.mean(dim=-1), torch.zeros(3, NUM_PATCHES), atol=1e-5)
    assert torch.allclose(targets.var(dim=-1), torch.ones(3, NUM_PATCHES), atol=1e-4)
    # pred_to_pixels undoes the normalisation.
    assert torch.allclose(model.pred_to_pixels(targets, imgs), model.patchify(imgs), atol=1e-4)

    raw = MaskedAutoencoderViT(**SMALL, norm_pix_loss=False)
    assert torch.equal(raw.patch_targets(imgs), raw.patchify(imgs))


def test_patchify_layout_and_unpatchify_round_trip(model):
    imgs = images()
    patches = model.patchify(imgs)
    assert patches.shape == (3, NUM_PATCHES, 48)
    # Patch 1 is the top row's second 4x4 square, flattened as (row, column, channel) like MAE.
    assert torch.equal(patches[:, 1], imgs[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(3, -1))
    assert torch.equal(model.unpatchify(patches), imgs)


def test_gradient_checkpointing_gives_same_loss_and_grads(model):
    imgs, noise = images(), torch.rand(3, NUM_PATCHES)
    model.train()
    model(imgs, noise=noise)[0].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(imgs, noise=noise)[0].backward()
    for k, p in model.named_parameters():
        if k in grads:
            assert torch.allclose(p.grad, grads[k], atol=1e-6), k


# --- position embeddings ---


def numpy_mae_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """The MAE formula, written out independently: meshgrid(w, h), first half from grid[0], sin then cos."""

    def one_dim(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    embed = np.concatenate([one_dim(embed_dim // 2, grid[0]), one_dim(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), embed], axis=0)


@pytest.mark.parametrize("embed_dim,grid_size", [(32, 4), (768, 14)])
def test_sincos_pos_embed_matches_mae_formula(embed_dim, grid_size):
    ours = sincos_pos_embed_2d(embed_dim, grid_size, cls_token=True)
    assert ours.shape == (grid_size**2 + 1, embed_dim)
    np.testing.assert_allclose(ours.numpy(), numpy_mae_sincos(embed_dim, grid_size), atol=1e-6)


def test_model_uses_fixed_pos_embeds(model):
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed[0].numpy(), numpy_mae_sincos(32, 4), atol=1e-6)
    np.testing.assert_allclose(model.decoder_pos_embed[0].numpy(), numpy_mae_sincos(16, 4), atol=1e-6)
    assert model.no_weight_decay() == {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


# --- checkpoint layout ---


def official_mae_shapes(img_size, patch_size, in_chans, embed_dim, depth, decoder_embed_dim, decoder_depth, mlp_ratio,
                        **_) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Key -> shape of facebookresearch/mae's MaskedAutoencoderViT, spelled out from its naming."""
    length = (img_size // patch_size) ** 2

    def block(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
        hidden = int(dim * mlp_ratio)
        return {
            f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
            f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.qkv.bias": (3 * dim,),
            f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
            f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
            f"{prefix}.mlp.fc1.weight": (hidden, dim), f"{prefix}.mlp.fc1.bias": (hidden,),
            f"{prefix}.mlp.fc2.weight": (dim, hidden), f"{prefix}.mlp.fc2.bias": (dim,),
        }  # fmt: skip

    shapes = {
        "cls_token": (1, 1, embed_dim),
        "pos_embed": (1, length + 1, embed_dim),
        "patch_embed.proj.weight": (embed_dim, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (embed_dim,),
    }
    for i in range(depth):
        shapes.update(block(f"blocks.{i}", embed_dim))
    shapes.update({"norm.weight": (embed_dim,), "norm.bias": (embed_dim,)})
    shapes.update({
        "decoder_embed.weight": (decoder_embed_dim, embed_dim), "decoder_embed.bias": (decoder_embed_dim,),
        "mask_token": (1, 1, decoder_embed_dim),
        "decoder_pos_embed": (1, length + 1, decoder_embed_dim),
    })  # fmt: skip
    for i in range(decoder_depth):
        shapes.update(block(f"decoder_blocks.{i}", decoder_embed_dim))
    shapes.update({
        "decoder_norm.weight": (decoder_embed_dim,), "decoder_norm.bias": (decoder_embed_dim,),
        "decoder_pred.weight": (patch_size**2 * in_chans, decoder_embed_dim),
        "decoder_pred.bias": (patch_size**2 * in_chans,),
    })  # fmt: skip
    return shapes


def random_official_state_dict(encoder_only: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shapes = official_mae_shapes(**SMALL)
    state = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    return state


def test_state_dict_matches_official_names_and_shapes(model):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_mae_shapes(**SMALL)


@pytest.mark.parametrize("file_format", ["dict", "pth", "safetensors"])
def test_official_checkpoint_loads_completely(model, tmp_path, file_format):
    state = random_official_state_dict()
    if file_format == "dict":
        source = state
    elif file_format == "pth":
        source = tmp_path / "checkpoint-399.pth"
        torch.save({"model": state, "epoch": 399}, source)  # the official training-checkpoint layout
    else:
        from safetensors.torch import save_file

        source = tmp_path / "mae.safetensors"
        save_file(state, str(source))

    report = load_official_mae_checkpoint(model, source)
    assert report["loaded"] == len(state) and report["decoder_loaded"] and report["not_loaded"] == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_encoder_only_checkpoint_loads_encoder_and_reports_decoder(model):
    decoder_before = model.decoder_pred.weight.clone()
    state = random_official_state_dict(encoder_only=True)
    report = load_official_mae_checkpoint(model, {"model": state})
    assert report["loaded"] == len(state) and not report["decoder_loaded"]
    assert "decoder_pred.weight" in report["not_loaded"] and "mask_token" in report["not_loaded"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.decoder_pred.weight, decoder_before)


def test_bad_checkpoints_raise_naming_the_keys(model):
    wrong_shape = random_official_state_dict()
    wrong_shape["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    with pytest.raises(ValueError, match=r"shape mismatch.*blocks\.0\.mlp\.fc1\.weight"):
        load_official_mae_checkpoint(model, wrong_shape)

    extra_and_missing = random_official_state_dict()
    extra_and_missing["head.weight"] = torch.zeros(10, 32)
    del extra_and_missing["decoder_norm.bias"]
    with pytest.raises(ValueError, match=r"missing \(1\): decoder_norm\.bias; unexpected \(1\): head\.weight"):
        load_official_mae_checkpoint(model, extra_and_missing)


# --- timm interop ---


def test_base_encoder_loads_into_timm_vit_base_strictly():
    with torch.device("meta"):
        mae = create_model("mae_vit_base_patch16")
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    result = vit.load_state_dict(mae.encoder_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    encoder_numel = sum(v.numel() for v in mae.encoder_state_dict().values())
    assert encoder_numel == sum(v.numel() for v in vit.state_dict().values())


def test_tiny_encoder_matches_timm_vit_features():
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch4").eval()
    vit = VisionTransformer(**mae.timm_vit_kwargs(), num_classes=0).eval()
    vit.load_state_dict(mae.encoder_state_dict(), strict=True)

    imgs = images(2, size=32)
    identity_order = torch.arange(mae.num_patches, dtype=torch.float32).expand(2, -1)  # argsort is the identity
    with torch.no_grad():
        latent, mask, ids_restore = mae.forward_encoder(imgs, mask_ratio=0.0, noise=identity_order)
        features = vit.forward_features(imgs)
    assert mask.sum() == 0 and torch.equal(ids_restore, torch.arange(mae.num_patches).expand(2, -1))
    assert latent.shape == features.shape == (2, 1 + mae.num_patches, 192)
    assert torch.allclose(latent, features, atol=1e-5)


def test_registry():
    assert {"mae_vit_tiny_patch4", "mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16",
            "mae_vit_huge_patch14"} <= set(list_models())  # fmt: skip
    with pytest.raises(ValueError, match="mae_vit_base_patch16"):
        create_model("mae_vit_bsae_patch16")
    with torch.device("meta"):
        model = create_model("mae_vit_base_patch16", img_size=96)
    assert model.num_patches == 36 and model.pos_embed.shape == (1, 37, 768)
    assert model.config["img_size"] == 96 and model.config["embed_dim"] == 768
    tiny = create_model("mae_vit_tiny_patch4")
    assert 1e6 < sum(p.numel() for p in tiny.parameters()) < 4e6
    deep = create_model("mae_vit_tiny_d12_patch4")  # the same at ViT-Tiny's 12 blocks: only the depth differs
    assert len(tiny.blocks) == 6 and len(deep.blocks) == 12
    assert {k: v for k, v in deep.config.items() if k != "depth"} == {k: v for k, v in tiny.config.items() if k != "depth"}
    assert 5e6 < sum(p.numel() for p in deep.parameters()) < 6e6
    rebuilt = MaskedAutoencoderViT(**tiny.config)
    result = rebuilt.load_state_dict(tiny.state_dict(), strict=True)  # config alone rebuilds the architecture
    assert not result.missing_keys and not result.unexpected_keys


# --- pictures ---


def test_reconstruction_grid_png(model, tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    imgs = images(5)
    noise = torch.rand(5, NUM_PATCHES)
    model.train()
    path = tmp_path / "recon" / "step_10.png"
    panels = save_reconstruction_grid(model, imgs, path, mean, std, mask_ratio=0.5, noise=noise, max_images=4)
    assert model.training  # mode restored

    with Image.open(path) as picture:
        picture.load()
        width, height = picture.size
        assert picture.format == "PNG"
    assert width / height == pytest.approx(len(GRID_COLUMNS) / 4)  # 4 columns, 4 rows (max_images)

    assert panels.shape == (4, len(GRID_COLUMNS), 3, 16, 16)
    assert panels.min() >= 0 and panels.max() <= 1
    _, _, mask = model(imgs[:4], mask_ratio=0.5, noise=noise[:4])
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48)).bool()  # [4, 3, 16, 16]
    original, masked_input, reconstruction, pasted = panels.unbind(dim=1)
    expected_original = imgs[:4] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    expected_original = expected_original.clamp(0, 1)
    assert torch.allclose(original, expected_original, atol=1e-6)
    assert torch.all(masked_input[pixel_mask] == MASKED_GREY)
    assert torch.equal(masked_input[~pixel_mask], original[~pixel_mask])
    assert torch.equal(pasted[~pixel_mask], original[~pixel_mask])
    assert torch.equal(pasted[pixel_mask], reconstruction[pixel_mask])


def test_loss_curve_png(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": s, "loss": 1.0 / (s + 1), "lr": 1e-4 * min(1, s / 5)} for s in range(20)]
    records.insert(3, {"step": 3, "eval_top1": 0.1})  # non-loss records are skipped
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    save_loss_curve(log, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 100

    log.write_text('{"step": 1, "loss": 0.5}\n{broken\n')
    with pytest.raises(ValueError, match=r"log\.jsonl:2"):
        save_loss_curve(log, tmp_path / "bad.png")
