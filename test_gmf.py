"""Tests of gmf.py: what GMA and GroupMixFormer must do, each property in its own test.

Fidelity to the official code
  - every official weight name maps onto ours with the same shape, and the official names
    follow the layout of the official module tree;
  - with the same weights, our network computes the official logits for all five variants, in
    eval and in train mode (golden logits computed with the official models/groupmixformer.py);
  - the official variants have exactly the official parameter counts.
API
  - forward = forward_head(forward_features); forward_stages gives every stage's map with the grid
    read off the convolutions; reset_classifier; param_groups; create_model / list_models.
Errors
  - impossible configs and inputs raise ValueError naming the value and the rule.
"""
import functools
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gmf

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_M_LISTING = os.path.join(HERE, "..", "shared", "docs", "official_state_dict_M.tsv")
OFFICIAL = ["groupmixformer_m", "groupmixformer_t", "groupmixformer_s", "groupmixformer_b",
            "groupmixformer_l"]


# ----------------------------------------------------------------------------------------------
# The official checkpoint layout, written out from the official module tree
# ----------------------------------------------------------------------------------------------

BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_names(depths):
    """Every state_dict name of the official GroupMixFormer with these blocks per stage."""
    names = []
    for i in (1, 2):
        names += [f"conv_stem.proj{i}.weight", f"conv_stem.proj{i}.bias"]
        names += [f"conv_stem.norm{i}.{p}" for p in BATCH_NORM]
    for i in range(len(depths)):
        names += [f"patch_embed_layers.{i}.proj.conv1.weight",
                  f"patch_embed_layers.{i}.proj.pointwise_conv.weight"]
        names += [f"patch_embed_layers.{i}.norm.{p}" for p in BATCH_NORM]
    block = ["cpe.proj.weight", "cpe.proj.bias", "norm1.weight", "norm1.bias",
             "att.qkv.weight", "att.qkv.bias", "att.proj.weight", "att.proj.bias"]
    block += [f"att.aggregator.norm0.{p}" for p in BATCH_NORM]
    for k in (1, 2, 3):
        block += [f"att.aggregator.agg{k}.conv1.weight", f"att.aggregator.agg{k}.pointwise_conv.weight"]
        block += [f"att.aggregator.norm{k}.{p}" for p in BATCH_NORM]
    block += ["att.aggregator.agg0.conv.conv1.weight", "att.aggregator.agg0.conv.pointwise_conv.weight",
              "att.aggregator.agg0.norm.weight", "att.aggregator.agg0.norm.bias"]
    block += [f"att.crpe.conv_list.{j}.{p}" for j in range(3) for p in ("weight", "bias")]
    block += ["norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for i, depth in enumerate(depths):
        names += [f"groupmixformer_backbone.{i}.gma_stage.{j}.{b}" for j in range(depth) for b in block]
    names += [f"norm4.{p}" for p in BATCH_NORM] + ["head.weight", "head.bias"]
    return names


def deterministic_tensor(name, shape):
    """A value for the official tensor `name` that depends only on its name and shape.

    No random number generator is involved, so the same weights can be built in any process and
    any PyTorch version: a product of two sine waves with a phase taken from the name's CRC-32,
    scaled like a sensible initialisation (norm scales near 1, variances positive, kernels with
    variance ~ 1/fan_in), so that activations stay of order one through all the blocks.
    """
    if name.endswith("num_batches_tracked"):
        return torch.tensor(7)
    n = math.prod(shape)
    phase = zlib.crc32(name.encode()) / 2**32 * 2 * math.pi
    t = torch.arange(n, dtype=torch.float64)
    wave = (torch.sin(0.618034 * t + phase) * torch.cos(0.223607 * t - 3 * phase)).reshape(shape)
    if name.endswith("running_var"):
        return 1.0 + 0.5 * wave
    if name.endswith("running_mean"):
        return 0.2 * wave
    if len(shape) == 1 and name.endswith("weight"):  # BatchNorm / LayerNorm scale
        return 1.0 + 0.2 * wave
    if name.endswith("bias"):
        return 0.1 * wave
    std = 1 / math.sqrt(n // shape[0])  # the usual 1/sqrt(fan_in); wave itself has std ~1/2
    if name.endswith(("cpe.proj.weight", "att.proj.weight", "mlp.fc2.weight")):
        std *= 0.2  # layers that write into the residual stream start small, so that it stays O(1)
    return 2 * std * wave


def deterministic_images(batch, height, width):
    t = torch.arange(batch * 3 * height * width, dtype=torch.float64)
    return torch.sin(0.0917 * t) + 0.5 * torch.cos(0.0031 * t * t)


def official_weights(model_name):
    return dict(_official_weights(model_name))  # a fresh dict: tests may delete entries


@functools.lru_cache(maxsize=None)
def _official_weights(model_name):
    """A state dict in the official names and layout, filled with deterministic_tensor values.

    The shapes are those of our model, reached through convert_official_state_dict, so a name the
    conversion sends to the wrong tensor gets the wrong value (or shape) and the logits differ.
    """
    with torch.device("meta"):  # shapes only, no memory
        model = gmf.create_model(model_name)
    ours = model.state_dict()
    names = official_names(model.cfg.depths)
    converted = gmf.convert_official_state_dict({name: None for name in names})
    return {name: deterministic_tensor(name, tuple(ours[our_name].shape))
            for name, our_name in zip(names, converted)}


# Logits of the official models/groupmixformer.py (AILab-CVC/GroupMixFormer, commit c104d57,
# its timm/einops imports installed, SyncBatchNorm run single-process), in float64, with
# drop_path_rate=0, weights official_weights() and input deterministic_images(2, 64, 96): the
# first four logits of each image and each image's sum over all 1000 logits. "train" is a fresh
# model in train mode, where BatchNorm uses the batch's statistics.
OFFICIAL_LOGITS = {
    "groupmixformer_m": {
        "eval": ([[7.431079766935398, -14.056959990571839, 2.502584205223675, -4.883195388388529], [0.8471048816378062, -6.606368575527381, -6.783930780451304, 2.4353409190507587]], [5.021367659493205, -0.46418092547371703]),  # max |logit| 15.9
        "train": ([[0.9174842193749276, -1.3280717826052058, 0.4950384395489946, -0.6188373252316738], [-1.6793064958504198, 0.7459813446677132, -0.9288643907391121, -0.4628289979379007]], [0.7268323620644515, -0.3289519142054589]),  # max |logit| 2
    },
    "groupmixformer_t": {
        "eval": ([[5.996148809033698, 7.905129408693826, -0.13556870478078564, -10.758970452612093], [5.965741128208085, 7.89177316722888, -0.11137525383355018, -10.699714037740119]], [26.93931838579161, 26.87671213925232]),  # max |logit| 20.4
        "train": ([[-0.16834661349484267, -0.5411333905695688, -0.5803232806338026, -0.33999734759566735], [-0.7267636506003666, -1.0184697576824764, -0.8446038602400415, -0.29477885036943124]], [-0.3926619245520997, -0.5150834070618182]),  # max |logit| 1.05
    },
    "groupmixformer_s": {
        "eval": ([[319.3516412644663, 108.73686760442476, -193.2429822379726, -374.38829247004276], [327.2172323400772, 109.69217486474162, -200.15013067100452, -384.61644771298916]], [-110.18213145958418, -118.71313023956293]),  # max |logit| 443
        "train": ([[-0.48392926499677913, -0.5523396456320552, -0.4127992981433872, -0.15768433193115966], [-0.5364259924758409, -0.04987671437041643, 0.3094935759494053, 0.29696559380759985]], [0.19107063430595517, 1.7862542307034297]),  # max |logit| 1.32
    },
    "groupmixformer_b": {
        "eval": ([[85.79771603187143, -19.829302650622317, -106.25856354117202, 80.10469623406667], [86.06139598022337, -27.115074600017472, -101.6692750895053, 84.58065616944026]], [87.36700671141682, 79.25244469947059]),  # max |logit| 133
        "train": ([[-1.0109148714106666, -1.4033823346458485, 0.4905899222058454, 0.07661893418817202], [-0.23175988655256693, -0.6167296671890133, -0.4217325003882253, 0.20569031850544384]], [-1.110718510774407, 0.17042681775012114]),  # max |logit| 1.81
    },
    "groupmixformer_l": {
        "eval": ([[5.386671414171085, -9.995975303610445, -10.41726930875821, 11.56809030509031], [5.353485309066632, -10.011324058060781, -10.402531084527855, 11.521275804246237]], [4.525705937734163, 4.489492252729018]),  # max |logit| 16.6
        "train": ([[-0.53134259948974, -1.1700649351751502, -0.024403643492325936, 0.33995300418371843], [-0.711332158473492, -0.8500470666597116, 0.09326106530994585, -0.057643751490102604]], [-0.4894662240616863, -0.4508254689626061]),  # max |logit| 1.25
    },
}


def _logits(model_name, mode, dtype):
    model = gmf.create_model(model_name, drop_path_rate=0.0).to(dtype)
    gmf.load_official_weights(model, {"model": official_weights(model_name)})
    model.train(mode == "train")
    x = deterministic_images(2, 64, 96).reshape(2, 3, 64, 96).to(dtype)
    with torch.no_grad():
        return model(x).double()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("model_name", OFFICIAL)
def test_official_weights_give_the_official_logits(model_name, mode):
    """Loaded with the official weights, our network computes the official network's logits."""
    logits = _logits(model_name, mode, torch.float64)
    first, sums = OFFICIAL_LOGITS[model_name][mode]
    # float64 on both sides; the two implementations order their sums differently, so agreement
    # is to float64 rounding amplified by ~20-50 blocks, far below any real difference.
    torch.testing.assert_close(logits[:, :4], torch.tensor(first, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits.sum(1), torch.tensor(sums, dtype=torch.float64), rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_official_logits_in_float32(mode):
    """In float32, the logits agree with the official float64 ones to float32 rounding."""
    logits = _logits("groupmixformer_m", mode, torch.float32)
    first, sums = OFFICIAL_LOGITS["groupmixformer_m"][mode]
    torch.testing.assert_close(logits[:, :4], torch.tensor(first, dtype=torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not os.path.exists(OFFICIAL_M_LISTING), reason="needs ../shared/docs")
def test_every_official_weight_name_maps_with_its_shape():
    """Each name of the official M checkpoint listing maps onto a tensor of ours of the same shape."""
    listing = {}
    with open(OFFICIAL_M_LISTING) as f:
        for line in f:
            if not line.startswith("#"):
                name, shape, _ = line.rstrip("\n").split("\t")
                listing[name] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    assert sorted(listing) == sorted(official_names((3, 3, 12, 4)))
    ours = gmf.create_model("groupmixformer_m").state_dict()
    converted = gmf.convert_official_state_dict({name: torch.empty(shape) for name, shape in listing.items()})
    assert sorted(converted) == sorted(ours)
    for name, tensor in converted.items():
        assert tensor.shape == ours[name].shape, name


@pytest.mark.parametrize("model_name", OFFICIAL)
def test_official_names_cover_our_model_one_to_one(model_name):
    """The conversion is a bijection between the official names and our state_dict's names."""
    model = gmf.create_model(model_name)
    names = official_names(model.cfg.depths)
    converted = gmf.convert_official_state_dict({name: torch.empty(0) for name in names})
    assert len(converted) == len(names)
    assert sorted(converted) == sorted(model.state_dict())


def test_checkpoint_layouts_are_accepted():
    """A checkpoint loads with or without its "model" key and with DDP's "module." prefix."""
    weights = official_weights("groupmixformer_m")
    reference = gmf.convert_official_state_dict(weights)
    for checkpoint in (weights, {"model": weights, "epoch": 300},
                       {"model": {"module." + k: v for k, v in weights.items()}}):
        converted = gmf.convert_official_state_dict(checkpoint)
        assert converted.keys() == reference.keys()
        model = gmf.create_model("groupmixformer_m")
        model.load_state_dict(converted, strict=True)


def test_unknown_official_names_are_listed():
    """A name that is not an official weight raises ValueError naming it."""
    weights = official_weights("groupmixformer_m")
    weights["cls_token1"] = torch.zeros(1)
    with pytest.raises(ValueError, match="cls_token1"):
        gmf.convert_official_state_dict(weights)


def test_missing_and_misshapen_weights_are_listed():
    """Loading a checkpoint with missing or wrongly shaped tensors raises ValueError naming them."""
    weights = official_weights("groupmixformer_m")
    del weights["groupmixformer_backbone.2.gma_stage.5.att.crpe.conv_list.1.bias"]
    with pytest.raises(ValueError, match=r"stages\.2\.blocks\.5\.attn\.crpe\.convs\.1\.bias"):
        gmf.load_official_weights(gmf.create_model("groupmixformer_m"), weights)
    weights = official_weights("groupmixformer_m")
    with pytest.raises(ValueError, match=r"head\.weight"):  # 1000 classes into a 10-class model
        gmf.load_official_weights(gmf.create_model("groupmixformer_m", num_classes=10), weights)
    weights = official_weights("groupmixformer_t")  # another variant's checkpoint
    with pytest.raises(ValueError, match="missing"):
        gmf.load_official_weights(gmf.create_model("groupmixformer_m"), weights)


# ----------------------------------------------------------------------------------------------
# Variants and parameter counts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name, params", [
    ("groupmixformer_m", 5_733_120), ("groupmixformer_t", 10_949_152),
    ("groupmixformer_s", 22_421_320), ("groupmixformer_b", 45_827_272),
    ("groupmixformer_l", 71_833_648)])
def test_official_parameter_counts(model_name, params):
    """Each official variant has exactly the parameter count of the official code (1000 classes)."""
    model = gmf.create_model(model_name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_list_models_names_every_variant():
    """list_models() names the five official variants and at least one CIFAR variant, all buildable."""
    names = gmf.list_models()
    assert set(OFFICIAL) <= set(names)
    assert any(name.startswith("groupmixformer_cifar") for name in names)


def test_cifar_variant_keeps_a_spatial_grid_on_32x32():
    """The CIFAR variant classifies 32 x 32 images into 10 classes and never shrinks to a 1 x 1 grid."""
    model = gmf.create_model("groupmixformer_cifar").eval()
    maps = model.forward_stages(torch.randn(2, 3, 32, 32))
    assert all(m.shape[-1] >= 4 and m.shape[-2] >= 4 for m in maps)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_overrides_reach_the_model():
    """create_model's overrides set classes, input channels, drop path, attention core, padding."""
    model = gmf.create_model("groupmixformer_cifar", num_classes=7, in_chans=1, drop_path_rate=0.3,
                             attention="softmax", padding_mode="circular").eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.stages[-1].blocks[-1].drop_path.p == pytest.approx(0.3)
    assert model.stages[0].blocks[0].drop_path.p == 0.0
    assert model.stages[0].blocks[0].attn.attention == "softmax"
    assert model.stem.conv1.padding_mode == "circular"


def test_the_two_attention_cores_differ_only_in_the_core():
    """Both cores have the same weights; their outputs differ, since the cores compute different maps."""
    factorized = gmf.create_model("groupmixformer_cifar").eval()
    softmax = gmf.create_model("groupmixformer_cifar", attention="softmax").eval()
    softmax.load_state_dict(factorized.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(factorized(x), softmax(x))


# ----------------------------------------------------------------------------------------------
# The timm-style API
# ----------------------------------------------------------------------------------------------

def tiny_model(**overrides):
    cfg = dict(dims=(20, 40), depths=(1, 1), mlp_ratios=(2, 2), stem_strides=(2, 1),
               stage_strides=(1, 2), num_classes=5, img_size=16)
    return gmf.GroupMixFormer(gmf.GroupMixFormerConfig(**{**cfg, **overrides}))


@given(height=st.integers(1, 40), width=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_any_input_size_runs_and_grids_follow_the_convolutions(height, width, seed):
    """Any size works, square or not: each stage's grid is what its stride-s convs produce."""
    model = tiny_model().eval()
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    maps = model.forward_stages(x)
    expected_h, expected_w = height, width
    for stride in model.cfg.stem_strides:
        expected_h, expected_w = math.ceil(expected_h / stride), math.ceil(expected_w / stride)
    for m, dim, stride in zip(maps, model.cfg.dims, model.cfg.stage_strides):
        expected_h, expected_w = math.ceil(expected_h / stride), math.ceil(expected_w / stride)
        assert m.shape == (1, dim, expected_h, expected_w)
    assert [tuple(m.shape[-2:]) for m in maps] == model.grid_sizes((height, width))


def test_official_variant_stage_shapes_on_a_non_square_image():
    """M on a 96 x 160 image: stages at /4, /8, /16, /32 with widths 40, 80, 160, 160."""
    model = gmf.create_model("groupmixformer_m").eval()
    maps = model.forward_stages(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 24, 40), (1, 80, 12, 20), (1, 160, 6, 10), (1, 160, 3, 5)]


def test_forward_is_forward_head_of_forward_features():
    """forward(x) == forward_head(forward_features(x)); pre_logits gives the pooled features."""
    model = tiny_model().eval()
    x = torch.randn(3, 3, 24, 20)
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features, 6, 5)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (3, model.num_features)


def test_reset_classifier():
    """reset_classifier(n) gives n logits; reset_classifier(0) makes forward return pooled features."""
    model = tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    model = tiny_model().double()
    model.reset_classifier(4)
    assert model.get_classifier().weight.dtype == torch.float64
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_param_groups_exempt_biases_and_one_dimensional_parameters():
    """param_groups puts every parameter in exactly one group, with decay only on >= 2-D weights."""
    model = tiny_model()
    decay, no_decay = gmf.param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    torch.optim.AdamW(gmf.param_groups(model, 0.05))  # a valid optimizer argument


def test_float64_and_train_mode_run():
    """The model runs in float64 and in train mode (drop path on), giving finite logits."""
    model = tiny_model(drop_path_rate=0.5).double().train()
    out = model(torch.randn(4, 3, 16, 12, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_python_gmf_prints_the_variant_table():
    """`python gmf.py` prints each variant with its parameter count and FLOPs."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "gmf.py")], capture_output=True,
                            text=True, check=True, timeout=300)
    for name in gmf.list_models():
        assert name in result.stdout
    assert "5,733,120" in result.stdout and "GFLOPs" in result.stdout


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(attention="linear"), "attention='linear'"),
    (dict(padding_mode="reflect"), "padding_mode='reflect'"),
    (dict(dims=(42, 80, 160, 160)), "42"),  # not 5 segments
    (dict(dims=(45, 80, 160, 160)), "45"),  # segment 9 does not split into 2 heads
    (dict(num_heads=6), "num_heads=6"),  # not a multiple of the 4 attention segments
    (dict(depths=(3, 3, 12)), "depths"),
    (dict(depths=(3, 0, 12, 4)), "depths"),
    (dict(mlp_ratios=(4, 4, 0, 4)), "mlp_ratios"),
    (dict(group_sizes=(1, 3, 4, 7)), "group_sizes"),
    (dict(crpe_windows=((3, 2), (5, 3))), "crpe_windows"),
    (dict(stem_strides=(2, 2, 2)), "stem_strides"),
    (dict(stage_strides=(1, 2, 0, 2)), "stage_strides"),
    (dict(num_classes=-1), "num_classes=-1"),
    (dict(in_chans=0), "in_chans=0"),
    (dict(drop_path_rate=1.0), "drop_path_rate=1.0"),
    (dict(dims=()), "dims"),
]


@pytest.mark.parametrize("overrides, named", BAD_CONFIGS)
def test_impossible_configs_raise_value_error_naming_the_value(overrides, named):
    """An impossible config raises ValueError at construction, naming the offending value."""
    with pytest.raises(ValueError, match=__import__("re").escape(named)):
        gmf.create_model("groupmixformer_m", **overrides)


@given(width=st.integers(1, 400), heads=st.sampled_from([4, 8, 12, 16]))
def test_stage_widths_must_split_into_segments_and_heads(width, heads):
    """A width builds exactly when it splits into 5 segments of whole heads; otherwise ValueError."""
    crpe = ((3, heads // 4), (5, heads // 4), (7, heads - heads // 2))
    config = dict(dims=(width,), depths=(1,), mlp_ratios=(1,), stage_strides=(1,),
                  num_heads=heads, crpe_windows=crpe)
    fits = width % 5 == 0 and (width // 5) % (heads // 4) == 0 and width >= 2
    if fits:
        gmf.GroupMixFormerConfig(**config)
    else:
        with pytest.raises(ValueError, match=str(width)):
            gmf.GroupMixFormerConfig(**config)


def test_unknown_model_or_override_is_named():
    """create_model names an unknown variant or config field."""
    with pytest.raises(ValueError, match="groupmixformer_xl"):
        gmf.create_model("groupmixformer_xl")
    with pytest.raises(ValueError, match="num_class"):
        gmf.create_model("groupmixformer_m", num_class=10)


@pytest.mark.parametrize("shape, named", [
    ((3, 32, 32), "rank 3"), ((2, 1, 32, 32), "3 input channels, got 1"),
    ((2, 3, 0, 32), "empty"), ((2, 3, 32, 32, 1), "rank 5")])
def test_wrong_inputs_raise_value_error(shape, named):
    """Inputs of the wrong rank, channels or an empty size raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=named):
        tiny_model()(torch.zeros(shape))


def test_circular_padding_needs_grids_as_large_as_its_windows():
    """With circular padding a grid smaller than the 7x7 windows' padding raises ValueError."""
    model = tiny_model(padding_mode="circular").eval()
    model(torch.zeros(1, 3, 12, 12))  # grids 6x6 and 3x3: fine
    with pytest.raises(ValueError, match="stage 1"):
        model(torch.zeros(1, 3, 8, 12))  # stage 1 grid 2x3
