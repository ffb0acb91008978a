"""MSwin (V2X-ViT's multi-scale window attention) as a timm image backbone: the contract of
pretrain/models/backbones, and the semantics of the attention (parallel branches, split-attention fusion, padded
windows) checked against direct, window-by-window references."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

import pretrain.models.backbones.mswin as mswin
from pretrain.models import create_model
from pretrain.models.backbones import load_official_checkpoint
from pretrain.models.backbones.mswin import BaseWindowAttention, MSwinTransformer, PyramidWindowAttention

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = "mswin_cpu"  # 32x32 inputs, patch 2, widths 32/64/128, maps 16/8/4, windows 4/8/16, 2 blocks a stage


def images(n: int = 2, height: int = 32, width: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, height, width, generator=torch.Generator().manual_seed(1))


def cpu_model(**kwargs) -> MSwinTransformer:
    torch.manual_seed(0)
    return timm.create_model(CPU, **kwargs).eval()


# --------------------------------------------------------------------------------------------- the contract


def test_shapes_through_every_hook():
    model = cpu_model(num_classes=10)
    x = images()
    tokens = model.forward_embed(x)
    assert tokens.shape == (2, 16, 16, 32) and model.patch_stride == 2 and model.embed_dim == 32
    features = model.forward_features(x)
    assert features.shape == (2, 4, 4, 128) and model.num_features == 128 and model.output_fmt == "NHWC"
    torch.testing.assert_close(model.forward_stages(tokens), features)
    assert model.forward_head(features).shape == (2, 10)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean((1, 2)))
    torch.testing.assert_close(model(x), model.get_classifier()(features.mean((1, 2))))

    model.reset_classifier(0)
    assert model(x).shape == (2, 128) and model.num_classes == 0
    model.reset_classifier(5, global_pool="")
    assert model(x).shape == (2, 4, 4, 5)  # "" keeps the map
    assert cpu_model(global_pool="")(x).shape == (2, 4, 4, 1000)


def test_timm_kwargs_and_no_downloads():
    model = cpu_model(in_chans=1, num_classes=3, drop_path_rate=0.1, img_size=32, dynamic_img_size=True)
    assert model(images(channels=1)).shape == (2, 3)
    rates = [getattr(block.drop_path2, "drop_prob", 0.0) for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.1 * i / 5 for i in range(6)])  # linear over the blocks, as Swin
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(CPU, pretrained=True)


def test_any_multiple_of_size_multiple_runs_and_other_sizes_are_named():
    model = cpu_model(num_classes=0)
    assert model.size_multiple == 8
    # 40x24: maps 20x12 / 10x6 / 5x3, none a multiple of every window: padded inside the attention
    assert model.forward_features(images(height=40, width=24)).shape == (2, 5, 3, 128)
    assert model.forward_features(images(height=8, width=16)).shape == (2, 1, 2, 128)  # maps smaller than windows
    with pytest.raises(ValueError, match="33x32"):
        model(images(height=33))


def test_feature_info_describes_the_stage_outputs():
    model = cpu_model()
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (32, 2, "layers.0"), (64, 4, "layers.1"), (128, 8, "layers.2")]
    seen = {}
    modules = dict(model.named_modules())
    for info in model.feature_info:
        modules[info["module"]].register_forward_hook(lambda m, a, out, key=info["module"]: seen.__setitem__(key, out))
    model(images())
    for info in model.feature_info:
        assert seen[info["module"]].shape == (2, 32 // info["reduction"], 32 // info["reduction"], info["num_chs"])
    torch.manual_seed(0)
    features = timm.create_model(CPU, features_only=True, out_indices=(1, 2))(images())
    assert [tuple(f.shape) for f in features] == [(2, 8, 8, 64), (2, 4, 4, 128)]  # NHWC, as timm's Swin


def test_tiny_parameter_count():
    """mswin_tiny against a closed form of the architecture (Swin-T's layout, every branch full width): no paper
    reports an image MSwin, so the count is derived here and pinned at 54.17 M."""
    with torch.device("meta"):
        model = timm.create_model("mswin_tiny")
    dims, depths, windows = [96, 192, 384, 768], [2, 2, 6, 2], [[7, 14, 28], [7, 14, 28], [7, 14, 14], [7, 7, 7]]

    def block(d: int, stage_windows: list[int]) -> int:
        branches = sum(3 * d * d + (2 * w - 1) ** 2 + d * d + d for w in stage_windows)  # to_qkv, table, to_out
        split_attn = d * d + 2 * d + 3 * d * d  # fc1, LayerNorm, fc2 (3 branches)
        mlp = d * 4 * d + 4 * d + 4 * d * d + d
        return 2 * d + branches + split_attn + 2 * d + mlp

    expected = 3 * 96 * 16 + 96 + 2 * 96  # patch embedding conv + LayerNorm
    for i, d in enumerate(dims):
        expected += depths[i] * block(d, windows[i])
        if i:
            expected += 2 * 4 * dims[i - 1] + 4 * dims[i - 1] * d  # patch merging: LayerNorm + reduction
    expected += 2 * 768 + 768 * 1000 + 1000  # final norm, head
    count = sum(p.numel() for p in model.parameters())
    assert count == expected
    assert count == pytest.approx(54.17e6, rel=0.01)
    # windows clipped to the 56/28/14/7 maps at 224
    assert [[b.window_size for b in stage.blocks[0].attn.pwmsa] for stage in model.layers] == windows


def test_grad_checkpointing_checkpoints_every_block_with_the_same_result(monkeypatch):
    model = cpu_model(num_classes=10)
    x = images()

    def loss_and_grads():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = loss_and_grads()
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(mswin, "checkpoint", counting_checkpoint)
    model.set_grad_checkpointing(True)
    checkpointed, checkpointed_grads = loss_and_grads()
    assert calls == [False] * 6  # every block, non-reentrant
    torch.testing.assert_close(checkpointed, plain)
    for a, b in zip(checkpointed_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_layer_decay_gives_every_block_its_own_scale():
    model = cpu_model()
    no_decay = model.no_weight_decay()
    assert no_decay == {n for n, _ in model.named_parameters() if n.endswith("pos_embedding")} and len(no_decay) == 18
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=no_decay, layer_decay=0.75)
    assert len({g["lr_scale"] for g in groups}) == 6 + 2  # stem, 6 blocks, head
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter, once
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    order = ["patch_embed.proj.weight", "layers.0.blocks.0.norm1.weight", "layers.0.blocks.1.norm1.weight",
             "layers.1.downsample.reduction.weight", "layers.1.blocks.1.norm1.weight",
             "layers.2.blocks.1.mlp.fc2.weight", "head.fc.weight"]
    scales = [scale[id(params[name])][0] for name in order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales) and scales[-1] == 1.0
    # as timm's Swin: a stage's merging joins its first block, the final norm the last block
    for joined, block in [("layers.1.downsample.reduction.weight", "layers.1.blocks.0.norm1.weight"),
                          ("norm.weight", "layers.2.blocks.1.norm1.weight")]:
        assert scale[id(params[joined])][0] == scale[id(params[block])][0]
    assert scale[id(params["layers.0.blocks.0.attn.pwmsa.0.pos_embedding"])][1] == 0.0


def test_official_names_and_checkpoint_road():
    model = cpu_model()
    state = model.state_dict()
    prefix = "layers.2.blocks.1.attn."
    for key, shape in [("pwmsa.0.to_qkv.weight", (384, 128)), ("pwmsa.0.pos_embedding", (7, 7)),
                       ("pwmsa.2.to_out.0.weight", (128, 128)), ("pwmsa.2.to_out.0.bias", (128,)),
                       ("split_attn.fc1.weight", (128, 128)), ("split_attn.bn1.weight", (128,)),
                       ("split_attn.fc2.weight", (384, 128))]:
        assert state[prefix + key].shape == shape, key
    assert not any("relative_indices" in key for key in state)  # never saved, as the official plain tensor
    assert mswin.checkpoint_filter_fn(state, model).keys() == state.keys()
    carried = {**state, prefix + "pwmsa.0.relative_indices": torch.zeros(1)}
    assert mswin.checkpoint_filter_fn(carried, model).keys() == state.keys()

    other = cpu_model()
    torch.manual_seed(5)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    load_official_checkpoint(other, state)  # through the one checked loader
    torch.testing.assert_close(other(images()), model(images()))


def test_simmim_pretrains_through_embed_and_stages():
    torch.manual_seed(0)
    simmim = create_model("simmim_mswin_cpu")
    loss, pred, mask = simmim(images(4))
    assert torch.isfinite(loss) and pred.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
    loss.backward()
    assert simmim.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- MSwin semantics


def reference_branch(branch: BaseWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """One branch computed window by window over the real tokens only: windows of the branch's side anchored at
    multiples of it (the last ones cut by the map's edge; the whole map when it is smaller), each token attending to
    the real tokens of its window with the table entry of their (row, col) offset. x: [N, H, W, C]."""
    n, height, width, _ = x.shape
    side, heads = branch.window_size, branch.heads
    q, k, v = branch.to_qkv(x).view(n, height, width, 3, heads, -1).unbind(3)  # [N, H, W, heads, d]
    out = torch.zeros_like(q)
    for top in range(0, height, side):
        for left in range(0, width, side):
            rows, cols = range(top, min(top + side, height)), range(left, min(left + side, width))
            cells = [(r, c) for r in rows for c in cols]
            qw, kw, vw = (t[:, list(rows)][:, :, list(cols)].flatten(1, 2) for t in (q, k, v))  # [N, T, heads, d]
            bias = torch.stack([torch.stack([branch.pos_embedding[rj - ri + side - 1, cj - ci + side - 1]
                                             for rj, cj in cells]) for ri, ci in cells])
            attn = (torch.einsum("nihd,njhd->nhij", qw, kw) * branch.scale + bias).softmax(-1)
            window = torch.einsum("nhij,njhd->nihd", attn, vw).view(n, len(rows), len(cols), heads, -1)
            out[:, top:top + len(rows), left:left + len(cols)] = window
    return branch.to_out(out.flatten(3))


@pytest.mark.parametrize("height, width, side", [(8, 8, 4), (6, 5, 4), (10, 3, 8), (3, 2, 4)])
def test_padded_windows_mask_the_padding(height, width, side):
    """Maps that are not multiples of the window (padded to it inside the attention) or smaller than it (attended
    whole) give exactly the window-by-window attention over the real tokens: the padded keys get no weight."""
    torch.manual_seed(0)
    branch = BaseWindowAttention(dim=12, heads=3, dim_head=4, window_size=side).eval()
    x = torch.randn(2, height, width, 12)
    with torch.no_grad():
        torch.testing.assert_close(branch(x), reference_branch(branch, x), atol=1e-5, rtol=1e-5)


def window_of(cell: tuple[int, int], side: int, height: int, width: int) -> torch.Tensor:
    """[H, W] bool: the side x side window (anchored at multiples of side) holding cell."""
    r, c = cell[0] // side * side, cell[1] // side * side
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[r:r + side, c:c + side] = True
    return inside


def test_branches_run_in_parallel_on_the_same_input():
    """Perturbing one token changes a branch's output exactly on that token's window, and the fused output (fusion
    weights held fixed) exactly on the union of its windows; serial windows would spread it further."""
    torch.manual_seed(0)
    attn = PyramidWindowAttention(dim=8, heads=[2, 1], dim_heads=[4, 8], window_sizes=[2, 3]).eval()
    torch.nn.init.zeros_(attn.split_attn.fc2.weight)  # fusion weights: 1/2 each, whatever the input
    x = torch.randn(1, 6, 6, 8)
    cell = (2, 2)  # in the 2-window rows 2-3 x cols 2-3 and the 3-window rows 0-2 x cols 0-2
    moved = x.clone()
    moved[0, cell[0], cell[1]] += 1.0
    windows = [window_of(cell, side, 6, 6) for side in (2, 3)]
    with torch.no_grad():
        for branch, inside in zip(attn.pwmsa, windows):
            changed = (branch(moved) - branch(x)).abs().amax(-1)[0] > 1e-6
            assert torch.equal(changed, inside)
        changed = (attn(moved) - attn(x)).abs().amax(-1)[0] > 1e-6
        assert torch.equal(changed, windows[0] | windows[1])  # L-shaped: neither window holds the other

        # the fused output is the weighted sum of every branch applied to the same input
        attn = PyramidWindowAttention(dim=8, heads=[2, 1], dim_heads=[4, 8], window_sizes=[2, 3]).eval()
        branches = [branch(x) for branch in attn.pwmsa]
        weights = attn.split_attn.branch_weights(branches)
        expected = branches[0] * weights[:, 0, None, None] + branches[1] * weights[:, 1, None, None]
        torch.testing.assert_close(attn(x), expected)


def test_split_attention_weights_are_a_softmax_over_branches():
    torch.manual_seed(0)
    attn = PyramidWindowAttention(dim=16, heads=[4, 2, 1], dim_heads=[4, 8, 16], window_sizes=[2, 4, 8]).eval()
    with torch.no_grad():
        x = torch.randn(3, 8, 8, 16)
        weights = attn.split_attn.branch_weights([branch(x) for branch in attn.pwmsa])
        assert weights.shape == (3, 3, 16)  # [N, branches, channels]
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(1), torch.ones(3, 16))
        assert weights.std(dim=(0, 2)).min() > 0  # input- and channel-dependent, not a fixed mean
        # the same logits through the official layout: fc2's output is branch-major, softmax over the branches
        pooled = sum(branch(x) for branch in attn.pwmsa).mean((1, 2))
        s = attn.split_attn
        logits = s.fc2(s.act1(s.bn1(s.fc1(pooled))))
        torch.testing.assert_close(weights, logits.view(3, 3, 16).softmax(1))
        with pytest.raises(ValueError, match="3 branches"):
            attn.split_attn([x, x])
