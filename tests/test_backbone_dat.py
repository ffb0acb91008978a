"""DAT v1 (pretrain/models/backbones/dat.py): timm registration, the backbone contract, parity with the official
code (a fixture written by the official LeapLabTHU/DAT@CVPR2022 model) and the deformable attention's sampling."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

import pretrain.models.backbones.dat as dat
from pretrain.models.backbones import load_official_checkpoint
from pretrain.models.simmim import SimMIMBackbone

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.usefixtures("single_thread")


def cpu_model(**kwargs) -> dat.DAT:
    torch.manual_seed(0)
    return timm.create_model("dat_cpu", num_classes=10, **kwargs)


def deformable(model: dat.DAT) -> dat.DeformableAttention:
    """dat_cpu's first deformable attention: stage 2 (a 4x4 map, 128 channels, 2 groups, range factor 2)."""
    attn = model.stages[2].attns[1]
    assert isinstance(attn, dat.DeformableAttention)
    return attn


# ------------------------------------------------------------------------------------------------ timm and shapes

def test_registered_sizes_build_by_name():
    for name in ("dat_cpu", "dat_tiny", "dat_small", "dat_base"):
        assert name in timm.list_models("dat_*")
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("dat_cpu", pretrained=True)


def test_contract_shapes():
    model = cpu_model().eval()
    images = torch.randn(2, 3, 32, 32)
    assert (model.patch_stride, model.embed_dim, model.num_features, model.output_fmt) == (2, 32, 256, "NHWC")
    tokens = model.forward_embed(images)
    assert tokens.shape == (2, 16, 16, 32)
    features = model.forward_stages(tokens)
    assert features.shape == (2, 2, 2, 256)
    torch.testing.assert_close(model.forward_features(images), features)
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    logits = model(images)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(model.forward_head(features), logits)
    # the head is the final norm's average, then cls_head
    torch.testing.assert_close(logits, model.get_classifier()(features.mean(dim=(1, 2))))

    model.reset_classifier(0, global_pool="")
    assert model.get_classifier().__class__ is torch.nn.Identity
    assert model(images).shape == (2, 2, 2, 256)  # "" keeps the map
    model.reset_classifier(7, global_pool="avg")
    assert model(images).shape == (2, 7)


def test_timm_common_kwargs():
    model = timm.create_model("dat_cpu", in_chans=1, num_classes=0, global_pool="avg", drop_path_rate=0.1,
                              img_size=64, dynamic_img_size=True)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 256)  # no head: the pooled features
    assert isinstance(model.stages[3].drop_path[0], timm.layers.DropPath)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("dat_cpu", global_pool="max")


def test_paper_parameter_counts():
    """Table 1 of the paper: DAT-T 28.3 M (29 M rounded), DAT-S 50 M, DAT-B 88 M."""
    for name, millions in (("dat_tiny", 28.3), ("dat_small", 50.0), ("dat_base", 88.0)):
        with torch.device("meta"):
            model = timm.create_model(name)
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert count == pytest.approx(millions, rel=0.01), name
    assert 0.5 < sum(p.numel() for p in cpu_model().parameters()) / 1e6 < 2


