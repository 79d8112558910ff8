"""Tests of LabelAttentionHead / ProjectionHead (spec mulcon.md §3, §5, §17.2–§17.4)."""

from __future__ import annotations

import math

import pytest
import torch

from mlcl.models.heads import HEADS, LabelAttentionHead, ProjectionHead
from mlcl.models.heads.label_attention import convert_reference_projector, convert_reference_state_dict


def small(**kw):
    torch.manual_seed(0)
    args = dict(
        in_channels=12, num_classes=5, embed_dim=8, num_heads=4, num_pixel_blocks=2, num_label_blocks=1
    )
    args.update(kw)
    return LabelAttentionHead(**args)


# -------------------------------------------------------------------------------------------- reference maths
def block_reference(params, prefix, x_q, x_kv, heads, layer_norm=True):
    """§3.1 for one image with an explicit loop over heads (unbatched, float64)."""
    W = lambda n: params[f"{prefix}.{n}.weight"]  # noqa: E731
    b = lambda n: params[f"{prefix}.{n}.bias"]  # noqa: E731
    q = x_q @ W("fc_q").T + b("fc_q")
    k = x_kv @ W("fc_k").T + b("fc_k")
    v = x_kv @ W("fc_v").T + b("fc_v")
    m = q.shape[1]
    w = m // heads
    outs, attns = [], []
    for j in range(heads):
        cols = slice(j * w, (j + 1) * w)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(m)  # full width m, not the head width
        a = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        a = a / a.sum(dim=1, keepdim=True)
        outs.append(q[:, cols] + a @ v[:, cols])
        attns.append(a)
    o = torch.cat(outs, dim=1)

    def ln(t, name):
        if not layer_norm:
            return t
        mu = t.mean(dim=1, keepdim=True)
        var = ((t - mu) ** 2).mean(dim=1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * params[f"{prefix}.{name}.weight"] + params[
            f"{prefix}.{name}.bias"
        ]

    o = ln(o, "ln0")
    o = ln(o + torch.clamp(o @ W("fc_o").T + b("fc_o"), min=0), "ln1")
    return o, torch.stack(attns)


def head_reference(head, tokens, layer_norm=True):
    p = {k: v.detach() for k, v in head.state_dict().items()}
    h_ = head.num_heads
    embs, logits, attns = [], [], []
    for t in tokens:
        for i in range(len(head.pixel_blocks)):
            t, _ = block_reference(p, f"pixel_blocks.{i}", t, t, h_, layer_norm)
        e, a = block_reference(p, "cross_block", p["label_queries"], t, h_, layer_norm)
        for i in range(len(head.label_blocks)):
            e, _ = block_reference(p, f"label_blocks.{i}", e, e, h_, layer_norm)
        embs.append(e)
        logits.append(
            torch.stack([e[c] @ p["classifier.weight"][c] + p["classifier.bias"][c] for c in range(len(e))])
        )
        attns.append(a)
    return torch.stack(embs), torch.stack(logits), torch.stack(attns)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_matches_loop_reference_float64(layer_norm):
    head = small(layer_norm=layer_norm).double()
    tokens = torch.randn(3, 7, 12, dtype=torch.float64)
    out = head(tokens)
    emb, logits, attn = head_reference(head, tokens, layer_norm)
    torch.testing.assert_close(out["embeddings"], emb, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["attention"], attn, rtol=1e-10, atol=1e-12)


def test_gradcheck_small():
    torch.set_num_threads(1)  # tiny ops: thread hand-offs dominate (conftest restores the count per test)
    head = small(in_channels=4, embed_dim=4, num_heads=2, num_classes=3, num_pixel_blocks=1).double()
    tokens = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tuple(head(t).values()), (tokens,), fast_mode=True)


# --------------------------------------------------------------------------------------------- shapes, forms
def test_shapes_tokens_and_map_identical():
    head = small()
    fmap = torch.randn(2, 12, 3, 4)
    tokens = torch.stack([fmap[:, :, r, c] for r in range(3) for c in range(4)], dim=1)  # row-major by hand
    out_map, out_tok = head(fmap), head(tokens)
    assert set(out_map) == {"embeddings", "logits", "attention"}
    assert out_map["embeddings"].shape == (2, 5, 8)
    assert out_map["logits"].shape == (2, 5)
    assert out_map["attention"].shape == (2, 4, 5, 12)
    for key in out_map:
        torch.testing.assert_close(out_map[key], out_tok[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 50])
