"""Tests for models/ (MaskedAutoencoderViT), checked against the official facebookresearch/mae
architecture, hand computations, and an independent implementation (transformers' ViTMAE).

Everything runs on CPU in a few seconds; the large/huge layouts are built on the meta device.
"""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn

from models import MaskedAutoencoderViT, create_model, list_models
from models.mae import to_hf_state_dict

OFFICIAL_NAMES = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]

# name -> (D, depth, heads, p); every official decoder is 512-d, 8 blocks, 16 heads.
OFFICIAL_ARCH = {
    "mae_vit_base_patch16": (768, 12, 12, 16),
    "mae_vit_large_patch16": (1024, 24, 16, 16),
    "mae_vit_huge_patch14": (1280, 32, 16, 14),
}
DEC_D, DEC_DEPTH, DEC_HEADS = 512, 8, 16


# ----------------------------------------------------------------------------- helpers
def official_layout(D, depth, p, Dd=DEC_D, ddepth=DEC_DEPTH, img=224, in_chans=3):
    """State-dict layout of the official models_mae.MaskedAutoencoderViT, written out by hand."""
    L = (img // p) ** 2
    out = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, L + 1, D),
        "patch_embed.proj.weight": (D, in_chans, p, p),
        "patch_embed.proj.bias": (D,),
    }

    def block(prefix, d):
        return {
            f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,),
        }

    for i in range(depth):
        out.update(block(f"blocks.{i}", D))
    out.update({"norm.weight": (D,), "norm.bias": (D,),
                "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
                "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, L + 1, Dd)})
    for i in range(ddepth):
        out.update(block(f"decoder_blocks.{i}", Dd))
    out.update({"decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
                "decoder_pred.weight": (p * p * in_chans, Dd), "decoder_pred.bias": (p * p * in_chans,)})
    return out


def official_param_count(D, depth, p, Dd=DEC_D, ddepth=DEC_DEPTH, img=224, in_chans=3):
    """Closed-form parameter count (fixed pos embeds included)."""
    L = (img // p) ** 2
    blk = lambda d: 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)  # noqa: E731
    enc = D + (L + 1) * D + (D * in_chans * p * p + D) + depth * blk(D) + 2 * D
    dec = (D * Dd + Dd) + Dd + (L + 1) * Dd + ddepth * blk(Dd) + 2 * Dd + (Dd * p * p * in_chans + p * p * in_chans)
    return enc + dec


def ref_sincos_table(dim, gh, gw=None):
    """Independent 2-D sin-cos table in float64: zero cls row, then for patch k at
    (row r, col c) = divmod(k, gw): [sin(c w), cos(c w), sin(r w), cos(r w)], w_j = 1/10000^(j/(dim/4))."""
    gw = gh if gw is None else gw
    d = dim // 4
    omega = torch.tensor([1.0 / 10000 ** (j / d) for j in range(d)], dtype=torch.float64)
    rows = [torch.zeros(dim, dtype=torch.float64)]
    for k in range(gh * gw):
        r, c = k // gw, k % gw
        rows.append(torch.cat([torch.sin(c * omega), torch.cos(c * omega),
                               torch.sin(r * omega), torch.cos(r * omega)]))
    return torch.stack(rows).unsqueeze(0)


def ref_patchify(imgs, p):
    """Loop-based patchify: patch (r, c) in row-major order, elements ordered (p, q, c)."""
    n, ch, H, W = imgs.shape
    patches = []
    for r in range(H // p):
        for c in range(W // p):
            patches.append(imgs[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(0, 2, 3, 1).reshape(n, -1))
    return torch.stack(patches, dim=1)


def ref_loss(imgs, pred, mask, p, norm_pix, unbiased=True, eps=1e-6):
    target = ref_patchify(imgs.double(), p)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        n = target.shape[-1]
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (n - 1 if unbiased else n)
        target = (target - mean) / torch.sqrt(var + eps)
    per_patch = ((pred.double() - target) ** 2).mean(-1)
    return (per_patch * mask.double()).sum() / mask.double().sum()


def tiny_model(**kw):
    args = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=1, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    args.update(kw)
    return MaskedAutoencoderViT(**args)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return create_model("mae_vit_base_patch16").eval()


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return create_model("mae_vit_mini_patch16", img_size=64).eval()


# ----------------------------------------------------------------------------- 1. layout
def test_param_count_formula_base():
    # 12 blocks of 12D^2+13D, patch embed, cls, pos table, norm; 8 decoder blocks of 512-d, etc.
    assert official_param_count(768, 12, 16) == 111_907_840


def test_layout_base_real(base):
    D, depth, _, p = OFFICIAL_ARCH["mae_vit_base_patch16"]
    expected = official_layout(D, depth, p)
    assert shapes(base) == expected
    n_params = sum(t.numel() for t in base.parameters())
    assert n_params == official_param_count(D, depth, p) == 111_907_840
    # Nothing outside the parameters (no buffers) in the state dict.
    assert sum(t.numel() for t in base.state_dict().values()) == n_params


def test_meta_device_build_matches_real(base):
    with torch.device("meta"):
        m = create_model("mae_vit_base_patch16")
    assert all(t.device.type == "meta" for t in m.parameters())
    assert shapes(m) == shapes(base)


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_official_layout_and_count(name):
    D, depth, _, p = OFFICIAL_ARCH[name]
    expected = official_layout(D, depth, p)
    with torch.device("meta"):
        m = create_model(name)
        m_dec = create_model(name + "_dec512d8b")
    assert shapes(m) == expected
    assert shapes(m_dec) == expected
    assert sum(t.numel() for t in m.parameters()) == official_param_count(D, depth, p)
    # Head counts as in the official factories.
    assert m.blocks[0].attn.num_heads == OFFICIAL_ARCH[name][2]
    assert m.decoder_blocks[0].attn.num_heads == DEC_HEADS
    assert len(m.blocks) == depth and len(m.decoder_blocks) == DEC_DEPTH


def test_official_counts_distinct():
    counts = []
    for n in OFFICIAL_NAMES:
        D, depth, _, p = OFFICIAL_ARCH[n]
        counts.append(official_param_count(D, depth, p))
    assert counts[0] < counts[1] < counts[2]
    # The large model is the ~330M-parameter ViT-L/16 MAE, huge the ~660M ViT-H/14 one.
    assert 320e6 < counts[1] < 340e6 and 640e6 < counts[2] < 670e6


# ----------------------------------------------------------------------------- 2. sin-cos tables
@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (10, 10), (4, 6), (3, 5)])
@pytest.mark.parametrize("dims", [(128, 64), (768, 512)])
def test_pos_embed_values(grid, dims):
    gh, gw = grid
    D, Dd = dims
    p = 16
    m = MaskedAutoencoderViT(img_size=(gh * p, gw * p), patch_size=p, embed_dim=D, depth=1, num_heads=4,
                             decoder_embed_dim=Dd, decoder_depth=1, decoder_num_heads=4)
    for table, dim in ((m.pos_embed, D), (m.decoder_pos_embed, Dd)):
        assert table.dtype == torch.float32
        assert tuple(table.shape) == (1, gh * gw + 1, dim)
        assert not table.requires_grad
        ref = ref_sincos_table(dim, gh, gw)
        torch.testing.assert_close(table.double(), ref, atol=1e-6, rtol=0)
        assert torch.all(table[0, 0] == 0)


def test_pos_embed_column_first(mini):
    # Patch 1 is (row 0, col 1): the first half of the table must vary, the second half must not.
    t = mini.pos_embed[0]
    D = t.shape[-1]
    assert not torch.allclose(t[2, : D // 2], t[1, : D // 2])
    assert torch.equal(t[2, D // 2:], t[1, D // 2:])
    # Patch g is (row 1, col 0): now only the second half changes.
    g = 4
    assert torch.equal(t[1 + g, : D // 2], t[1, : D // 2])
    assert not torch.allclose(t[1 + g, D // 2:], t[1, D // 2:])


def test_pos_embed_not_trainable(base):
    assert not base.pos_embed.requires_grad
    assert not base.decoder_pos_embed.requires_grad
    trainable = {n for n, prm in base.named_parameters() if prm.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable
    assert "cls_token" in trainable and "mask_token" in trainable
    torch.testing.assert_close(base.pos_embed.double(), ref_sincos_table(768, 14), atol=1e-6, rtol=0)
    torch.testing.assert_close(base.decoder_pos_embed.double(), ref_sincos_table(512, 14), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 3. patchify
def test_patchify_roundtrip_square(mini):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    x = mini.patchify(imgs)
    assert x.shape == (2, 16, 768)
    assert torch.equal(x, ref_patchify(imgs, 16))
    assert torch.equal(mini.unpatchify(x), imgs)


def test_patchify_roundtrip_nonsquare(mini):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 96)
    x = mini.patchify(imgs)
    assert x.shape == (2, 24, 16 * 16 * 3)
    assert torch.equal(mini.unpatchify(x, grid=(4, 6)), imgs)
    assert torch.equal(x, ref_patchify(imgs, 16))
    # One patch by hand: sample 1, patch (row 2, col 5) = index 2*6+5, element order (p, q, c).
    p, r, c = 16, 2, 5
    patch = x[1, r * 6 + c]
    assert torch.equal(patch.reshape(p, p, 3), imgs[1, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0))
    for i, j, ch in [(0, 0, 0), (0, 0, 2), (0, 1, 0), (3, 7, 1), (15, 15, 2)]:
        assert patch[(i * p + j) * 3 + ch] == imgs[1, ch, r * p + i, c * p + j]
    # A 24-patch sequence is no square grid.
    with pytest.raises(ValueError):
        mini.unpatchify(x)
    with pytest.raises(ValueError):
        mini.patchify(torch.randn(1, 3, 64, 70))


# ----------------------------------------------------------------------------- 4. masking
@pytest.mark.parametrize("L,ratio,keep", [(16, 0.75, 4), (49, 0.75, 12), (196, 0.75, 49), (24, 0.5, 12),
                                          (196, 0.9, 19), (256, 0.4, 153), (50, 0.0, 50), (10, 0.25, 7)])
def test_random_masking(mini, L, ratio, keep):
    assert keep == int(L * (1 - ratio))
    torch.manual_seed(1)
    N, D = 4, 8
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    x_masked, mask, ids_restore = mini.random_masking(x, ratio, noise=noise)
    assert x_masked.shape == (N, keep, D)
    assert mask.shape == (N, L) and ids_restore.shape == (N, L)
    assert torch.all((mask == 0) | (mask == 1))
    assert torch.equal(mask.sum(1), torch.full((N,), float(L - keep)))
    assert torch.equal(mask, (ids_restore >= keep).to(mask.dtype))
    for n in range(N):
        assert sorted(ids_restore[n].tolist()) == list(range(L))
        # The kept tokens are those with the smallest noise, in increasing noise order.
        order = sorted(range(L), key=lambda k: noise[n, k].item())[:keep]
        assert torch.equal(x_masked[n], x[n, order])
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == set(order)


def test_masking_rows_differ_and_seeded(mini):
    x = torch.randn(8, 196, 4)
    torch.manual_seed(3)
    _, mask_a, _ = mini.random_masking(x, 0.75)
    torch.manual_seed(3)
    _, mask_b, _ = mini.random_masking(x, 0.75)
    assert torch.equal(mask_a, mask_b)
    assert torch.equal(mask_a.sum(1), torch.full((8,), 147.0))
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(mask_a[i], mask_a[j])


def test_masking_rejects_bad_noise(mini):
    with pytest.raises(ValueError):
        mini.random_masking(torch.randn(2, 16, 4), 0.75, noise=torch.rand(2, 15))


# ----------------------------------------------------------------------------- 5. loss
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_visible_patches(norm_pix):
    torch.manual_seed(0)
    m = create_model("mae_vit_mini_patch16", img_size=64, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 64, 64)
    pred = torch.randn(2, 16, 768)
    _, mask, _ = m.random_masking(torch.zeros(2, 16, 1), 0.75, noise=torch.rand(2, 16))
    loss = m.forward_loss(imgs, pred, mask)
    torch.testing.assert_close(loss.double(), ref_loss(imgs, pred, mask, 16, norm_pix), rtol=1e-6, atol=0)

    visible = mask == 0
    pred_vis = pred.clone()
    pred_vis[visible] += 100.0
    assert torch.equal(m.forward_loss(imgs, pred_vis, mask), loss)

    # Pixels of visible patches only change the target at visible patches.
    keep_img = m.unpatchify(visible.unsqueeze(-1).expand(-1, -1, 768).float())
    imgs_vis = imgs + 50.0 * keep_img * torch.randn_like(imgs)
    assert not torch.equal(imgs_vis, imgs)
    assert torch.equal(m.forward_loss(imgs_vis, pred, mask), loss)

    # A masked patch does count.
    n, k = torch.nonzero(mask == 1)[0].tolist()
    pred_msk = pred.clone()
    pred_msk[n, k] += 1.0
    loss_msk = m.forward_loss(imgs, pred_msk, mask)
    assert abs(loss_msk.item() - loss.item()) > 1e-2
    torch.testing.assert_close(loss_msk.double(), ref_loss(imgs, pred_msk, mask, 16, norm_pix), rtol=1e-6, atol=0)


def test_forward_loss_matches_outputs(mini):
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        loss, pred, mask = mini(imgs, mask_ratio=0.75, noise=torch.rand(3, 16))
    assert pred.shape == (3, 16, 768) and mask.shape == (3, 16)
    assert loss.ndim == 0
    torch.testing.assert_close(loss.double(), ref_loss(imgs, pred, mask, 16, False), rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_keeps_the_official_type_promotion(norm_pix):
    """No cast of pred: float64 stays float64 (the official loss), bf16 pred with fp32 pixels is fp32."""
    torch.manual_seed(0)
    m = create_model("mae_vit_mini_patch16", img_size=64, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    pred = torch.randn(2, 16, 768, dtype=torch.float64)
    _, mask, _ = m.random_masking(torch.zeros(2, 16, 1), 0.75, noise=torch.rand(2, 16))
    loss = m.forward_loss(imgs, pred, mask.double())
    assert loss.dtype == torch.float64
    # A float32 round trip anywhere would leave ~1e-8 relative error.
    torch.testing.assert_close(loss, ref_loss(imgs, pred, mask, 16, norm_pix), rtol=1e-13, atol=0)
    low = m.forward_loss(imgs.float(), pred.bfloat16(), mask)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), ref_loss(imgs.float(), pred.bfloat16(), mask, 16, norm_pix),
                               rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- 6. determinism
def test_noise_makes_forward_deterministic(mini):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        torch.manual_seed(10)
        out1 = mini(imgs, 0.75, noise=noise)
        torch.manual_seed(11)
        out2 = mini(imgs, 0.75, noise=noise.clone())
        out3 = mini(imgs, 0.75, noise=torch.rand(2, 16))
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    assert not torch.equal(out1[2], out3[2])
    assert not torch.equal(out1[1], out3[1])
    # The mask is the one implied by the noise: the 4 smallest noise values are kept.
    kept = torch.topk(noise, 4, dim=1, largest=False).indices
    expected = torch.ones(2, 16)
    expected.scatter_(1, kept, 0.0)
    assert torch.equal(out1[2], expected)


# ----------------------------------------------------------------------------- 7. norm_pix_loss
def test_norm_pix_loss_unbiased_var_eps():
    torch.manual_seed(0)
    m = tiny_model(norm_pix_loss=True)  # patches of 2*2*3 = 12 values: n-1 vs n matters
    # Small-variance images (var ~ 1e-6) so that eps matters as well.
    imgs = 1e-3 * torch.randn(2, 3, 8, 8) + 0.5
    pred = torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    loss = m.forward_loss(imgs, pred, mask).double()
    torch.testing.assert_close(loss, ref_loss(imgs, pred, mask, 2, True), rtol=2e-5, atol=0)
    # The reference is discriminating: biased variance or another eps give clearly other values.
    assert abs(loss - ref_loss(imgs, pred, mask, 2, True, unbiased=False)) > 1e-3 * loss
    assert abs(loss - ref_loss(imgs, pred, mask, 2, True, eps=1e-5)) > 1e-3 * loss
    assert abs(loss - ref_loss(imgs, pred, mask, 2, False)) > 1e-3 * loss
    # Without norm_pix_loss the raw pixels are the target.
    m.norm_pix_loss = False
    torch.testing.assert_close(m.forward_loss(imgs, pred, mask).double(), ref_loss(imgs, pred, mask, 2, False),
                               rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- 8. transformers
MINI_HF = dict(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=512, decoder_hidden_size=64, decoder_num_hidden_layers=2,
               decoder_num_attention_heads=4, decoder_intermediate_size=256)
BASE_HF = dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, decoder_hidden_size=512, decoder_num_hidden_layers=8,
               decoder_num_attention_heads=16, decoder_intermediate_size=2048)


def _build_hf(sizes, norm_pix):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(**sizes, num_channels=3, layer_norm_eps=1e-6, qkv_bias=True, mask_ratio=0.75,
                                    norm_pix_loss=norm_pix, hidden_act="gelu", hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, attn_implementation="eager")
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    emb, dec = hf.vit.embeddings, hf.decoder
    # Some transformers versions leave the fixed tables at zero after plain construction (they are
    # meant to come from a checkpoint); let the library build its own sin-cos tables.
    if emb.position_embeddings.detach().abs().sum() == 0:
        proj = emb.patch_embeddings.projection
        if getattr(proj, "_is_hf_initialized", False):
            proj._is_hf_initialized = False
        with torch.no_grad():
            emb.initialize_weights()
    if dec.decoder_pos_embed.detach().abs().sum() == 0:
        with torch.no_grad():
            dec.initialize_weights(emb.patch_embeddings.num_patches)
    assert emb.position_embeddings.detach().abs().sum() > 0
    assert dec.decoder_pos_embed.detach().abs().sum() > 0
    return hf


def _to_hf_state_dict(sd, hf_keys):
    """Our (official) keys as transformers' ViTMAE keys (the map of models/mae.py, the one the export
    and the import use), leaving out the fixed pos tables, for the version of transformers installed."""
    new_style = any(".attention.q_proj." in k for k in hf_keys)
    sd = {k: v for k, v in sd.items() if k not in ("pos_embed", "decoder_pos_embed")}
    return to_hf_state_dict(sd, module_names=new_style)


def _compare_with_hf(ours, hf_sizes, D, Dd, grid, norm_pix, img, n=2, atol=1e-5, seed=0):
    hf = _build_hf(hf_sizes, norm_pix)
    # The two sin-cos tables, built independently, agree.
    torch.testing.assert_close(hf.vit.embeddings.position_embeddings.detach(), ours.pos_embed.detach(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(hf.decoder.decoder_pos_embed.detach(), ours.decoder_pos_embed.detach(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(hf.vit.embeddings.position_embeddings.detach().double(), ref_sincos_table(D, grid),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(hf.decoder.decoder_pos_embed.detach().double(), ref_sincos_table(Dd, grid),
                               atol=1e-6, rtol=0)

    hf_sd = _to_hf_state_dict(ours.state_dict(), hf.state_dict().keys())
    res = hf.load_state_dict(hf_sd, strict=False)
    assert sorted(res.missing_keys) == ["decoder.decoder_pos_embed", "vit.embeddings.position_embeddings"]
    assert res.unexpected_keys == []

    torch.manual_seed(seed)
    imgs = torch.randn(n, 3, img, img)
    noise = torch.rand(n, grid * grid)
    old = ours.norm_pix_loss
    ours.norm_pix_loss = norm_pix
    try:
        with torch.no_grad():
            loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
            out = hf(pixel_values=imgs, noise=noise)
    finally:
        ours.norm_pix_loss = old
    assert torch.equal(out.mask, mask)
    assert mask.sum().item() == n * (grid * grid - int(grid * grid * 0.25))
    scale = pred.abs().max().item()
    assert scale > 0.1  # a real, non-degenerate output
    torch.testing.assert_close(out.logits, pred, atol=atol * max(1.0, scale), rtol=1e-5)
    torch.testing.assert_close(out.loss, loss, atol=atol * max(1.0, loss.item()), rtol=1e-5)
    return loss, out.loss


@pytest.mark.parametrize("norm_pix", [False, True])
def test_matches_transformers_mini(mini, norm_pix):
    pytest.importorskip("transformers")
    loss, _ = _compare_with_hf(mini, MINI_HF, 128, 64, 4, norm_pix, 64, n=3)
    assert loss.item() > 0


@pytest.mark.parametrize("norm_pix", [False, True])
def test_matches_transformers_base(base, norm_pix):
    pytest.importorskip("transformers")
    _compare_with_hf(base, BASE_HF, 768, 512, 14, norm_pix, 224, n=2)


# ----------------------------------------------------------------------------- 9. init
def test_initialisation_like_official(base):
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 12 + 4 * 8 + 2  # qkv, proj, fc1, fc2 per block; decoder_embed; decoder_pred
    for lin in linears:
        fan_out, fan_in = lin.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = lin.weight.detach()
        assert torch.all(lin.bias == 0)
        assert w.abs().max().item() <= bound * (1 + 1e-6)
        assert w.abs().max().item() > 0.95 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)
        assert abs(w.mean().item()) < 0.01 * bound

    norms = [m for m in base.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 + 2 * 8 + 1
    for ln in norms:
        assert ln.eps == 1e-6
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)

    for tok in (base.cls_token, base.mask_token):
        assert abs(tok.std().item() - 0.02) < 0.003
        assert abs(tok.mean().item()) < 0.003
        assert tok.abs().max().item() < 0.2

    w = base.patch_embed.proj.weight.detach()
    D, fan_in = w.shape[0], w[0].numel()
    assert fan_in == 3 * 16 * 16
    bound = math.sqrt(6.0 / (D + fan_in))
    assert w.abs().max().item() <= bound * (1 + 1e-6)
    # Xavier on the flattened matrix, not PyTorch's default conv init (std 1/sqrt(3*fan_in)).
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)
    b = base.patch_embed.proj.bias.detach()
    assert b.abs().max().item() <= 1 / math.sqrt(fan_in)  # left at the conv default, as officially


def test_initialisation_seeded():
    torch.manual_seed(5)
    a = create_model("mae_vit_mini_patch16", img_size=64)
    torch.manual_seed(5)
    b = create_model("mae_vit_mini_patch16", img_size=64)
    torch.manual_seed(6)
    c = create_model("mae_vit_mini_patch16", img_size=64)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------- 10. registry / ctor
def test_unknown_model_raises():
    with pytest.raises(ValueError) as e:
        create_model("nope")
    assert "mae_vit_base_patch16" in str(e.value)
    with pytest.raises(ValueError) as e:
        create_model("mae_vit_nope")
    for name in OFFICIAL_NAMES:
        assert name in str(e.value)


def test_registry_names():
    names = list_models()
    for name in OFFICIAL_NAMES + [n + "_dec512d8b" for n in OFFICIAL_NAMES] + ["mae_vit_mini_patch16"]:
        assert name in names
    assert list_models("mae_vit_huge") == ["mae_vit_huge_patch14", "mae_vit_huge_patch14_dec512d8b"]


def test_official_constructor_keywords():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=32, patch_size=8, in_chans=1, embed_dim=48, depth=2, num_heads=3,
                             decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.,
                             norm_layer=partial(nn.LayerNorm, eps=1e-5), norm_pix_loss=True)
    s = shapes(m)
    assert s["patch_embed.proj.weight"] == (48, 1, 8, 8)
    assert s["pos_embed"] == (1, 17, 48) and s["decoder_pos_embed"] == (1, 17, 24)
    assert s["blocks.1.mlp.fc1.weight"] == (96, 48) and "blocks.2.norm1.weight" not in s
    assert s["decoder_blocks.0.mlp.fc1.weight"] == (48, 24) and "decoder_blocks.1.norm1.weight" not in s
    assert s["decoder_pred.weight"] == (8 * 8 * 1, 24)
    assert m.blocks[0].attn.num_heads == 3 and m.decoder_blocks[0].attn.num_heads == 2
    assert m.norm.eps == 1e-5 and m.norm_pix_loss is True
    with torch.no_grad():
        loss, pred, mask = m(torch.randn(2, 1, 32, 32), mask_ratio=0.5)
    assert pred.shape == (2, 16, 64) and mask.sum().item() == 16 and torch.isfinite(loss)

    # Factories forward keyword arguments.
    with torch.device("meta"):
        b = create_model("mae_vit_base_patch16", norm_pix_loss=True, img_size=160)
    assert b.norm_pix_loss is True and tuple(b.pos_embed.shape) == (1, 101, 768)
    assert b.norm.eps == 1e-6


# ----------------------------------------------------------------------------- 11. other sizes
def _same_weights_other_size(src, img_size):
    torch.manual_seed(99)
    dst = create_model("mae_vit_mini_patch16", img_size=img_size).eval()
    sd = {k: v for k, v in src.state_dict().items() if k not in ("pos_embed", "decoder_pos_embed")}
    res = dst.load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["decoder_pos_embed", "pos_embed"] and not res.unexpected_keys
    return dst


@pytest.mark.parametrize("hw", [(160, 160), (64, 96)])
def test_other_input_size_uses_grid_table(hw):
    torch.manual_seed(0)
    m224 = create_model("mae_vit_mini_patch16", img_size=224).eval()
    other = _same_weights_other_size(m224, hw)
    gh, gw = hw[0] // 16, hw[1] // 16
    L = gh * gw
    torch.testing.assert_close(other.pos_embed.double(), ref_sincos_table(128, gh, gw), atol=1e-6, rtol=0)
    torch.testing.assert_close(other.decoder_pos_embed.double(), ref_sincos_table(64, gh, gw), atol=1e-6, rtol=0)
    # The 224 table cut to L+1 rows is not the right table, so equality below is meaningful.
    assert not torch.allclose(m224.pos_embed[:, : L + 1], other.pos_embed, atol=1e-3)

    imgs = torch.randn(2, 3, *hw)
    noise = torch.rand(2, L)
    with torch.no_grad():
        loss_a, pred_a, mask_a = m224(imgs, 0.75, noise=noise)
        loss_b, pred_b, mask_b = other(imgs, 0.75, noise=noise)
    assert pred_a.shape == (2, L, 768)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(pred_a, pred_b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    # The model's own 224 tables are untouched.
    assert tuple(m224.pos_embed.shape) == (1, 197, 128)
    torch.testing.assert_close(m224.pos_embed.double(), ref_sincos_table(128, 14), atol=1e-6, rtol=0)


def test_base_on_160_input(base):
    torch.manual_seed(0)
    imgs = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        loss, pred, mask = base(imgs, 0.75, noise=torch.rand(1, 100))
    assert pred.shape == (1, 100, 768)
    assert mask.shape == (1, 100) and mask.sum().item() == 75
    assert torch.isfinite(loss)


def test_other_input_size_in_bf16():
    """The position tables made for another grid follow the model's dtype."""
    torch.manual_seed(0)
    model = create_model("mae_vit_mini_patch16", img_size=64).to(torch.bfloat16)
    loss, pred, mask = model(torch.randn(2, 3, 96, 64, dtype=torch.bfloat16), noise=torch.rand(2, 24))
    assert pred.dtype == torch.bfloat16 and pred.shape == (2, 24, 768)
    assert torch.isfinite(loss)
