"""MAE over Swin: UM-MAE (uniform + secondary masking, compact half-resolution encoder grid, masked-only loss,
timm-loadable encoder) and SimMIM (mask tokens on the full grid, L1 on masked pixels), on the tiny CPU sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.swin_transformer import SwinTransformer

from pretrain.checkpoint import MODEL_FILE, find_latest
from pretrain.cli import main
from pretrain.models import SimMIMSwin, UniformMaskedAutoencoderSwin, create_model

pytestmark = pytest.mark.usefixtures("single_thread")

UM_TINY = "ummae_swin_tiny_cpu"  # 32x32 images, Swin patch 2, 8x8 grid of 4x4 mask patches, 3 stages, window 4
SIMMIM_TINY = "simmim_swin_tiny_cpu"  # the same Swin, 4x4 grid of 8x8 mask patches
TINY_SWIN = dict(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), window_size=4)


def um_model(**overrides) -> UniformMaskedAutoencoderSwin:
    torch.manual_seed(0)
    return create_model(UM_TINY, **overrides)


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def capture(module: torch.nn.Module, store: dict, key: str, output: bool = True):
    """Record a module's output (or first input) in store[key]; returns the hook handle."""
    if output:
        return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out.detach()))
    return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].detach()))


# ------------------------------------------------------------------------------------------------ UM-MAE


