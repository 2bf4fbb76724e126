"""Tests for models/mixmim.py (MixMIM pretraining model and classifier), checked against the
official Sense-X/MixMIM layout and rules written out by hand, and against loop-based references.

CPU only, well under a minute: the official-size layouts are built on the meta device, the
numerical checks use mixmim_mini.
"""
import math

import pytest
import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay

from models import MixMIM, MixMIMClassifier, create_model, list_models, model_task
from models.mixmim import MASK_VALUE, window_mix_mask

# name -> (embed_dim, heads); every official model has depths (2, 2, 18, 2), windows (14, 14, 14, 7)
# at 224 and a 512-d, 8-block, 16-head decoder (models_mixmim.py / models_mixmim_ft.py factories).
OFFICIAL_ARCH = {
    "mixmim_base": (128, (4, 8, 16, 32)),
    "mixmim_large": (192, (6, 12, 24, 48)),
    "mixmim_huge": (352, (11, 22, 44, 88)),
}
DEPTHS, WINDOWS = (2, 2, 18, 2), (14, 14, 14, 7)


# ----------------------------------------------------------------------------- helpers
def official_layout(embed, heads, depths=DEPTHS, windows=WINDOWS, img=224, pretrain=True, num_classes=1000,
                    dec=512, dec_depth=8):
    """State-dict layout of the official models (models_mixmim.MixMIM when pretrain, else
    models_mixmim_ft.MixMIM), derived by hand from their constructors (timm 0.4 PatchEmbed with
    norm, PatchMerging = norm + bias-free reduction, persistent relative_position_index)."""
    grid = img // 4
    out = {}
    if pretrain:
        out["mask_token"] = (1, 1, dec)
    out["absolute_pos_embed"] = (1, grid * grid, embed)
    if pretrain:
        out["decoder_pos_embed"] = (1, (img // 32) ** 2, dec)
    out.update({"patch_embed.proj.weight": (embed, 3, 4, 4), "patch_embed.proj.bias": (embed,),
                "patch_embed.norm.weight": (embed,), "patch_embed.norm.bias": (embed,)})

    def vit_block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}

    for s, depth in enumerate(depths):
        c, res = embed * 2 ** s, grid // 2 ** s
        w = min(windows[s], res)
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}"
            out.update(vit_block(p, c))
            out[f"{p}.attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, heads[s])
            out[f"{p}.attn.relative_position_index"] = (w * w, w * w)
        if s < len(depths) - 1:
            out.update({f"layers.{s}.downsample.reduction.weight": (2 * c, 4 * c),
                        f"layers.{s}.downsample.norm.weight": (4 * c,), f"layers.{s}.downsample.norm.bias": (4 * c,)})
    f = embed * 2 ** (len(depths) - 1)
    out.update({"norm.weight": (f,), "norm.bias": (f,)})
    if pretrain:
        out.update({"decoder_embed.weight": (dec, f), "decoder_embed.bias": (dec,)})
        for i in range(dec_depth):
            out.update(vit_block(f"decoder_blocks.{i}", dec))
        out.update({"decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
                    "decoder_pred.weight": (32 * 32 * 3, dec), "decoder_pred.bias": (32 * 32 * 3,)})
    else:
        out.update({"head.weight": (num_classes, f), "head.bias": (num_classes,)})
    return out


# A few entries of mixmim_base written out literally (not through official_layout).
BASE_LITERAL = {
    "absolute_pos_embed": (1, 3136, 128),
    "patch_embed.proj.weight": (128, 3, 4, 4),
    "layers.0.blocks.0.attn.relative_position_bias_table": (729, 4),
    "layers.0.blocks.1.attn.relative_position_index": (196, 196),
    "layers.0.downsample.reduction.weight": (256, 512),
    "layers.1.downsample.norm.weight": (1024,),
    "layers.2.blocks.17.attn.relative_position_bias_table": (729, 16),
    "layers.2.blocks.17.mlp.fc1.weight": (2048, 512),
    "layers.2.downsample.reduction.weight": (1024, 2048),
    "layers.3.blocks.1.attn.relative_position_bias_table": (169, 32),
    "layers.3.blocks.1.attn.relative_position_index": (49, 49),
    "norm.weight": (1024,),
}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def official_layer_id(name, depths):
    """util/lr_decay.get_layer_id_for_mixmim, rewritten from the official code."""
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage = int(name.split(".")[1])
        if "downsample" in name:
            return sum(depths[:stage + 1]) + 1
        return sum(depths[:stage]) + int(name.split(".")[3]) + 1
    return sum(depths)


def official_groups(model, weight_decay, layer_decay):
    """name -> (lr_scale, weight_decay) of the official util/lr_decay.param_groups_lrd."""
    depths = [len(layer.blocks) for layer in model.layers]
    total = sum(depths) + 1
    scales = [layer_decay ** (total - i) for i in range(total + 1)]
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0. if (p.ndim == 1 or n in model.no_weight_decay()) else weight_decay
        out[n] = (scales[official_layer_id(n, depths)], wd)
    return out


def timm_groups(model, weight_decay, layer_decay):
    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def ref_patchify(imgs, p=32):
    """Loop-based patchify: cells in row-major order, elements ordered (row, col, channel)."""
    n, ch, H, W = imgs.shape
    cells = [imgs[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(0, 2, 3, 1).reshape(n, -1)
             for r in range(H // p) for c in range(W // p)]
    return torch.stack(cells, dim=1)


def set_fused(model, fused):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def noise_for(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.mask_noise_len, generator=g)


def mask_with(model, ones):
    m = torch.zeros(model.out_num_patches)
    m[list(ones)] = 1
    return m


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return create_model("mixmim_mini", task="pretrain", img_size=128).eval()


@pytest.fixture(scope="module")
def imgs128():
    return torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- 1. layout
@pytest.mark.parametrize("name", list(OFFICIAL_ARCH))
def test_official_layout(name):
    embed, heads = OFFICIAL_ARCH[name]
    with torch.device("meta"):
        pre = create_model(name, task="pretrain")
        cls = create_model(name, task="classify")
    assert shapes(pre) == official_layout(embed, heads)
    assert shapes(cls) == official_layout(embed, heads, pretrain=False)
    # 24 blocks of 14 entries, 3 merges of 3, patch embed 4, norm 2, + 3 tables/tokens and the
    # 8-block decoder (2 + 96 + 2 + 2) for pretraining, + the table and the head for the classifier.
    assert len(pre.state_dict()) == 456 and len(cls.state_dict()) == 354
    assert isinstance(cls.head, nn.Linear)


def test_base_layout_literal():
    with torch.device("meta"):
        pre = create_model("mixmim_base", task="pretrain")
    s = shapes(pre)
    for k, v in BASE_LITERAL.items():
        assert s[k] == v, k
    assert s["mask_token"] == (1, 1, 512) and s["decoder_pos_embed"] == (1, 49, 512)
    assert s["decoder_pred.weight"] == (3072, 512) and "layers.3.downsample.norm.weight" not in s
    assert pre.state_dict()["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64


def test_official_parameter_counts():
    # Official README: Swin-B/W14 88 M, Swin-L/W14 197 M trainable parameters (fine-tuning model).
    for name, millions in [("mixmim_base", 88), ("mixmim_large", 197)]:
        with torch.device("meta"):
            cls = create_model(name, task="classify")
        n = sum(p.numel() for p in cls.parameters() if p.requires_grad)
        assert round(n / 1e6) == millions, (name, n)
        assert not cls.absolute_pos_embed.requires_grad


def test_relative_position_index_values(mini):
    # Token pair (a, b) in a w x w window: row (dy + w - 1) * (2w - 1) + (dx + w - 1), dy = ya - yb.
    for layer in mini.layers:
        attn = layer.blocks[0].attn
        w = attn.window_size
        ref = torch.empty(w * w, w * w, dtype=torch.long)
        for a in range(w * w):
            for b in range(w * w):
                dy, dx = a // w - b // w, a % w - b % w
                ref[a, b] = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
        assert torch.equal(attn.relative_position_index, ref)


def test_window_clipped_to_grid():
    # Official rule: a window at least as large as the grid becomes the grid.
    m = create_model("mixmim_mini", task="pretrain", img_size=64)
    assert [layer.blocks[0].window_size for layer in m.layers] == [16, 8, 4, 2]
    m = create_model("mixmim_mini", task="pretrain", img_size=64, window_size=(32, 32, 32, 32))
    assert [layer.blocks[0].window_size for layer in m.layers] == [16, 8, 4, 2]
    assert tuple(m.layers[0].blocks[0].attn.relative_position_bias_table.shape) == (31 * 31, 1)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="windows"):
        with torch.device("meta"):
            create_model("mixmim_base", task="pretrain", img_size=192)  # 48x48 grid, 14x14 windows
    with pytest.raises(ValueError, match="multiple of the encoder stride"):
        create_model("mixmim_mini", task="pretrain", img_size=80)
    m = create_model("mixmim_mini", task="pretrain", img_size=64)
    with pytest.raises(ValueError, match="built for 64x64"):
        m(torch.randn(2, 3, 128, 128))


# ----------------------------------------------------------------------------- 2. init
def test_initialisation_like_official():
    torch.manual_seed(0)
    m = create_model("mixmim_mini", task="pretrain", img_size=64)
    for lin in (x for x in m.modules() if isinstance(x, nn.Linear)):
        fan_out, fan_in = lin.weight.shape
        assert lin.weight.abs().max().item() <= math.sqrt(6.0 / (fan_in + fan_out)) * (1 + 1e-6)  # xavier
        assert lin.bias is None or torch.all(lin.bias == 0)
    for ln in (x for x in m.modules() if isinstance(x, nn.LayerNorm)):
        assert ln.eps == 1e-5 and torch.all(ln.weight == 1) and torch.all(ln.bias == 0)  # official nn.LayerNorm
    # Patch embedding: PyTorch's conv default (nonzero bias), not xavier as in MAE.
    assert m.patch_embed.proj.bias.abs().sum() > 0
    tables = torch.cat([b.attn.relative_position_bias_table.flatten() for layer in m.layers for b in layer.blocks])
    assert 0.015 < tables.std().item() < 0.025 and tables.abs().max().item() <= 2.0
    assert 0 < m.mask_token.abs().max().item() < 0.2
    assert not m.absolute_pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    # Fixed sin-cos tables: first half encodes the column, [sin | cos] of 1/10000^(j/(D/4)).
    gw = 16
    k = 17  # row 1, column 1
    omega = torch.tensor([1 / 10000 ** (j / 8) for j in range(8)])
    expected = torch.cat([torch.sin(omega * (k % gw)), torch.cos(omega * (k % gw)),
                          torch.sin(omega * (k // gw)), torch.cos(omega * (k // gw))])
    torch.testing.assert_close(m.absolute_pos_embed[0, k], expected, atol=1e-6, rtol=0)
    assert m.decoder_pos_embed.shape == (1, 4, 64)


def test_initialisation_seeded():
    torch.manual_seed(5)
    a = create_model("mixmim_mini", task="pretrain")
    torch.manual_seed(5)
    b = create_model("mixmim_mini", task="pretrain")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# ----------------------------------------------------------------------------- 3. masks
def test_shared_mask_and_stage_upsampling(mini, imgs128):
    n, L = 4, mini.out_num_patches
    assert mini.mask_grid == (4, 4) and L == 16 and mini.mask_noise_len == 17
    with torch.no_grad():
        _, pred, mask = mini(imgs128, mask_ratio=0.5, noise=noise_for(mini, n))
    assert mask.shape == (n, L) and mask.dtype == torch.float32 and pred.shape == (n, L, 32 * 32 * 3)
    assert torch.equal(mask, mask[:1].expand(n, -1))  # one mask for the batch
    assert mask[0].sum().item() == 8
    # Nearest upsampling: stage token (y, x) takes the final-grid cell (y // f, x // f).
    stages = mini.stage_masks(mask[0])
    assert len(stages) == 4
    for (gh, gw), sm in zip(mini.stage_grids, stages):
        f = gh // 4
        ref = torch.tensor([mask[0, (y // f) * 4 + x // f].item() for y in range(gh) for x in range(gw)])
        assert torch.equal(sm, ref)
    assert [g for g in mini.stage_grids] == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_mask_from_noise_row0(mini, imgs128):
    L = mini.out_num_patches
    noise = noise_for(mini, 4, seed=3)
    mask = mini.random_masking(4, 0.5, noise)
    # Official: the int(L * ratio) smallest entries are scattered to 1.
    expected = torch.zeros(L)
    expected[torch.argsort(noise[0, :L])[:8]] = 1
    assert torch.equal(mask, expected)
    with torch.no_grad():
        loss_a, pred_a, mask_a = mini(imgs128, 0.5, noise)
        loss_b, pred_b, mask_b = mini(imgs128, 0.5, noise.clone())
        other_rows = noise.clone()
        other_rows[1:] = torch.rand(3, L + 1)
        loss_c, _, mask_c = mini(imgs128, 0.5, other_rows)
        other_row0 = noise.clone()
        other_row0[0, :L] = noise[0, :L].roll(1)
        loss_d, _, mask_d = mini(imgs128, 0.5, other_row0)
    assert torch.equal(loss_a, loss_b) and torch.equal(pred_a, pred_b) and torch.equal(mask_a, mask_b)
    assert torch.equal(loss_a, loss_c) and torch.equal(mask_a, mask_c)
    assert torch.equal(mask_d[0], mask_a[0].roll(1)) and not torch.equal(loss_a, loss_d)
    # Symmetry of mixing: the complementary mask only swaps the roles of the pairs.
    complement = noise.clone()
    complement[0, :L] = 1 - noise[0, :L]
    with torch.no_grad():
        loss_e, _, mask_e = mini(imgs128, 0.5, complement)
    assert torch.equal(mask_e, 1 - mask_a)
    torch.testing.assert_close(loss_e, loss_a)
    for ratio, count in [(0.25, 4), (0.75, 12), (0.3, 4)]:
        assert mini.random_masking(4, ratio, noise).sum().item() == count


def test_range_mask_ratio_uses_last_noise_entry():
    torch.manual_seed(0)
    m = create_model("mixmim_mini", task="pretrain", img_size=128, range_mask_ratio=0.3)
    assert create_model("mixmim_mini", task="pretrain").range_mask_ratio == 0.0  # official default
    L = m.out_num_patches
    noise = noise_for(m, 2)
    for u in (0.0, 0.2, 0.5, 0.99):
        noise[0, L] = u
        assert m.random_masking(2, 0.5, noise).sum().item() == int(L * (0.5 + u * 0.3))
    m.range_mask_ratio = 0.0
    assert m.random_masking(2, 0.5, noise).sum().item() == 8


def test_noise_none_and_bad_shapes(mini):
    torch.manual_seed(0)
    masks = {tuple(mini.random_masking(2, 0.5).tolist()) for _ in range(5)}
    assert len(masks) > 1 and all(sum(m) == 8 for m in masks)
    for bad in (torch.rand(2, 16), torch.rand(3, 17), torch.rand(17)):
        with pytest.raises(ValueError, match="noise must have shape"):
            mini.random_masking(2, 0.5, bad)


# ----------------------------------------------------------------------------- 4. mixing
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("config", ["mini128", "unaligned96"])
def test_mixing_keeps_images_apart(fused, config):
    torch.manual_seed(0)
    if config == "mini128":
        m = create_model("mixmim_mini", task="pretrain", img_size=128).eval()
        ones = [0, 2, 5, 6, 7, 9, 12, 15]
    else:
        # Windows that straddle the mask cells at every stage (cells of 8, 4, 2 tokens; windows 12, 6, 3).
        m = create_model("mixmim_mini", task="pretrain", img_size=96, window_size=(12, 6, 3, 3)).eval()
        ones = [1, 3, 4, 8]
    set_fused(m, fused)
    n = 4
    x = torch.randn(n, 3, *m.img_size)
    mask = mask_with(m, ones)
    y = x.clone()
    y[3] += torch.randn_like(y[3])  # image 3 is image 0's partner
    with torch.no_grad():
        za, zb = m.forward_encoder(x, mask), m.forward_encoder(y, mask)
        pa = m.unmix(m.forward_decoder(za, mask), mask)
        pb = m.unmix(m.forward_decoder(zb, mask), mask)
    own, other = mask == 0, mask == 1
    # Row 0 holds image 0 where mask is 0: untouched by image 3; image 3's tokens where mask is 1.
    torch.testing.assert_close(za[0, own], zb[0, own], atol=1e-6, rtol=0)
    assert (za[0, other] - zb[0, other]).abs().amax(-1).min() > 1e-3
    torch.testing.assert_close(za[3, other], zb[3, other], atol=1e-6, rtol=0)
    assert (za[3, own] - zb[3, own]).abs().amax(-1).min() > 1e-3
    torch.testing.assert_close(za[1:3], zb[1:3], atol=1e-6, rtol=0)
    # The unmixed reconstruction of an image depends on that image only.
    torch.testing.assert_close(pa[:3], pb[:3], atol=1e-6, rtol=0)
    assert (pa[3] - pb[3]).abs().amax(-1).min() > 1e-4


def test_encoder_input_is_mixed_embedding_plus_table(mini, imgs128):
    # Official order: patch embedding (with its norm), mix with the batch mirror, add the fixed table.
    mask = mask_with(mini, [1, 4, 6, 11, 13])
    seen = {}
    hook = mini.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            mini.forward_encoder(imgs128, mask)
    finally:
        hook.remove()
    with torch.no_grad():
        emb = mini.patch_embed(imgs128)
    cell_of_token = torch.tensor([(y // 8) * 4 + x // 8 for y in range(32) for x in range(32)])
    from_partner = mask[cell_of_token] == 1
    n = len(imgs128)
    expected = torch.stack([torch.where(from_partner[:, None], emb[n - 1 - i], emb[i]) for i in range(n)])
    torch.testing.assert_close(seen["x"], expected + mini.absolute_pos_embed, atol=1e-6, rtol=0)


def test_attention_mask_blocks_other_source():
    # Without the attention mask, the partner would leak into an image's own tokens.
    torch.manual_seed(0)
    m = create_model("mixmim_mini", task="pretrain", img_size=64).eval()
    layer = m.layers[1]
    x = torch.randn(2, 64, 64)
    token_mask = m.stage_masks(mask_with(m, [1, 2]))[1]
    y = x.clone()
    y[:, token_mask == 1] += torch.randn(2, int(token_mask.sum()), 64)
    with torch.no_grad():
        blk = layer.blocks[0]
        mix = window_mix_mask(token_mask, layer.input_resolution, blk.window_size)
        assert mix.shape == (1, 1, 64, 64) and set(mix.unique().tolist()) == {0.0, MASK_VALUE}
        own = token_mask == 0
        torch.testing.assert_close(blk(x, mix)[:, own], blk(y, mix)[:, own], atol=1e-6, rtol=0)
        assert (blk(x)[:, own] - blk(y)[:, own]).abs().max() > 1e-3


def test_mix_pixels(mini, imgs128):
    mask = mask_with(mini, [0, 5, 10, 11])
    mixed = mini.mix(imgs128, mask)
    n = len(imgs128)
    for i in range(n):
        for cell in range(16):
            r, c = divmod(cell, 4)
            src = n - 1 - i if mask[cell] else i
            sl = (slice(None), slice(r * 32, r * 32 + 32), slice(c * 32, c * 32 + 32))
            assert torch.equal(mixed[i][sl], imgs128[src][sl])
    assert torch.equal(mini.mix(imgs128, mask.expand(n, -1)), mixed)


# ----------------------------------------------------------------------------- 5. loss and patches
def test_patchify_roundtrip(mini, imgs128):
    assert mini.patch_size == 32
    p = mini.patchify(imgs128)
    assert torch.equal(p, ref_patchify(imgs128))
    assert torch.equal(mini.unpatchify(p), imgs128)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_reference(mini, imgs128, norm_pix):
    imgs = imgs128 * 0.05  # small patch variances, where the 1e-6 of norm_pix_loss shows
    mini.norm_pix_loss = norm_pix
    try:
        noise = noise_for(mini, 4, seed=7)
        with torch.no_grad():
            loss, pred, mask = mini(imgs, 0.5, noise)
            x_rec = mini.forward_decoder(mini.forward_encoder(imgs, mask[0]), mask[0])
    finally:
        mini.norm_pix_loss = True
    n = len(imgs)
    assert x_rec.shape == (2 * n, 16, 3072)
    # Unmix by hand: where mask is 1, image i's own row; elsewhere the second copy of its mirror.
    ref_pred = torch.stack([torch.where(mask[i, :, None] == 1, x_rec[i], x_rec[n + (n - 1 - i)]) for i in range(n)])
    torch.testing.assert_close(pred, ref_pred, atol=0, rtol=0)
    target = ref_patchify(imgs.double())
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    ref = ((ref_pred.double() - target) ** 2).mean()  # over every patch, as officially
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_backward_and_grad_checkpointing():
    torch.manual_seed(0)
    m = create_model("mixmim_mini", task="pretrain", img_size=64, drop_path_rate=0.0)
    x, noise = torch.randn(3, 3, 64, 64), torch.rand(3, m.mask_noise_len)
    loss = m(x, 0.5, noise)[0]
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)  # errors if a trainable parameter is unused
    m.set_grad_checkpointing(True)
    loss_ck = m(x, 0.5, noise)[0]
    grads_ck = torch.autograd.grad(loss_ck, params)
    torch.testing.assert_close(loss_ck, loss)
    for g, gc in zip(grads, grads_ck):
        torch.testing.assert_close(gc, g, rtol=1e-4, atol=1e-6)
    # Every trainable parameter gets a gradient (DDP without find_unused_parameters).
    assert all(torch.isfinite(g).all() for g in grads)
    assert m.no_weight_decay() == {"mask_token"}


def test_fused_and_explicit_attention_agree(mini, imgs128):
    noise = noise_for(mini, 4, seed=2)
    with torch.no_grad():
        set_fused(mini, True)
        a = mini(imgs128, 0.5, noise)
        set_fused(mini, False)
        b = mini(imgs128, 0.5, noise)
        set_fused(mini, True)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- 6. classifier
def test_classifier_loads_pretrained_encoder(mini, imgs128):
    torch.manual_seed(1)
    cls = create_model("mixmim_mini", task="classify", img_size=128, num_classes=7).eval()
    state = mini.state_dict()
    res = cls.load_state_dict(state, strict=False)
    assert sorted(res.missing_keys) == ["head.bias", "head.weight"]
    assert set(res.unexpected_keys) == {k for k in state if k.startswith(("decoder_", "mask_token"))}
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    assert set(encoder_only) | {"head.weight", "head.bias"} == set(cls.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(cls.forward_features(imgs128), mini.encode(imgs128))
        logits = cls(imgs128)
        feats = cls.forward_head(cls.forward_features(imgs128), pre_logits=True)
    assert logits.shape == (4, 7) and feats.shape == (4, 256)
    torch.testing.assert_close(logits, cls.head(mini.encode(imgs128).mean(1)))


def test_classifier_interface():
    m = create_model("mixmim_mini", task="classify", num_classes=3, img_size=64, drop_path_rate=0.2,
                     global_pool=True)
    assert m.uses_global_pool is True and m.num_prefix_tokens == 0 and m.no_weight_decay() == set()
    assert isinstance(m.head, nn.Linear) and m.head.out_features == 3 and m.head.in_features == m.num_features
    drops = [b.drop_path for layer in m.layers for b in layer.blocks]
    assert isinstance(drops[0], nn.Identity) and drops[-1].drop_prob == pytest.approx(0.2)
    assert create_model("mixmim_mini", task="classify", global_pool="avg").global_pool == "avg"
    for bad in (False, "token", ""):
        with pytest.raises(ValueError, match="no class token"):
            create_model("mixmim_mini", task="classify", global_pool=bad)
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), nn.Identity) and m(torch.randn(2, 3, 64, 64)).shape == (2, 256)


@pytest.mark.parametrize("name", ["mixmim_mini", "mixmim_base"])
def test_layer_decay_groups_match_official(name):
    if name == "mixmim_base":
        with torch.device("meta"):
            model = create_model(name, task="classify")
    else:
        model = create_model(name, task="classify", num_classes=5)
    got = timm_groups(model, 0.05, 0.7)
    assert got == official_groups(model, 0.05, 0.7)
    depths = model.depths
    top = sum(depths) + 1
    # Official quirks: the head gets 0.7x the lr, the embedding 0.7^(sum(depths)+1), the merge
    # after stage 0 shares stage 1's first block, the bias tables are decayed.
    assert got["head.weight"] == (0.7, 0.05) and got["head.bias"] == (0.7, 0.0)
    assert got["patch_embed.proj.weight"] == (0.7 ** top, 0.05)
    assert got["layers.0.downsample.reduction.weight"][0] == got["layers.1.blocks.0.attn.qkv.weight"][0]
    assert got["layers.0.blocks.0.attn.relative_position_bias_table"][1] == 0.05
    assert "absolute_pos_embed" not in got


# ----------------------------------------------------------------------------- 7. precision, compile, registry
def test_bf16_autocast_finite(mini, imgs128):
    noise = noise_for(mini, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = mini(imgs128, 0.5, noise)
    assert torch.isfinite(loss) and torch.isfinite(pred).all()
    with torch.no_grad():
        ref = mini(imgs128, 0.5, noise)[0]
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    cls = create_model("mixmim_mini", task="classify", img_size=128, num_classes=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cls(imgs128)
        out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cls.head.weight.grad).all()


def test_compiles_to_one_graph():
    torch.manual_seed(0)
    m = create_model("mixmim_mini", task="pretrain", img_size=64, range_mask_ratio=0.2)
    x, noise = torch.randn(2, 3, 64, 64), torch.rand(2, m.mask_noise_len)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # fails on any graph break
    loss_c, pred_c, mask_c = compiled(x, 0.5, noise)
    loss_e, pred_e, mask_e = m(x, 0.5, noise)
    assert torch.equal(mask_c, mask_e)
    torch.testing.assert_close(loss_c, loss_e)
    torch._dynamo.reset()


def test_registry():
    for size in ("mini", "base", "large", "huge"):
        name = f"mixmim_{size}"
        assert sorted(model_task(name)) == ["classify", "pretrain"]
        assert name in list_models("mixmim", task="pretrain") and name in list_models("mixmim", task="classify")
    with pytest.raises(ValueError, match="pass task="):
        create_model("mixmim_mini")
    assert isinstance(create_model("mixmim_mini", task="pretrain"), MixMIM)
    assert isinstance(create_model("mixmim_mini", task="classify"), MixMIMClassifier)
    with torch.device("meta"):
        m = create_model("mixmim_base", task="pretrain", norm_pix_loss=False, decoder_depth=2, img_size=448)
    assert m.norm_pix_loss is False and len(m.decoder_blocks) == 2 and m.mask_grid == (14, 14)
    assert m.mask_noise_len == 197


def test_loss_keeps_the_official_type_promotion(mini):
    """The official loss is ((x_rec - target) ** 2).mean() with no cast: float64 stays float64."""
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    target = ref_patchify(imgs)
    if mini.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    pred = torch.randn(target.shape, dtype=torch.float64)
    loss = mini.forward_loss(imgs, pred)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(), rtol=1e-13, atol=0)
    assert mini.forward_loss(imgs.float(), pred.bfloat16()).dtype == torch.float32