def test_feature_info_matches_the_stages():
    model = cpu_model().eval()
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(32, 2), (64, 4), (128, 8), (256, 16)]
    maps = []
    hooks = [model.get_submodule(f["module"]).register_forward_hook(lambda m, i, out: maps.append(out.shape))
             for f in model.feature_info]
    model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert maps == [(2, f["num_chs"], 32 // f["reduction"], 32 // f["reduction"]) for f in model.feature_info]


def test_sizes_that_are_not_multiples_of_size_multiple_are_value_errors():
    model = cpu_model().eval()
    assert model.size_multiple == 16
    for height, width in ((40, 32), (32, 24)):
        with pytest.raises(ValueError, match=f"{height}x{width}"):
            model(torch.randn(1, 3, height, width))
    with pytest.raises(ValueError, match="40x40"):
        model.forward_stages(torch.randn(1, 20, 20, 32))
    with pytest.raises(ValueError, match="window 4"):  # stage 2 of a 48 px input: a 6x6 map
        timm.create_model("dat_cpu", img_size=48, window_sizes=(4, 4, 4, 2))
    with torch.device("meta"):
        assert timm.create_model("dat_tiny", img_size=448).size_multiple == 224
    # other multiples run (tables resized, masks rebuilt: the next test); a full bias table (fixed_pes) cannot
    assert model.forward_features(torch.randn(1, 3, 64, 96)).shape == (1, 4, 6, 256)
    fixed = cpu_model(fixed_pes=(False, False, True, True))
    assert fixed(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="64x64"):
        fixed(torch.randn(1, 3, 64, 64))


def test_another_size_runs_as_a_model_built_for_it_from_the_same_checkpoint():
    """At 64 px, a model built for 32 px (its rpe tables resized, its shift masks rebuilt on the fly) gives what a
    model built for 64 px gives with the 32 px weights fitted by checkpoint_filter_fn, the official
    load_pretrained's road (checked against the official code for these sizes)."""
    model = cpu_model().eval()
    bigger = timm.create_model("dat_cpu", num_classes=10, img_size=64).eval()
    load_official_checkpoint(bigger, {"model": model.state_dict()})
    assert bigger.stages[3].attns[0].rpe_table.shape == (16, 7, 7)
    # its own shift mask: 16 windows of its 16x16 stage-1 map, where the checkpoint's has the 4 of an 8x8 one
    assert model.stages[1].attns[0].attn_mask.shape == (4, 16, 16)
    torch.testing.assert_close(bigger.stages[1].attns[0].attn_mask, bigger.stages[1].attns[0].window_mask(16, 16))
    assert bigger.stages[1].attns[0].attn_mask.shape == (16, 16, 16)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), bigger(images))


# ------------------------------------------------------------------------------------------------ training hooks

def test_grad_checkpointing_recomputes_blocks_with_the_same_results():
    model = cpu_model(drop_path_rate=0.1).train()
    images = torch.randn(2, 3, 32, 32)

    def run():
        calls = []
        hook = model.stages[2].attns[1].register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the same drop-path draws
        model.zero_grad()
        loss = model(images).square().sum()
        loss.backward()
        hook.remove()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss, grads, calls = run()
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt, calls_ckpt = run()
    assert (calls, calls_ckpt) == (1, 2)  # the checkpointed block runs again in the backward pass
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_layer_decay_groups_give_every_block_its_own_layer():
    model = cpu_model()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75,
                                      no_weight_decay_list=model.no_weight_decay())
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == sum(model.depths) + 2  # patch embedding, each block, head (cls_norm: the last block's)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    scale = {name: g["lr_scale"] for g in groups for name, p in named.items() if any(p is q for q in g["params"])}
    assert scale["patch_proj.0.weight"] == scales[0] and scale["cls_head.weight"] == scales[-1] == 1.0
    # block 1 of stage 2 (layer norms 2 and 3, attention 1, MLP 1) is one layer, above block 0
    block = ("stages.2.layer_norms.2.", "stages.2.layer_norms.3.", "stages.2.attns.1.", "stages.2.mlps.1.")
    assert {scale[n] for n in named if n.startswith(block)} == {scale["stages.2.attns.1.proj_q.weight"]}
    assert scale["stages.2.attns.1.proj_q.weight"] > scale["stages.2.attns.0.proj_qkv.weight"]
    # a down-projection joins the first block of the stage it feeds; the final norm the last block (timm's rule)
    assert scale["down_projs.1.0.weight"] == scale["stages.2.layer_norms.0.norm.weight"]
    assert scale["cls_norm.norm.weight"] == scale["stages.3.attns.0.proj_q.weight"]
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 4 + 2  # the patch embedding, four stages, the head


def test_no_weight_decay_names_the_position_tables():
    model = cpu_model()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names and names <= params.keys()
    assert names == {n for n in params if n.endswith(("relative_position_bias_table", "rpe_table"))}
    assert "stages.3.attns.0.rpe_table" in names


def test_simmim_pretrains_it_through_forward_embed_and_forward_stages():
    torch.manual_seed(0)
    model = SimMIMBackbone("dat_cpu", img_size=32, mask_patch_size=8, mask_ratio=0.5)
    loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.shape == (2, 16)
    assert model.encoder.stages[3].attns[0].conv_offset[-1].weight.grad.abs().sum() > 0  # offsets learn


# ------------------------------------------------------------------------------------------------ official parity