def test_any_number_of_tokens(n):
    out = small()(torch.randn(2, n, 12))
    assert out["attention"].shape == (2, 4, 5, n)
    assert torch.isfinite(out["logits"]).all()


def test_attention_rows_sum_to_one():
    attn = small()(torch.randn(3, 9, 12))["attention"]
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 5))


def test_token_permutation_invariance():
    head = small().double()
    tokens = torch.randn(2, 10, 12, dtype=torch.float64)
    perm = torch.randperm(10)
    a, b = head(tokens), head(tokens[:, perm])
    torch.testing.assert_close(b["embeddings"], a["embeddings"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b["attention"], a["attention"][..., perm], rtol=1e-12, atol=1e-12)


def test_embeddings_depend_on_other_labels_only_through_label_block():
    # Each logit reads only its own label's embedding (§4): perturbing classifier row c moves logit c only.
    head = small()
    tokens = torch.randn(2, 6, 12)
    before = head(tokens)["logits"]
    with torch.no_grad():
        head.classifier.weight[2] += 1.0
    after = head(tokens)["logits"]
    changed = (after - before).abs() > 1e-7
    assert changed[:, 2].all() and not changed[:, [0, 1, 3, 4]].any()


@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("efficientnet_b0", 320)])
def test_timm_cnn_feature_maps(name, channels):
    timm = pytest.importorskip("timm")
    torch.set_num_threads(1)  # depthwise convs at 64x64 are 50x slower with 2 threads on a busy 2-core box
    backbone = timm.create_model(name, pretrained=False, features_only=True)
    with torch.no_grad():
        fmap = backbone(torch.randn(2, 3, 64, 64))[-1]
    assert fmap.shape[1] == channels
    head = LabelAttentionHead(channels, 7, embed_dim=32, num_heads=4, num_pixel_blocks=1)
    out = head(fmap)
    n = fmap.shape[2] * fmap.shape[3]
    assert out["embeddings"].shape == (2, 7, 32)
    assert out["logits"].shape == (2, 7)
    assert out["attention"].shape == (2, 4, 7, n)
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_timm_vit_tokens_with_class_token():
    timm = pytest.importorskip("timm")
    torch.set_num_threads(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    with torch.no_grad():
        tokens = vit.forward_features(torch.randn(2, 3, 32, 32))  # [B, 1 + 4, 192]
    out = LabelAttentionHead(tokens.shape[-1], 6, embed_dim=16, num_heads=4)(tokens)
    assert out["attention"].shape == (2, 4, 6, tokens.shape[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="in_channels"):
        LabelAttentionHead(10, 3, embed_dim=8, num_heads=4)
    with pytest.raises(ValueError, match="embed_dim"):
        LabelAttentionHead(12, 3, embed_dim=10, num_heads=4)
    head = small()
    with pytest.raises(ValueError):
        head(torch.randn(2, 7, 11))
    with pytest.raises(ValueError):
        head(torch.randn(2, 11, 3, 3))
    with pytest.raises(ValueError):
        head(torch.randn(2, 12))


# --------------------------------------------------------------------------------------------- state dict
def expected_shapes(D, E, C, pixel=2, label=1, ln=True):
    shapes = {"label_queries": (C, E), "classifier.weight": (C, E), "classifier.bias": (C,)}

    def block(prefix, dq, dkv, m):
        shapes.update(
            {
                f"{prefix}.fc_q.weight": (m, dq),
                f"{prefix}.fc_k.weight": (m, dkv),
                f"{prefix}.fc_v.weight": (m, dkv),
                f"{prefix}.fc_o.weight": (m, m),
            }
        )
        for n in ("fc_q", "fc_k", "fc_v", "fc_o"):
            shapes[f"{prefix}.{n}.bias"] = (m,)
        if ln:
            for n in ("ln0", "ln1"):
                shapes[f"{prefix}.{n}.weight"] = (m,)
                shapes[f"{prefix}.{n}.bias"] = (m,)

    for i in range(pixel):
        block(f"pixel_blocks.{i}", D, D, D)
    block("cross_block", E, D, E)
    for i in range(label):
        block(f"label_blocks.{i}", E, E, E)
    return shapes


def test_default_state_dict_51_keys_no_buffers():
    with torch.device("meta"):  # reference dims (44 M parameters) without allocating them
        head = LabelAttentionHead(2048, 80)
    sd = head.state_dict()
    assert len(sd) == 51
    assert list(head.buffers()) == []
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(2048, 1024, 80)
    assert head.out_features == 1024
    assert sum(p.numel() for p in head.parameters()) == pytest.approx(44.17e6 + 0.08e6, rel=2e-3)


def test_layer_norm_false_drops_ln_keys():
    head = small(layer_norm=False)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected_shapes(12, 8, 5, ln=False)
    assert not any(".ln" in k for k in head.state_dict())


def test_strict_round_trip():
    a, b = small(), small()
    torch.nn.init.normal_(b.label_queries)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(a(x)["logits"], b(x)["logits"])


def test_default_init():
    torch.manual_seed(0)
    head = LabelAttentionHead(64, 80, embed_dim=256, num_heads=4)
    bound = math.sqrt(6 / (81 * 256))
    q = head.label_queries
    assert q.abs().max() <= bound and q.abs().max() > 0.95 * bound
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, torch.nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(weights.mean().item()) < 1e-3
    for m in head.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0)
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-5


def test_registered():
    assert HEADS["label_attention"] is LabelAttentionHead


# --------------------------------------------------------------------------------------------- projector
def test_projection_head():
    proj = ProjectionHead(6, 5, 3)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {
        "fc1.weight": (5, 6),
        "fc1.bias": (5,),
        "fc2.weight": (3, 5),
        "fc2.bias": (3,),
    }
    x = torch.randn(2, 4, 6)
    sd = proj.state_dict()
    expected = (
        torch.clamp(x @ sd["fc1.weight"].T + sd["fc1.bias"], min=0) @ sd["fc2.weight"].T + sd["fc2.bias"]
    )
    torch.testing.assert_close(proj(x), expected)
    assert proj(torch.randn(7, 6)).shape == (7, 3)
    default = ProjectionHead()
    assert (default.fc1.in_features, default.fc1.out_features, default.fc2.out_features) == (1024, 1024, 128)


# --------------------------------------------------------------------------------------------- reference ckpt
def test_reference_checkpoint_mapping():
    ours = small(num_pixel_blocks=2, num_label_blocks=1)
    sd = ours.state_dict()
    back = {
        "pixel_blocks.0.": "sab1.mab.",
        "pixel_blocks.1.": "sab2.mab.",
        "label_blocks.0.": "sab3.mab.",
        "cross_block.": "mab.",
    }
    net_a = {"module.I": sd["label_queries"].unsqueeze(0)}
    for k, v in sd.items():
        for mine, ref in back.items():
            if k.startswith(mine):
                net_a["module." + ref + k[len(mine) :]] = v
    net_c = [
        {"weight": sd["classifier.weight"][i : i + 1], "bias": sd["classifier.bias"][i : i + 1]}
        for i in range(5)
    ]
    converted = convert_reference_state_dict(net_a, net_c, prefix="head.")
    assert set(converted) == {"head." + k for k in sd}
    fresh = small()
    torch.nn.init.normal_(fresh.label_queries)
    fresh.load_state_dict({k[len("head.") :]: v for k, v in converted.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(ValueError, match="unexpected"):
        convert_reference_state_dict({"foo.weight": torch.zeros(1)}, [])

    proj = ProjectionHead(8, 8, 4)
    net_p = {
        "0.weight": proj.fc1.weight,
        "0.bias": proj.fc1.bias,
        "2.weight": proj.fc2.weight,
        "2.bias": proj.fc2.bias,
    }
    ProjectionHead(8, 8, 4).load_state_dict(convert_reference_projector(net_p), strict=True)
