"""Every registered model family against the contract of models/base.py: what engine/ and scripts/
ask of a pretraining model (MaskedImageModel) and of a classifier (PretrainedClassifier)."""
import re

import pytest
import torch
import torch.nn.functional as F

from models import MaskedImageModel, PretrainedClassifier, create_model, list_models
from models.patches import denorm_pix_target, norm_pix_target
from models.pos_embed import resample_pos_embed
from models.state_dict import checkpoint_kind, has_decoder, other_head_pooling

SMALL_DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
# One model per family, small: name -> (input size, factory kwargs).
PRETRAIN = {
    "mae_vit_mini_patch16": (48, {}),                       # 3x3 patches
    "mixmim_mini": (128, {}),                               # 4x4 final tokens
    "mae_vit_tiny_patch16_224": (32, SMALL_DECODER),        # a timm ViT encoder, 2x2 patches
}
# (pretraining model, its classifier, classifier kwargs, classifier input size): another size than
# the pretraining one, so that position tables have to be adapted.
CLASSIFY = [
    ("mae_vit_mini_patch16", "vit_mini_patch16", dict(global_pool=True), 64),
    ("mae_vit_mini_patch16", "vit_mini_patch16", dict(global_pool=False), 64),
    ("mixmim_mini", "mixmim_mini", dict(global_pool=True), 64),
    ("mae_vit_tiny_patch16_224", "vit_tiny_patch16_224", dict(global_pool=True), 48),
    ("mae_vit_tiny_patch16_224", "vit_tiny_patch16_224", dict(global_pool=False), 48),
]
IDS = [f"{c}-{'avg' if kw['global_pool'] else 'token'}" for _, c, kw, _ in CLASSIFY]


def pretrain_model(name):
    size, kwargs = PRETRAIN[name]
    torch.manual_seed(0)
    return create_model(name, "pretrain", img_size=size, **kwargs), size


def images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_registered_family_is_covered():
    """A new family (a new class behind a registered name) must join the lists above."""
    with torch.device("meta"):
        covered = {"pretrain": {type(create_model(n, "pretrain", img_size=s, **kw)) for n, (s, kw) in PRETRAIN.items()},
                   "classify": {type(create_model(c, "classify", img_size=s, **kw)) for _, c, kw, s in CLASSIFY}}
        for task, base in (("pretrain", MaskedImageModel), ("classify", PretrainedClassifier)):
            for name in list_models(task=task):
                model = create_model(name, task)
                assert isinstance(model, base), name
                assert type(model) in covered[task], f"{name} ({type(model).__name__}) is not in this test's lists"