def test_official_checkpoint_gives_the_official_logits():
    """tests/fixtures/dat_official_tiny{.pth,_io.pt}, written by the official v1 model (LeapLabTHU/DAT@CVPR2022
    models/dat.py; tests/fixtures/dat_make_official_fixture.py): built with `config`, its weights perturbed, its
    state dict and its eval-mode logits for `input`."""
    io = torch.load(FIXTURES / "dat_official_tiny_io.pt", weights_only=True)
    model = dat.DAT(**io["config"]).eval()
    load_official_checkpoint(model, FIXTURES / "dat_official_tiny.pth")  # strict: every name, shape and buffer
    official = torch.load(FIXTURES / "dat_official_tiny.pth", weights_only=True)["model"]
    buffers = dict(model.named_buffers())
    assert {k.rsplit(".", 1)[-1] for k in buffers} == {"relative_position_index", "attn_mask"}
    fresh = dat.DAT(**io["config"])  # our buffers, built rather than loaded, are the official ones
    for name, buffer in fresh.named_buffers():
        assert torch.equal(buffer, official[name]) and buffer.dtype == official[name].dtype, name
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["logits"], atol=1e-4, rtol=0)


def test_checkpoint_filter_fn_passes_our_own_state_unchanged():
    model = cpu_model()
    state = model.state_dict()
    filtered = dat.checkpoint_filter_fn(state, model)
    assert filtered.keys() == state.keys() and all(filtered[k] is state[k] for k in state)
    assert dat.checkpoint_filter_fn({"model": state}, model).keys() == state.keys()


# ------------------------------------------------------------------------------------------------ deformable sampling

def test_zero_offsets_sample_keys_on_the_reference_grid():
    torch.manual_seed(0)
    attn = deformable(cpu_model())
    torch.nn.init.zeros_(attn.conv_offset[-1].weight)
    x = torch.randn(2, 128, 4, 4)
    points, reference = attn.sampling_points(attn.proj_q(x))
    assert points.shape == reference.shape == (2 * attn.n_groups, 4, 4, 2)
    torch.testing.assert_close(points, reference, atol=0, rtol=0)
    centres = (torch.arange(4) + 0.5) / 4 * 2 - 1  # pixel centres in [-1, 1], (y, x)
    torch.testing.assert_close(reference[0, :, 0, 0], centres)
    torch.testing.assert_close(reference[0, 0, :, 1], centres)

    # a map whose every channel holds its row index: the keys read it at row (i + 0.5) * (H - 1) / H, grid_sample
    # with align_corners=True as in the official code
    rows = torch.arange(4.0)[:, None].expand(4, 4).expand(2, 128, 4, 4)
    sampled = attn.sample(rows, points).reshape(2, 128, 4, 4)
    torch.testing.assert_close(sampled[0, 0], ((torch.arange(4.0) + 0.5) * 3 / 4)[:, None].expand(4, 4))

    # zero offsets = no offsets: the whole attention equals the no_off one
    attn.eval()
    with torch.no_grad():
        moved = attn(x)
        attn.no_off = True
        torch.testing.assert_close(attn(x), moved)


def test_offsets_stay_within_the_range_factor():
    torch.manual_seed(0)
    attn = deformable(cpu_model())
    with torch.no_grad():
        attn.conv_offset[-1].weight.normal_(0, 1000.0)  # saturate the tanh
    points, reference = attn.sampling_points(attn.proj_q(torch.randn(2, 128, 4, 4)))
    bound = attn.offset_range_factor / 4  # offset_range_factor / (Hk, Wk) in grid_sample's [-1, 1]
    moved = (points - reference).abs()
    assert moved.max() <= bound + 1e-6
    assert moved.max() > 0.99 * bound  # and they do move that far

    attn.offset_range_factor = -1  # unbounded offsets, the moved points squashed into the map by tanh
    points, _ = attn.sampling_points(attn.proj_q(torch.randn(2, 128, 4, 4)))
    assert points.abs().max() <= 1.0


def test_offsets_follow_the_queries_and_get_gradients():
    torch.manual_seed(0)
    attn = deformable(cpu_model())
    x = torch.randn(2, 128, 4, 4, requires_grad=True)
    points, reference = attn.sampling_points(attn.proj_q(x))
    assert not torch.allclose(points[0], points[2])  # two images, two sets of points
    F.mse_loss(attn(x), torch.zeros(2, 128, 4, 4)).backward()
    assert attn.conv_offset[0].weight.grad.abs().sum() > 0 and attn.conv_offset[-1].weight.grad.abs().sum() > 0
    assert attn.rpe_table.grad.abs().sum() > 0