def test_uniform_masking_keeps_one_patch_per_2x2_block_on_a_half_resolution_encoder_grid():
    model = um_model().eval()
    imgs = images()
    n, side, u = imgs.shape[0], model.grid_size, model.mask_patch_size  # 8 mask patches a side of 4 px
    noise = torch.rand(n, model.num_patches, generator=torch.Generator().manual_seed(2))
    seen: dict[str, torch.Tensor] = {}
    hooks = [capture(model.patch_embed, seen, "compact_image", output=False),
             capture(model.patch_embed, seen, "tokens"), capture(model.layers[-1], seen, "last_stage")]
    _, pred, mask = model(imgs, noise=noise)
    for hook in hooks:
        hook.remove()

    assert pred.shape == (n, 64, 4 * 4 * 3) and mask.shape == (n, 64)
    per_block = mask.reshape(n, side // 2, 2, side // 2, 2).sum(dim=(2, 4))
    assert torch.equal(per_block, torch.full_like(per_block, 3.0))  # exactly one kept patch per 2x2 block
    assert mask.sum().item() == 0.75 * n * model.num_patches

    # The kept patch of each block is the one with the smallest noise, and the encoder's input image is the kept
    # patches side by side, block by block: half the height and width.
    compact = seen["compact_image"]
    assert compact.shape == (n, 3, 16, 16)
    for i in range(n):
        for block_row in range(side // 2):
            for block_col in range(side // 2):
                cells = [(2 * block_row + dr, 2 * block_col + dc) for dr in (0, 1) for dc in (0, 1)]
                row, col = min(cells, key=lambda rc: noise[i, rc[0] * side + rc[1]].item())
                assert mask[i, row * side + col] == 0
                kept_pixels = imgs[i, :, row * u:(row + 1) * u, col * u:(col + 1) * u]
                placed = compact[i, :, block_row * u:(block_row + 1) * u, block_col * u:(block_col + 1) * u]
                assert torch.equal(placed, kept_pixels)

    # Token grids: 8x8 instead of the full image's 16x16, then 4x4 and 2x2 through the stages.
    full_grid = model.img_size // model.patch_size
    assert seen["tokens"].shape[1:3] == (full_grid // 2, full_grid // 2) == (8, 8)
    assert seen["last_stage"].shape[1:3] == (2, 2)

    # The same noise gives the same mask; fresh randomness gives another.
    assert torch.equal(model(imgs, noise=noise)[2], mask)
    assert not torch.equal(model(imgs)[2], mask)


def test_um_mae_refuses_other_mask_ratios_and_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="mask_ratio must be 0.75"):
        um_model(mask_ratio=0.6)
    with pytest.raises(ValueError, match="mask_ratio must be 0.75"):
        um_model()(images(), mask_ratio=0.5)
    with pytest.raises(ValueError, match="divisible by 2 x mask_patch_size"):
        um_model(img_size=36)  # 9 mask patches a side: no 2x2 blocks
    with pytest.raises(ValueError, match="noise must have shape"):
        um_model()(images(), noise=torch.rand(3, 10))


@pytest.mark.parametrize("share", [0.25, 0.4])
def test_secondary_masking_replaces_a_share_of_kept_patches_with_the_mask_token(share):
    model = um_model(secondary_mask_ratio=share).train()
    imgs = images()
    seen: dict[str, torch.Tensor] = {}
    hooks = [capture(model.patch_embed, seen, "embedded"), capture(model.layers, seen, "encoder_input", output=False)]
    latent, mask, ids_keep, secondary = model.forward_encoder(imgs)
    for hook in hooks:
        hook.remove()

    visible = model.visible_grid_size**2  # 16 kept patches
    expected = round(share * visible)  # 4 or 6
    assert secondary.sum(dim=1).tolist() == [expected] * imgs.shape[0]
    assert mask.sum(dim=1).tolist() == [48] * imgs.shape[0]  # secondary-masked patches count as visible

    # Per kept patch (2x2 tokens each): the mask token exactly where `secondary` says, the embedding elsewhere.
    token = model.patch_embed.norm(model.secondary_mask_token).detach().reshape(-1)

    def per_patch(x: torch.Tensor) -> torch.Tensor:  # [N, 8, 8, D] -> [N, 16 patches, 4 tokens, D]
        n, h, w, d = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(n, visible, 4, d)

    encoder_input, embedded = per_patch(seen["encoder_input"]), per_patch(seen["embedded"])
    is_token = torch.isclose(encoder_input, token.expand_as(encoder_input), atol=1e-6).all(dim=-1).all(dim=-1)
    assert torch.equal(is_token.float(), secondary)
    untouched = secondary == 0
    assert torch.equal(encoder_input[untouched], embedded[untouched])

    # In eval mode (validation, pictures) every kept patch is encoded.
    model.eval()
    assert model.forward_encoder(imgs)[3].sum() == 0


def test_um_loss_counts_only_the_uniformly_masked_patches():
    model = um_model().train()  # with secondary masking
    imgs = images()
    loss, pred, mask = model(imgs)
    assert mask.sum(dim=1).tolist() == [48.0] * 3

    # By hand: per-patch normalised pixels, squared error averaged over the masked patches.
    patches = imgs.reshape(3, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(3, 64, 48)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    errors = [((pred[i, j] - target[i, j]) ** 2).mean() for i in range(3) for j in range(64) if mask[i, j]]
    assert torch.allclose(loss, torch.stack(errors).mean(), rtol=1e-5)

    # Whatever is predicted for kept (and secondary-masked) patches does not count; masked ones do.
    pred = pred.detach()
    scrambled_visible = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn_like(pred) * 100)
    assert torch.allclose(model.forward_loss(imgs, scrambled_visible, mask), loss.detach(), rtol=1e-6)
    scrambled_masked = torch.where(mask.bool().unsqueeze(-1), torch.randn_like(pred), pred)
    assert not torch.allclose(model.forward_loss(imgs, scrambled_masked, mask), loss.detach())

    loss.backward()  # every parameter takes part
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_encoder_export_loads_into_a_timm_swin_with_nothing_missing():
    model = um_model()
    timm_swin = SwinTransformer(**TINY_SWIN, num_classes=0)
    assert model.timm_swin_kwargs() == {**TINY_SWIN, "in_chans": 3, "mlp_ratio": 4.0, "qkv_bias": True}
    result = timm_swin.load_state_dict(model.encoder_state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(timm_swin.state_dict()[k], v) for k, v in model.encoder_state_dict().items())

    # The last stage sees a 2x2 grid here (4x4 in timm's on the full image): it keeps timm's 7x7-offset table
    # and reads, for every pair of its tokens, the entry timm reads for the same offset.
    ours, theirs = model.layers[-1].blocks[0].attn, timm_swin.layers[-1].blocks[0].attn
    assert ours.window_size == (2, 2) and theirs.window_size == (4, 4)
    ours_bias = ours._get_rel_pos_bias()[0]  # [heads, 4, 4]
    theirs_bias = theirs._get_rel_pos_bias()[0].reshape(-1, 4, 4, 4, 4)[:, :2, :2, :2, :2].reshape(-1, 4, 4)
    assert torch.equal(ours_bias, theirs_bias)
    assert timm_swin.forward_features(images(1)).shape == (1, 4, 4, 192)


def test_swin_t_encoders_load_into_timms_swin_tiny_patch4_window7_224():
    import timm

    with torch.device("meta"):  # names and shapes only: nothing is allocated or computed
        swin_t = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
        for name in ("ummae_swin_t_patch4", "simmim_swin_t_patch4"):
            result = swin_t.load_state_dict(create_model(name, img_size=224).encoder_state_dict(), strict=False)
            assert (result.missing_keys, result.unexpected_keys) == ([], []), name


# ------------------------------------------------------------------------------------------------ SimMIM


def test_simmim_forward_backward_with_l1_on_masked_pixels_only():
    torch.manual_seed(0)
    model: SimMIMSwin = create_model(SIMMIM_TINY)
    imgs = images()
    loss, pred, mask = model(imgs)
    assert pred.shape == (3, 16, 8 * 8 * 3) and mask.shape == (3, 16)
    assert mask.sum(dim=1).tolist() == [math.ceil(0.6 * 16)] * 3
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []

    # SimMIM's formula in pixel space: sum(|x - x_rec| * mask) / (masked pixels * channels).
    reconstruction = model.unpatchify(pred.detach())
    pixel_mask = mask.reshape(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
    by_hand = ((reconstruction - imgs).abs() * pixel_mask).sum() / (pixel_mask.sum() * 3)
    assert torch.allclose(loss.detach(), by_hand, rtol=1e-5)
    pred = pred.detach()
    scrambled_visible = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn_like(pred) * 100)
    assert torch.allclose(model.forward_loss(imgs, scrambled_visible, mask), loss.detach(), rtol=1e-6)

    # Masked patches reach the encoder as the mask token: the image under them does not change the output.
    model.eval()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))
    _, pred_a, mask_a = model(imgs, noise=noise)
    _, pred_b, mask_b = model(imgs + 5 * model.unpatchify(mask_a.unsqueeze(-1).expand(-1, -1, 192)), noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.allclose(pred_a, pred_b, atol=1e-5)
    assert torch.equal(mask_a, (noise.argsort(1).argsort(1) >= 16 - 10).float())  # the largest noise is masked


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("name, extra", [(UM_TINY, []), (SIMMIM_TINY, ["model.mask_ratio=0.6",
                                                                         "model.norm_pix_loss=false"])])
def test_tiny_run_through_the_cli_writes_weights_and_pictures(tmp_path, tiny_args, name, extra):
    out = tmp_path / "run"
    assert main(tiny_args(out, f"model.name={name}", "data.image_size=32", "train.stop_after_steps=4", *extra)) == 0

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in records)
    weights = find_latest(out / "checkpoints") / MODEL_FILE
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model_name"] == name
    model_class = UniformMaskedAutoencoderSwin if name == UM_TINY else SimMIMSwin
    model = model_class(**json.loads(metadata["model_config"]))
    model.load_state_dict(load_file(weights))  # strict: the metadata rebuilds exactly this model
    with Image.open(out / "reconstructions.png") as picture:
        assert picture.format == "PNG" and picture.width > 100