@pytest.mark.parametrize("name", PRETRAIN)
def test_forward_shapes_noise_and_mask_counts(name):
    model, size = pretrain_model(name)
    assert isinstance(model, MaskedImageModel)
    assert 0 < model.default_mask_ratio < 1
    assert isinstance(model.mixes_images, bool) and isinstance(model.plain_vit_mae, bool)
    n, p = 4, model.patch_size
    x = images(n, size)
    h, w = model.grid_of(x)
    assert (h, w) == (size // p, size // p)
    assert model.mask_noise_len_at(size) == model.mask_noise_len
    for ratio in (model.default_mask_ratio, 0.3):
        noise = torch.rand(n, model.mask_noise_len, generator=torch.Generator().manual_seed(1))
        loss, pred, mask = model(x, mask_ratio=ratio, noise=noise)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert pred.shape == (n, h * w, p * p * model.in_chans)
        assert mask.shape == (n, h * w) and set(mask.unique().tolist()) <= {0.0, 1.0}
        counts = model.mask_counts(ratio)
        assert counts.length == h * w and counts.unit in ("patches", "tokens")
        assert mask.sum(1).tolist() == [counts.removed] * n
        assert (1 - mask).sum(1).tolist() == [counts.kept] * n
        # the same noise, the same mask
        assert torch.equal(model(x, mask_ratio=ratio, noise=noise)[2], mask)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(x, mask_ratio=0.5, noise=torch.rand(n, model.mask_noise_len + 1))
    # Another input size: either refused, or the noise length given fits forward at that size.
    try:
        length = model.mask_noise_len_at(size + p)
    except ValueError:
        return
    loss, pred, mask = model(images(n, size + p), mask_ratio=0.5, noise=torch.rand(n, length))
    assert mask.shape == (n, ((size + p) // p) ** 2)


@pytest.mark.parametrize("name", PRETRAIN)
def test_range_mask_ratio_is_taken_only_where_announced(name):
    """The engine asks takes_range_mask_ratio before passing the factory argument."""
    size, kwargs = PRETRAIN[name]
    with torch.device("meta"):
        plain = create_model(name, "pretrain", img_size=size, **kwargs)
        if not plain.takes_range_mask_ratio:
            with pytest.raises(TypeError, match="range_mask_ratio"):
                create_model(name, "pretrain", img_size=size, range_mask_ratio=0.25, **kwargs)
            return
        ranged = create_model(name, "pretrain", img_size=size, range_mask_ratio=0.25, **kwargs)
    # the fewest kept patches fall with the largest extra ratio; the fewest masked do not change
    assert ranged.mask_counts(0.5).removed == plain.mask_counts(0.5).removed
    assert ranged.mask_counts(0.5).kept < plain.mask_counts(0.5).kept


@pytest.mark.parametrize("name", PRETRAIN)
def test_patchify_round_trip_and_pixel_target(name):
    model, size = pretrain_model(name)
    x = images(2, size)
    patches = model.patchify(x)
    h, w = model.grid_of(x)
    assert patches.shape == (2, h * w, model.patch_size ** 2 * model.in_chans)
    assert torch.equal(model.unpatchify(patches, model.grid_of(x)), x)
    model.norm_pix_loss = False
    assert torch.equal(model.pixel_target(x), patches)
    model.norm_pix_loss = True
    assert torch.equal(model.pixel_target(x), norm_pix_target(patches))


@pytest.mark.parametrize("name", PRETRAIN)
def test_decoder_arch_rebuilds_the_same_decoder(name):
    size, kwargs = PRETRAIN[name]
    with torch.device("meta"):
        for decoder in (kwargs, dict(decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=3)):
            model = create_model(name, "pretrain", img_size=size, **decoder)
            if decoder:
                assert model.decoder_arch == decoder
            again = create_model(name, "pretrain", img_size=size, **model.decoder_arch)
            assert {k: v.shape for k, v in again.state_dict().items()} == \
                {k: v.shape for k, v in model.state_dict().items()}
            assert has_decoder(model.state_dict()) and checkpoint_kind(model.state_dict()) == "pretrain"


def _check_shard_units(model):
    """Units: submodules, disjoint, not nested, together exactly the transformer blocks
    (`blocks.<i>` of the encoder, the decoder and every MixMIM stage); the rest is the root's."""
    units = model.shard_units()
    assert units and all(isinstance(u, torch.nn.Module) for u in units)
    names = {id(m): n for n, m in model.named_modules()}
    assert all(id(u) in names for u in units)
    owner = {}
    for i, unit in enumerate(units):
        assert any(True for _ in unit.parameters())
        for p in unit.parameters():
            assert id(p) not in owner, f"{names[id(unit)]} shares a parameter with unit {owner[id(p)]}"
            owner[id(p)] = i
    in_units = {n for n, p in model.named_parameters() if id(p) in owner}
    blocks = {n for n, _ in model.named_parameters() if re.search(r"(^|[._])blocks\.\d+\.", n)}
    assert in_units == blocks
    assert len(in_units) < len(list(model.parameters()))  # embeddings, norms, heads: the root's


@pytest.mark.parametrize("name", PRETRAIN)
def test_shard_units_are_the_blocks(name):
    size, kwargs = PRETRAIN[name]
    with torch.device("meta"):
        model = create_model(name, "pretrain", img_size=size, **kwargs)
    _check_shard_units(model)
    assert len(model.shard_units()) == sum(1 for n, _ in model.named_modules() if re.fullmatch(r"(.*[._])?blocks\.\d+", n))


@pytest.mark.parametrize("pre_name, name, kwargs, size", CLASSIFY, ids=IDS)
def test_classifier_shard_units_are_the_blocks(pre_name, name, kwargs, size):
    with torch.device("meta"):
        _check_shard_units(create_model(name, "classify", img_size=size, num_classes=3, **kwargs))


@pytest.mark.parametrize("name", PRETRAIN)
def test_encoder_features_see_whole_images_and_draw_nothing(name):
    """engine/monitor.py's features: per image, independent of the batch, no RNG drawn, the class
    token only where the family has one."""
    model, size = pretrain_model(name)
    model.eval()
    x = images(3, size)
    rng = torch.get_rng_state()
    with torch.no_grad():
        feats = model.encoder_features(x)
        alone = model.encoder_features(x[1:2])
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(feats) == ({"cls", "patch_mean"} if hasattr(model, "cls_token") else {"patch_mean"})
    for name_, f in feats.items():
        assert f.shape[0] == 3 and f.ndim == 2 and torch.isfinite(f).all()
        torch.testing.assert_close(alone[name_][0], f[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PRETRAIN)
def test_mix_is_offered_only_by_mixing_models(name):
    model, size = pretrain_model(name)
    x = images(4, size)
    mask = model(x, mask_ratio=0.5)[2]
    if not model.mixes_images:
        with pytest.raises(NotImplementedError):
            model.mix(x, mask)
        return
    mixed = model.mix(x, mask)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, model.patch_size ** 2 * 3), model.grid_of(x)).bool()
    assert torch.equal(mixed[~m], x[~m]) and torch.equal(mixed[m], x.flip(0)[m])


@pytest.mark.parametrize("pre_name, name, kwargs, size", CLASSIFY, ids=IDS)
def test_classifier_takes_its_pretraining_models_weights(pre_name, name, kwargs, size):
    pre, _ = pretrain_model(pre_name)
    clf = create_model(name, "classify", img_size=size, num_classes=3, **kwargs)
    assert isinstance(clf, PretrainedClassifier)
    assert clf.uses_global_pool == kwargs["global_pool"]
    assert clf.has_class_token == (clf.num_prefix_tokens == 1)
    assert clf.input_stride == pre.patch_size and size % clf.input_stride == 0
    assert checkpoint_kind(clf.state_dict()) == "classify"

    state = pre.state_dict()
    adapted = clf.adapt_pretrained({**state, "epoch": 3})  # non-tensor entries of official files go too
    assert not has_decoder(adapted) and checkpoint_kind(adapted) == "encoder"
    # The sizes differ, so without the adaptation the position tables would not fit: load_state_dict
    # raises on any shape mismatch.
    missing, unexpected = clf.load_state_dict(adapted, strict=False)
    assert unexpected == [] and set(missing) <= clf.allowed_missing_keys, (missing, unexpected)
    own = clf.state_dict()
    for k, v in adapted.items():
        assert torch.equal(own[k], v), k
        if state[k].shape == v.shape:
            assert torch.equal(v, state[k]), k  # encoder weights taken as they are, unless resized

    clf.init_head(2e-5)
    assert 0 < clf.head.weight.abs().max() < 8 * 2e-5
    assert clf(images(2, size)).shape == (2, 3)


@pytest.mark.parametrize("pre_name, name, kwargs, size", CLASSIFY, ids=IDS)
def test_classifier_checkpoint_of_another_number_of_classes(pre_name, name, kwargs, size):
    clf = create_model(name, "classify", img_size=size, num_classes=3, **kwargs)
    other = create_model(name, "classify", img_size=size, num_classes=5, **kwargs)
    adapted = clf.adapt_pretrained(other.state_dict())
    assert not any(k.startswith("head.") for k in adapted)
    missing, unexpected = clf.load_state_dict(adapted, strict=False)
    assert unexpected == [] and set(missing) <= {"head.weight", "head.bias"}


def test_other_head_pooling_names_the_checkpoints_head():
    pooled, token = (create_model("vit_mini_patch16", img_size=32, num_classes=2, global_pool=g).state_dict()
                     for g in (True, False))
    assert other_head_pooling(token, pooled) == "avg" and other_head_pooling(pooled, token) == "token"
    assert other_head_pooling(pooled, pooled) is None and other_head_pooling(token, token) is None


def test_norm_pix_target_pair_is_the_official_formula_bit_for_bit():
    t = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0)) * 0.05
    mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
    assert torch.equal(norm_pix_target(t), (t - mean) / (var + 1.e-6) ** .5)
    pred = torch.randn(3, 5, 48)
    assert torch.equal(denorm_pix_target(pred, t), pred * (var + 1.e-6) ** .5 + mean)
    assert torch.allclose(denorm_pix_target(norm_pix_target(t), t), t, atol=1e-6)


def test_resample_pos_embed_is_the_official_interpolation():
    """models_vit's interpolate_pos_embed: bicubic on the patch part, cls row kept."""
    table = torch.randn(1, 1 + 4 * 4, 8, generator=torch.Generator().manual_seed(0))
    patches = table[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    official = F.interpolate(patches, size=(7, 7), mode="bicubic", align_corners=False)
    official = torch.cat([table[:, :1], official.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    assert torch.equal(resample_pos_embed(table, (7, 7), 1), official)
    with pytest.raises(ValueError, match="cannot resample a position embedding of 5 patches"):
        resample_pos_embed(torch.zeros(1, 6, 8), (7, 7), 1)
