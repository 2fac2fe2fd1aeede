"""The properties of Group-Mix Attention and GroupMixFormer, each one a test. Run `pytest -v`.

Parts, in reading order (GMF_HYPOTHESIS=thorough draws many more examples of each property):

1. GMA from the equations. Loop references in float64 that share no code with gmf.py: the k x k
   group aggregation, both attention cores, the conv. relative position encoding, the
   non-attention branch, a whole GMA layer and block. The vectorised code equals them for drawn
   configs, grid sizes (non-square too) and seeds. Hand-worked examples come first. Then why
   attention over proxies relates groups: without BatchNorm and Hardswish a proxy logit is a
   double window sum of token-to-token terms (A (Q G K^T) A^T when all channels share a kernel),
   and BatchNorm's shift and Hardswish are what bend this.
2. Symmetries, each with the reason it holds:
   - circular padding: a stride-1 block commutes with cyclic shifts of the token grid, and the
     logits ignore image shifts by multiples of the total stride (convs and per-token maps
     commute with shifts, attention with any reordering of the tokens; the pool forgets
     position);
   - both attention cores are equivariant to token permutations (they see a set), and the k x k
     group proxies are what break this (they know who is a neighbour);
   - permuting the batch permutes the outputs (eval and train); samples are independent only in
     eval, since BatchNorm couples them in train;
   - with left-right symmetric kernels the network commutes with horizontal flips;
   - softmax over tokens ignores a constant added to all tokens of a key channel;
   - the factorized core is the N x N map q softmax(k)^T applied to v, so both cores can be put
     side by side as maps; that map has rank <= d, and each key channel pools v over the whole
     image; CRPE is windowed relative attention with one embedding per channel (CoaT's
     derivation), and the factorized core's odd scale is a change of parametrisation.
3. Gradients and numerics: gradcheck of a GMA layer, a gradient for every parameter, finite
   outputs, both softmaxes stable for keys far beyond exp's range, drop path, the official
   initialisation, same seed same output.
4. API and shapes: forward = forward_head(forward_features); every stage's grid is what its
   convolutions give, for any config and input size; reset_classifier; param_groups; the
   attention maps (map @ v is each core's output; the model is left untouched); the variants,
   create_model's overrides and the two ablation switches.
5. Fidelity to the official code: every official weight name maps onto a tensor of the same
   shape, and with the same weights our network gives the official network's logits (golden
   values computed with the official code) for all five variants, in eval and train mode; the
   official parameter counts.
6. Bad input: impossible configs and inputs raise ValueError naming the value and the rule.
7. tutorial.md: every Python block runs and prints what the tutorial says it prints, and every
   gmf.py name and test it cites exists. Blocks fenced as "python slow" run with GMF_SLOW=1.

The trainer, train_cifar.py, has its own tests in test_train_cifar.py.
"""
import copy
import functools
import math
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import gmf

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_M_LISTING = os.path.join(HERE, "..", "shared", "docs", "official_state_dict_M.tsv")
OFFICIAL = ["groupmixformer_m", "groupmixformer_t", "groupmixformer_s", "groupmixformer_b",
            "groupmixformer_l"]


# ==============================================================================================
# 1. GMA from the equations
# ==============================================================================================
#
# Each reference is a loop over window offsets, tokens or channels in float64 that shares no code
# with gmf.py: padding is built by hand, softmax, LayerNorm, BatchNorm, Hardswish and GELU are
# written out. The module's weights are copied in as plain tensors. The vectorised code must
# agree with them to float64 rounding (atol 1e-10 on activations of order one).

ATOL = 1e-10  # float64: ~1e-16 relative per operation, a few hundred operations per output


def hardswish(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def batch_norm(x, bn, eps=1e-5):
    """BatchNorm2d in eval mode on (..., C, H, W), from its running statistics."""
    shape = (-1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def layer_norm(x, ln, eps):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * gamma + beta."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * ln.weight + ln.bias


def linear(x, layer):
    out = x @ layer.weight.T
    return out + layer.bias if layer.bias is not None else out


def naive_depthwise_conv(x, weight, bias, padding_mode, k):
    """Depthwise k x k conv on (..., C, H, W), one loop per window offset and output position.

    out[c, i, j] = bias[c] + sum_{dy, dx} w[c, dy, dx] * x[c, i + dy - k//2, j + dx - k//2],
    where positions outside the grid read 0 ("zeros") or wrap around ("circular").
    """
    *_, C, H, W = x.shape
    assert weight.shape[-2:] == (k, k), f"expected a {k}x{k} kernel, the module has {tuple(weight.shape[-2:])}"
    r = k // 2
    out = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            for dy in range(k):
                for dx in range(k):
                    y, z = i + dy - r, j + dx - r
                    if padding_mode == "circular":
                        y, z = y % H, z % W
                    elif not (0 <= y < H and 0 <= z < W):
                        continue
                    out[..., :, i, j] += weight[:, 0, dy, dx] * x[..., :, y, z]
    if bias is not None:
        out += bias.view(-1, 1, 1)
    return out


def naive_pointwise_conv(x, weight):
    """1 x 1 conv on (..., C_in, H, W): out[o] = sum_c w[o, c] * x[c]."""
    w = weight[:, :, 0, 0]
    out = torch.zeros(*x.shape[:-3], w.shape[0], *x.shape[-2:], dtype=x.dtype)
    for o in range(w.shape[0]):
        for c in range(w.shape[1]):
            out[..., o, :, :] += w[o, c] * x[..., c, :, :]
    return out


def naive_group_aggregation(x, aggregator, k, padding_mode):
    """Group proxies of one segment (..., s, H, W): k x k window sums, 1x1 mix, BN, Hardswish."""
    if k > 1:
        x = naive_depthwise_conv(x, aggregator.depthwise.weight, None, padding_mode, k)
        x = naive_pointwise_conv(x, aggregator.pointwise.weight)
    return hardswish(batch_norm(x, aggregator.norm))


def softmax(x, dim):
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def naive_factorized_attention(q, k, v, scale):
    """out[n, j] = scale * sum_c q[n, c] * sum_m softmax_over_m(k[m, c]) * v[m, j], per head."""
    B, h, N, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for head in range(h):
            for c in range(d):
                weights = softmax(k[b, head, :, c], dim=0)  # over the N tokens, per key channel
                for j in range(d):
                    context = sum(weights[m] * v[b, head, m, j] for m in range(N))
                    out[b, head, :, j] += scale * q[b, head, :, c] * context
    return out


def naive_softmax_attention(q, k, v, scale):
    """out[n] = sum_m softmax_over_m(scale * q[n] . k[m]) * v[m], entry by entry of the N x N map."""
    B, h, N, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for head in range(h):
            for n in range(N):
                scores = torch.stack([scale * torch.dot(q[b, head, n], k[b, head, m]) for m in range(N)])
                weights = softmax(scores, dim=0)
                out[b, head, n] = sum(weights[m] * v[b, head, m] for m in range(N))
    return out


def naive_crpe(q, v, size, crpe, windows, padding_mode):
    """q * DWConv(v), head by head, each head with the kernel its window group assigns it."""
    B, h, N, d = q.shape
    H, W = size
    head_kernels = [(kernel_index, i) for kernel_index, (_, heads) in enumerate(windows) for i in range(heads)]
    out = torch.zeros_like(q)
    for head, (group, index_in_group) in enumerate(head_kernels):
        conv = crpe.convs[group]
        channels = slice(index_in_group * d, (index_in_group + 1) * d)
        v_map = v[:, head].transpose(1, 2).reshape(B, d, H, W)  # token n = (n // W, n % W)
        conv_v = naive_depthwise_conv(v_map, conv.weight[channels], conv.bias[channels], padding_mode,
                                      windows[group][0])
        out[:, head] = q[:, head] * conv_v.reshape(B, d, N).transpose(1, 2)
    return out


def naive_non_attention_branch(q4, k4, v4, branch, padding_mode):
    """Per sample: [Q4 | K4 | V4] -> depthwise 3x3 -> 1x1 -> LayerNorm over channels -> Hardswish."""
    x = torch.cat([q4, k4, v4], dim=1)  # (B, 3s, H, W)
    x = naive_depthwise_conv(x, branch.depthwise.weight, None, padding_mode, 3)
    x = naive_pointwise_conv(x, branch.pointwise.weight)
    B, s, H, W = x.shape
    tokens = x.reshape(B, s, H * W).transpose(1, 2)
    return hardswish(layer_norm(tokens, branch.norm, eps=1e-5))  # (B, N, s); the blocks use 1e-6


def naive_gma(x, size, gma, cfg):
    """A whole GMA layer (eval mode) assembled from the naive parts, segment by segment."""
    B, N, C = x.shape
    H, W = size
    s = C // (len(cfg.group_sizes) + (1 if cfg.use_non_attention_branch else 0))
    h = cfg.num_heads
    d = s * len(cfg.group_sizes) // h
    qkv = linear(x, gma.qkv)
    maps = [qkv[..., i * C:(i + 1) * C].transpose(1, 2).reshape(B, C, H, W) for i in range(3)]
    proxies = []  # per Q, K, V: the tokens and group proxies of the n attention segments
    for m in maps:
        parts = [naive_group_aggregation(m[:, i * s:(i + 1) * s], gma.aggregators[i], k, cfg.padding_mode)
                 for i, k in enumerate(cfg.group_sizes)]
        proxies.append(torch.cat(parts, dim=1).reshape(B, h, d, N).transpose(2, 3))  # (B, h, N, d)
    q, k, v = proxies
    if cfg.attention == "factorized":
        out = naive_factorized_attention(q, k, v, (C // h) ** -0.5)
    else:
        out = naive_softmax_attention(q, k, v, d ** -0.5)
    if cfg.use_crpe:
        out = out + naive_crpe(q, v, size, gma.crpe, cfg.crpe_windows, cfg.padding_mode)
    out = out.transpose(1, 2).reshape(B, N, h * d)
    if not cfg.use_non_attention_branch:  # the ablation: every segment attends
        return linear(out, gma.proj)
    last = slice(len(cfg.group_sizes) * s, C)
    local = naive_non_attention_branch(*(m[:, last] for m in maps), gma.non_attention_branch, cfg.padding_mode)
    return linear(torch.cat([out, local], dim=-1), gma.proj)


def naive_block(x, size, block, cfg):
    """A GMA block (eval mode): x + DWConv(x), then x + GMA(LN(x)), then x + MLP(LN(x))."""
    B, N, C = x.shape
    H, W = size
    x_map = x.transpose(1, 2).reshape(B, C, H, W)
    conv = block.conv_pos_enc
    x = x + naive_depthwise_conv(x_map, conv.weight, conv.bias, cfg.padding_mode, 3).reshape(B, C, N).transpose(1, 2)
    x = x + naive_gma(layer_norm(x, block.norm1, eps=1e-6), size, block.attn, cfg)
    return x + linear(gelu(linear(layer_norm(x, block.norm2, eps=1e-6), block.mlp.fc1)), block.mlp.fc2)


# ----------------------------------------------------------------------------------------------
# Strategies: valid shapes by construction, tensors filled from a seeded torch.Generator
# ----------------------------------------------------------------------------------------------

def one_stage_config(dim, **overrides):
    """A config of one stride-1 stage of width dim with one block and MLP ratio 1."""
    fields = dict(dims=(dim,), depths=(1,), mlp_ratios=(1,), stage_strides=(1,))
    return gmf.GroupMixFormerConfig(**{**fields, **overrides})


@st.composite
def gma_configs(draw, attention=None, padding_mode=None, ablations=False):
    """A GMA config that builds: segment and head widths are multiplied up, never divided down.
    With ablations=True the two ablation switches are drawn too (else both stay on)."""
    group_sizes = draw(st.sampled_from([(1, 3, 5, 7), (1, 3), (3, 1, 5), (5,)]))
    heads_per_segment = draw(st.integers(1, 2))
    head_dim = draw(st.integers(1, 3))
    num_heads = heads_per_segment * len(group_sizes)
    segment = heads_per_segment * head_dim
    use_crpe, use_branch = (draw(st.booleans()), draw(st.booleans())) if ablations else (True, True)
    dim = segment * (len(group_sizes) + (1 if use_branch else 0))
    kernels = draw(st.lists(st.sampled_from([1, 3, 5, 7]), min_size=1, max_size=min(3, num_heads)))
    cuts = sorted(draw(st.lists(st.integers(1, num_heads - 1), min_size=len(kernels) - 1,
                                max_size=len(kernels) - 1, unique=True))) if len(kernels) > 1 else []
    heads = [b - a for a, b in zip([0] + cuts, cuts + [num_heads])]
    return one_stage_config(
        dim, mlp_ratios=(draw(st.sampled_from([1, 2])),), num_heads=num_heads, group_sizes=group_sizes,
        crpe_windows=tuple(zip(kernels, heads)), use_crpe=use_crpe, use_non_attention_branch=use_branch,
        attention=attention or draw(st.sampled_from(gmf.ATTENTION_CORES)),
        padding_mode=padding_mode or draw(st.sampled_from(gmf.PADDING_MODES)), drop_path_rate=0.0)


def grid_strategy(cfg, max_side=5):
    """Grid sides (non-square included); circular padding needs sides >= the largest padding."""
    smallest = 3 if cfg.padding_mode == "circular" else 1
    return st.tuples(st.integers(smallest, max_side), st.integers(smallest, max_side))


def randomize_(module, seed):
    """Fill every parameter and BatchNorm statistic from a seeded generator (not the defaults)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or tensor.ndim == 1 and "norm" in name:
                tensor.copy_(1 + 0.2 * noise)
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(noise / math.sqrt(fan_in) if tensor.ndim > 1 else 0.2 * noise)
    return module


def tiny_model(**overrides):
    """A two-stage network (widths 20, 40; total stride 4) small enough for many examples."""
    cfg = dict(dims=(20, 40), depths=(1, 1), mlp_ratios=(2, 2), stem_strides=(2, 1),
               stage_strides=(1, 2), num_classes=5, img_size=16)
    return gmf.GroupMixFormer(gmf.GroupMixFormerConfig(**{**cfg, **overrides}))


def random_tensor(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gma_layer(cfg, seed):
    """A GMA layer of cfg's first stage in float64 eval mode, every weight drawn from the seed."""
    return randomize_(gmf.GroupMixAttention(cfg.dims[0], cfg), seed).double().eval()


def gma_block(cfg, seed):
    """A GMA block (no drop path) of cfg's first stage in float64 eval mode, weights from the seed."""
    return randomize_(gmf.GMABlock(cfg.dims[0], cfg.mlp_ratios[0], 0.0, cfg), seed).double().eval()


seeds = st.integers(0, 2**32 - 1)


@st.composite
def gma_cases(draw, block=False, attention=None, padding_mode=None, max_side=5, ablations=False):
    """(cfg, (H, W), module, seed): a drawn config and grid, and the GMA layer (or block) built
    from them with weights from the drawn seed; tests fill their inputs from seed, seed + 1, ..."""
    cfg = draw(gma_configs(attention=attention, padding_mode=padding_mode, ablations=ablations))
    size = draw(grid_strategy(cfg, max_side))
    seed = draw(seeds)
    return cfg, size, (gma_block if block else gma_layer)(cfg, seed), seed


# ----------------------------------------------------------------------------------------------
# Hand-worked examples first
# ----------------------------------------------------------------------------------------------

def test_hand_worked_3x3_group_proxy_counts_neighbours():
    """With all-ones 3x3 weights and zero padding, each proxy counts its window's tokens: 4/6/9."""
    aggregator = gmf.GroupAggregator(1, 3, "zeros").double().eval()
    with torch.no_grad():
        aggregator.depthwise.weight.fill_(1.0)
        aggregator.pointwise.weight.fill_(1.0)
    ones = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    window_sums = aggregator.pointwise(aggregator.depthwise(ones))
    assert window_sums[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


def test_hand_worked_factorized_attention_on_two_tokens():
    """Two tokens, one channel: softmax over tokens of k=[0, ln 3] is [1/4, 3/4], context = 1/4*v0 + 3/4*v1."""
    q = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 2, 1)
    k = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).view(1, 1, 2, 1)
    v = torch.tensor([4.0, 8.0], dtype=torch.float64).view(1, 1, 2, 1)
    out = gmf.factorized_attention(q, k, v, scale=0.5)
    context = 0.25 * 4 + 0.75 * 8  # = 7
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5 * 1 * context, 0.5 * 2 * context], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Why attention over proxies relates groups: a proxy logit is a window sum of token terms
# ----------------------------------------------------------------------------------------------
#
# Without BatchNorm and Hardswish an aggregator is linear: proxy_p = sum_o P D_o x_(p+o), with D_o
# the diagonal of depthwise weights at window offset o and P the 1 x 1 mix. So a proxy logit is
#     qhat_p . khat_p' = sum over offsets o, o' of q_(p+o)^T (D_o P^T P D_o') k_(p'+o'),
# every token of p's window against every token of p''s window. With one kernel a for all
# channels, D_o = a_o I and the whole matrix is Qhat Khat^T = A (Q G K^T) A^T, G = P^T P.

def linear_part(aggregator, x):
    """The aggregator's own forward with BatchNorm and Hardswish taken out: the separable conv
    (nothing for k = 1)."""
    linear = copy.deepcopy(aggregator)
    linear.norm, linear.act = torch.nn.Identity(), torch.nn.Identity()
    return linear(x)


def logits(q_map, k_map):
    """q_p . k_p' for every pair of grid positions of one map each (s, H, W): an (N, N) matrix."""
    return q_map.flatten(1).T @ k_map.flatten(1)


def window_offsets(k):
    return [(dy, dx) for dy in range(-(k // 2), k // 2 + 1) for dx in range(-(k // 2), k // 2 + 1)]


def naive_proxy_logits(q_map, k_map, aggregator, k):
    """Every entry of Qhat Khat^T as the double window sum of bilinear token terms (zero padding)."""
    s, H, W = q_map.shape
    P = aggregator.pointwise.weight[:, :, 0, 0]
    D = {(dy, dx): torch.diag(aggregator.depthwise.weight[:, 0, dy + k // 2, dx + k // 2])
         for dy, dx in window_offsets(k)}
    token = q_map.flatten(1).T  # (N, s): row n is the token at (n // W, n % W)
    key = k_map.flatten(1).T
    # terms[o][o'][a][b] = q_a^T (D_o P^T P D_o') k_b for every token pair (a, b)
    terms = {(o, o2): (token @ D[o] @ P.T @ P @ D[o2] @ key.T).tolist() for o in D for o2 in D}
    out = torch.zeros(H * W, H * W, dtype=q_map.dtype)
    for p in range(H * W):
        for p2 in range(H * W):
            total = 0.0
            for (dy, dx) in D:
                y, x = p // W + dy, p % W + dx
                if not (0 <= y < H and 0 <= x < W):
                    continue  # zero padding: outside the grid there is no token
                for (dy2, dx2) in D:
                    y2, x2 = p2 // W + dy2, p2 % W + dx2
                    if 0 <= y2 < H and 0 <= x2 < W:
                        total += terms[(dy, dx), (dy2, dx2)][y * W + x][y2 * W + x2]
            out[p, p2] = total
    return out


def window_matrix(kernel, H, W, padding_mode):
    """A[p, p+o] = kernel at offset o: the N x N matrix of one k x k window sum over the grid."""
    k = kernel.shape[0]
    A = torch.zeros(H * W, H * W, dtype=kernel.dtype)
    for p in range(H * W):
        for dy, dx in window_offsets(k):
            y, x = p // W + dy, p % W + dx
            if padding_mode == "circular":
                y, x = y % H, x % W
            elif not (0 <= y < H and 0 <= x < W):
                continue
            A[p, y * W + x] += kernel[dy + k // 2, dx + k // 2]
    return A


def test_hand_worked_proxy_logit_relates_two_windows_of_tokens():
    """One row of 8 tokens, window 3, kernel of ones, P = 1: the logit of proxies 2 and 5 is the sum
    of q_a k_b over tokens a in {1, 2, 3} and b in {4, 5, 6}, nine token pairs (the paper's Fig. 1)."""
    aggregator = gmf.GroupAggregator(1, 3, "zeros").double()
    with torch.no_grad():
        aggregator.depthwise.weight.fill_(1.0)
        aggregator.pointwise.weight.fill_(1.0)
    q, k = random_tensor(0, 1, 1, 8), random_tensor(1, 1, 1, 8)  # (s=1, H=1, W=8)
    proxy_logits = logits(linear_part(aggregator, q[None])[0], linear_part(aggregator, k[None])[0])
    token_logits = logits(q, k)
    torch.testing.assert_close(proxy_logits[2, 5], token_logits[1:4, 4:7].sum(), rtol=0, atol=ATOL)
    torch.testing.assert_close(proxy_logits[0, 7], token_logits[0:2, 6:8].sum(), rtol=0, atol=ATOL)  # edges


@given(s=st.integers(1, 3), k=st.sampled_from([3, 5]), H=st.integers(1, 4), W=st.integers(1, 4), seed=seeds)
def test_proxy_logits_are_double_window_sums_of_token_terms(s, k, H, W, seed):
    """Without BN and Hardswish, qhat_p . khat_p' = sum_{o, o'} q_(p+o)^T D_o P^T P D_o' k_(p'+o')."""
    aggregator = randomize_(gmf.GroupAggregator(s, k, "zeros"), seed).double()
    q, k_map = random_tensor(seed + 1, 1, s, H, W), random_tensor(seed + 2, 1, s, H, W)
    proxy_logits = logits(linear_part(aggregator, q)[0], linear_part(aggregator, k_map)[0])
    torch.testing.assert_close(proxy_logits, naive_proxy_logits(q[0], k_map[0], aggregator, k), rtol=0, atol=1e-9)


@given(s=st.integers(1, 3), k=st.sampled_from([3, 5, 7]), H=st.integers(1, 6), W=st.integers(1, 6),
       padding_mode=st.sampled_from(gmf.PADDING_MODES), seed=seeds)
def test_with_one_kernel_for_all_channels_proxy_logits_are_a_qgkt_at(s, k, H, W, padding_mode, seed):
    """If every channel shares the depthwise kernel a, then Qhat Khat^T = A (Q G K^T) A^T, with A the
    N x N window matrix of a and G = P^T P: the token logits, summed over pairs of windows."""
    if padding_mode == "circular" and min(H, W) < k // 2:
        return  # circular padding needs the grid at least as large as the padding
    aggregator = randomize_(gmf.GroupAggregator(s, k, padding_mode), seed).double()
    kernel = random_tensor(seed + 3, k, k)
    with torch.no_grad():
        aggregator.depthwise.weight.copy_(kernel.expand(s, 1, k, k))
    q, k_map = random_tensor(seed + 1, 1, s, H, W), random_tensor(seed + 2, 1, s, H, W)
    proxy_logits = logits(linear_part(aggregator, q)[0], linear_part(aggregator, k_map)[0])
    A = window_matrix(kernel, H, W, padding_mode)
    P = aggregator.pointwise.weight[:, :, 0, 0]
    token_logits = q[0].flatten(1).T @ (P.T @ P) @ k_map[0].flatten(1)  # Q G K^T
    torch.testing.assert_close(proxy_logits, A @ token_logits @ A.T, rtol=0, atol=1e-9)


@given(k=st.sampled_from([1, 3, 5, 7]), seed=seeds)
def test_batchnorm_and_hardswish_are_what_break_the_window_sum_identity(k, seed):
    """BatchNorm's scale S alone keeps the identity, folded into the 1 x 1 mix (G = P^T S^2 P); its
    shift, or Hardswish, takes the proxy logits a sizeable way from it."""
    s, H, W = 3, 5, 5
    aggregator = randomize_(gmf.GroupAggregator(s, k, "zeros"), seed).double().eval()
    kernel = random_tensor(seed + 3, k, k)
    if k > 1:
        with torch.no_grad():
            aggregator.depthwise.weight.copy_(kernel.expand(s, 1, k, k))
    A = window_matrix(kernel, H, W, "zeros") if k > 1 else torch.eye(H * W, dtype=torch.float64)
    P = aggregator.pointwise.weight[:, :, 0, 0] if k > 1 else torch.eye(s, dtype=torch.float64)
    norm = aggregator.norm
    q, k_map = random_tensor(seed + 1, 1, s, H, W), random_tensor(seed + 2, 1, s, H, W)

    def relative_gap(module):
        S = torch.diag(norm.weight / torch.sqrt(norm.running_var + norm.eps))  # BN's scale, per channel
        predicted = A @ (q[0].flatten(1).T @ P.T @ S @ S @ P @ k_map[0].flatten(1)) @ A.T
        actual = logits(module(q)[0], module(k_map)[0])
        return ((actual - predicted).norm() / predicted.norm()).item()

    with torch.no_grad():  # no shift: BN multiplies each channel by its scale, nothing more
        norm.running_mean.zero_()
        norm.bias.zero_()
    aggregator.act = torch.nn.Identity()
    assert relative_gap(aggregator) < 1e-12  # BN's scale alone: the identity holds
    aggregator.act = torch.nn.Hardswish()
    assert relative_gap(aggregator) > 0.05  # Hardswish alone breaks it
    aggregator.act = torch.nn.Identity()
    with torch.no_grad():
        norm.bias.fill_(1.0)  # a shift of one per channel
    assert relative_gap(aggregator) > 0.05  # BN's shift alone breaks it


# ----------------------------------------------------------------------------------------------
# The vectorised components equal their loop references
# ----------------------------------------------------------------------------------------------

@given(gma_cases())
def test_group_aggregators_equal_the_window_loop(case):
    """Each aggregator computes BN(1x1(sum over its k x k window)) then Hardswish, for every k."""
    cfg, (H, W), gma, seed = case
    x = random_tensor(seed, 2, gma.segment_width, H, W)
    for aggregator, k in zip(gma.aggregators, cfg.group_sizes):
        torch.testing.assert_close(aggregator(x), naive_group_aggregation(x, aggregator, k, cfg.padding_mode),
                                   rtol=0, atol=ATOL)


@given(B=st.integers(1, 2), h=st.integers(1, 3), N=st.integers(1, 7), d=st.integers(1, 4), seed=seeds)
def test_factorized_attention_equals_the_sum_over_tokens(B, h, N, d, seed):
    """factorized_attention = scale * q (softmax_N(k)^T v), checked channel by channel."""
    q, k, v = (random_tensor(seed + i, B, h, N, d) for i in range(3))
    torch.testing.assert_close(gmf.factorized_attention(q, k, v, 0.3), naive_factorized_attention(q, k, v, 0.3),
                               rtol=0, atol=ATOL)


@given(B=st.integers(1, 2), h=st.integers(1, 3), N=st.integers(1, 7), d=st.integers(1, 4), seed=seeds)
def test_softmax_attention_equals_the_explicit_map(B, h, N, d, seed):
    """softmax_attention = softmax_over_keys(scale * q k^T) v, entry by entry of the N x N map."""
    q, k, v = (random_tensor(seed + i, B, h, N, d) for i in range(3))
    torch.testing.assert_close(gmf.softmax_attention(q, k, v, 0.7), naive_softmax_attention(q, k, v, 0.7),
                               rtol=0, atol=ATOL)


@given(gma_cases())
def test_conv_relative_position_encoding_equals_its_loop(case):
    """CRPE = q * DWConv(v), each head convolved with the kernel of its window group."""
    cfg, (H, W), gma, seed = case
    q, v = (random_tensor(seed + i, 2, cfg.num_heads, H * W, gma.head_dim) for i in range(2))
    torch.testing.assert_close(gma.crpe(q, v, (H, W)),
                               naive_crpe(q, v, (H, W), gma.crpe, cfg.crpe_windows, cfg.padding_mode),
                               rtol=0, atol=ATOL)


@given(gma_cases())
def test_non_attention_branch_equals_its_loop(case):
    """The non-attention branch is LN(1x1(DW3x3([Q4 | K4 | V4]))) then Hardswish, per token."""
    cfg, (H, W), gma, seed = case
    q4, k4, v4 = (random_tensor(seed + i, 2, gma.segment_width, H, W) for i in range(3))
    torch.testing.assert_close(gma.non_attention_branch(q4, k4, v4),
                               naive_non_attention_branch(q4, k4, v4, gma.non_attention_branch, cfg.padding_mode),
                               rtol=0, atol=ATOL)


@given(gma_cases(max_side=4, ablations=True))
def test_gma_layer_equals_its_reference(case):
    """A whole GMA layer equals the reference assembled from the loops, in both attention modes,
    with and without each ablation switch."""
    cfg, (H, W), gma, seed = case
    x = random_tensor(seed, 2, H * W, cfg.dims[0])
    torch.testing.assert_close(gma(x, (H, W)), naive_gma(x, (H, W), gma, cfg), rtol=0, atol=ATOL)


@given(gma_cases(block=True, max_side=4, ablations=True))
def test_gma_block_equals_its_reference(case):
    """A GMA block equals x + DWConv(x), + GMA(LN(x)), + MLP(LN(x)) built from the references."""
    cfg, (H, W), block, seed = case
    x = random_tensor(seed, 2, H * W, cfg.dims[0])
    torch.testing.assert_close(block(x, (H, W)), naive_block(x, (H, W), block, cfg), rtol=0, atol=ATOL)


def test_aggregators_pool_batch_statistics_over_q_k_and_v_in_training():
    """In train mode an aggregator's BatchNorm normalises Q, K and V maps with shared statistics."""
    gma = gma_layer(one_stage_config(20), 0).train()
    x = random_tensor(1, 3, 12, 20)
    captured = {}
    gma.aggregators[2].register_forward_hook(lambda m, inputs, output: captured.update(x=inputs[0], y=output))
    gma(x, (3, 4))
    maps = captured["x"]  # (3B, s, H, W): Q, K, V stacked on the batch axis
    assert maps.shape[0] == 3 * x.shape[0]
    agg = gma.aggregators[2]
    z = agg.pointwise(agg.depthwise(maps))
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = hardswish((z - mean) / torch.sqrt(var + agg.norm.eps) * agg.norm.weight.view(1, -1, 1, 1)
                         + agg.norm.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(captured["y"], expected, rtol=0, atol=ATOL)


# ==============================================================================================
# 2. Symmetries
# ==============================================================================================

def assert_equivariant(f, transform_in, transform_out, x, name, atol=ATOL):
    """f(T x) == T' f(x); the failure message names the transform and the error."""
    error = (f(transform_in(x)) - transform_out(f(x))).abs().max().item()
    assert error <= atol, f"not equivariant under {name}: max error {error:.3g} > {atol:.1g}"


@given(data=st.data(), case=gma_cases(block=True, padding_mode="circular", max_side=6))
def test_circular_gma_block_commutes_with_cyclic_shifts(data, case):
    """With circular padding every op of a stride-1 block is a convolution on a torus, a per-token
    map or attention (which commutes with any reordering of the tokens, a cyclic shift included),
    so shifting the token grid cyclically shifts the output the same way."""
    cfg, (H, W), block, seed = case
    dy, dx = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    C = cfg.dims[0]

    def shift(tokens):
        return tokens.reshape(-1, H, W, C).roll((dy, dx), dims=(1, 2)).reshape(-1, H * W, C)

    x = random_tensor(seed, 2, H * W, C)
    assert_equivariant(lambda t: block(t, (H, W)), shift, shift, x, f"cyclic shift by ({dy}, {dx})")


@given(multiple=st.tuples(st.integers(0, 3), st.integers(0, 3)), seed=seeds)
def test_circular_network_logits_are_invariant_to_shifts_by_its_total_stride(multiple, seed):
    """A shift by a multiple of the total stride moves every stage's grid by whole cells, and the
    final average pool forgets where things are, so the logits do not change."""
    model = randomize_(tiny_model(padding_mode="circular"), seed).double().eval()
    stride = math.prod(model.cfg.stem_strides) * math.prod(model.cfg.stage_strides)  # 4
    x = random_tensor(seed, 2, 3, 12, 16)
    shift = (multiple[0] * stride, multiple[1] * stride)
    assert_equivariant(model, lambda t: t.roll(shift, dims=(2, 3)), lambda y: y, x,
                       f"image shift by {shift}", atol=1e-9)


def test_circular_network_logits_do_change_for_shifts_below_its_stride():
    """A one-pixel shift is not a multiple of the stride: the logits change (the test can fail)."""
    model = randomize_(tiny_model(padding_mode="circular"), 0).double().eval()
    x = random_tensor(0, 2, 3, 12, 16)
    assert not torch.allclose(model(x), model(x.roll(1, dims=3)), atol=1e-6)


@given(attention=st.sampled_from(gmf.ATTENTION_CORES), N=st.integers(2, 9), d=st.integers(1, 4),
       seed=seeds)
def test_attention_cores_are_equivariant_to_token_permutations(attention, N, d, seed):
    """Both cores treat tokens as a set: permuting the tokens of q, k, v permutes the output."""
    core = gmf.factorized_attention if attention == "factorized" else gmf.softmax_attention
    q, k, v = (random_tensor(seed + i, 2, 3, N, d) for i in range(3))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    out = core(q, k, v, 0.5)
    permuted = core(q[:, :, perm], k[:, :, perm], v[:, :, perm], 0.5)
    torch.testing.assert_close(permuted, out[:, :, perm], rtol=0, atol=ATOL)


@given(group_size=st.sampled_from([3, 5, 7]), seed=seeds)
def test_group_proxies_break_permutation_equivariance(group_size, seed):
    """A k x k proxy depends on which tokens are neighbours, so a token permutation is not
    commuted through it (while the window-1 aggregator, a per-token map, commutes with it)."""
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor(seed, 1, 2, 4, 4)
    perm = torch.randperm(16, generator=generator)
    while torch.equal(perm, torch.arange(16)):
        perm = torch.randperm(16, generator=generator)

    def permute(m):
        return m.flatten(2)[:, :, perm].reshape(m.shape)

    token = randomize_(gmf.GroupAggregator(2, 1, "zeros"), seed).double().eval()
    assert_equivariant(token, permute, permute, x, "token permutation (window 1)")
    proxy = randomize_(gmf.GroupAggregator(2, group_size, "zeros"), seed).double().eval()
    error = (proxy(permute(x)) - permute(proxy(x))).abs().max().item()
    assert error > 1e-6, f"{group_size}x{group_size} proxies commuted with a token permutation"


@given(mode=st.sampled_from(["eval", "train"]), seed=seeds)
def test_permuting_the_batch_permutes_the_outputs(mode, seed):
    """Nothing in the network depends on a sample's position in the batch, in eval or train mode
    (BatchNorm's batch statistics are symmetric in the samples)."""
    model = randomize_(tiny_model(drop_path_rate=0.0), seed).double().train(mode == "train")
    x = random_tensor(seed, 4, 3, 12, 12)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
    assert_equivariant(model, lambda t: t[perm], lambda y: y[perm], x, "batch permutation", atol=1e-9)


def test_samples_are_independent_in_eval_but_coupled_by_batchnorm_in_train():
    """Changing one sample leaves the others' logits alone in eval mode; in train mode BatchNorm's
    batch statistics (pooled over Q, K, V in GMA too) carry the change to every sample."""
    model = randomize_(tiny_model(drop_path_rate=0.0), 0).double()
    x = random_tensor(0, 3, 3, 12, 12)
    changed = x.clone()
    changed[2] += 1.0
    model.eval()
    torch.testing.assert_close(model(changed)[:2], model(x)[:2], rtol=0, atol=ATOL)
    model.train()
    assert not torch.allclose(model(changed)[:2], model(x)[:2], atol=1e-6)


def test_symmetric_kernels_make_the_network_equivariant_to_horizontal_flips():
    """With every conv kernel left-right symmetric, flipping the image flips every feature map
    (attention is permutation-equivariant, convs commute with the flip), so logits are unchanged.
    Widths 2^k + 1 keep stride-2 sampling symmetric about the centre column."""
    model = randomize_(tiny_model(), 0).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    x = random_tensor(0, 2, 3, 12, 17)  # widths 17 -> 9 -> 9 -> 5
    flip = lambda t: t.flip(-1)  # noqa: E731
    assert_equivariant(model.forward_features, flip, flip, x, "horizontal flip", atol=1e-9)
    assert_equivariant(model, flip, lambda y: y, x, "horizontal flip (logits)", atol=1e-9)


@given(N=st.integers(1, 9), d=st.integers(1, 4), seed=seeds)
def test_factorized_attention_ignores_a_constant_added_to_every_key(N, d, seed):
    """softmax over tokens is unchanged by adding the same constant to all tokens of a key channel."""
    q, k, v = (random_tensor(seed + i, 2, 3, N, d) for i in range(3))
    shift = random_tensor(seed + 3, 2, 3, 1, d) * 10  # one constant per sample, head and channel
    torch.testing.assert_close(gmf.factorized_attention(q, k + shift, v, 0.5),
                               gmf.factorized_attention(q, k, v, 0.5), rtol=0, atol=1e-9)


@given(N=st.integers(1, 9), d=st.integers(1, 4), seed=seeds)
def test_factorized_attention_is_an_unnormalised_n_by_n_map(N, d, seed):
    """scale * q (softmax_N(k)^T v) == (scale * q softmax_N(k)^T) v: the factorized core applies the
    N x N map A = scale * q softmax_N(k)^T, whose rows need not sum to one, unlike the softmax
    core's A = softmax_keys(scale * q k^T), whose rows do."""
    q, k, v = (random_tensor(seed + i, 2, 3, N, d) for i in range(3))
    factorized_map = 0.5 * q @ k.softmax(dim=-2).transpose(-2, -1)  # (B, h, N, N)
    torch.testing.assert_close(gmf.factorized_attention(q, k, v, 0.5), factorized_map @ v, rtol=0, atol=ATOL)
    softmax_map = (0.5 * q @ k.transpose(-2, -1)).softmax(dim=-1)
    torch.testing.assert_close(gmf.softmax_attention(q, k, v, 0.5), softmax_map @ v, rtol=0, atol=ATOL)
    torch.testing.assert_close(softmax_map.sum(-1), torch.ones(2, 3, N, dtype=torch.float64))


@given(N=st.integers(2, 12), d=st.integers(1, 4), seed=seeds)
def test_the_factorized_map_has_rank_at_most_d_and_pools_v_globally(N, d, seed):
    """The implicit map scale * q softmax_N(k)^T is (N x d)(d x N): rank <= d however large N is.
    Row c of the context softmax_N(k)^T v is v pooled over all N positions with the weights
    softmax_N(k[:, c]), the same pooling for every query."""
    q, k, v = (random_tensor(seed + i, 1, 1, N, d) for i in range(3))
    # The core applied to the N one-hot value vectors returns its own N x N map.
    factorized_map = gmf.factorized_attention(q, k, torch.eye(N, dtype=torch.float64)[None, None], 0.5)[0, 0]
    assert torch.linalg.matrix_rank(factorized_map).item() <= min(d, N)
    pooled = torch.stack([sum(softmax(k[0, 0, :, c], dim=0)[n] * v[0, 0, n] for n in range(N)) for c in range(d)])
    torch.testing.assert_close(gmf.factorized_attention(q, k, v, 0.5)[0, 0], 0.5 * q[0, 0] @ pooled,
                               rtol=0, atol=ATOL)  # each output: its query's mix of the d pooled vectors


@given(gma_cases(max_side=4))
def test_crpe_is_windowed_relative_attention_with_one_embedding_per_channel(case):
    """CoaT's derivation, entry by entry: out[p, c] = sum over p' of E_c[p, p'] v[p', c] + q[p, c] b[c],
    with the relative map E_c[p, p'] = q[p, c] r[p' - p, c] for offsets inside the head's window
    (r: the depthwise kernel, b: its bias). No conv is called: the N x N maps are built."""
    cfg, (H, W), gma, seed = case
    N, h, d = H * W, cfg.num_heads, gma.head_dim
    q, v = (random_tensor(seed + i, 1, h, N, d) for i in range(2))
    head_kernels = [group for group, (_, heads) in enumerate(cfg.crpe_windows) for _ in range(heads)]
    expected = torch.zeros_like(q)
    for head, group in enumerate(head_kernels):
        conv, k = gma.crpe.convs[group], cfg.crpe_windows[group][0]
        first = (head - head_kernels.index(group)) * d  # the head's channels within its group's conv
        for c in range(d):
            r, b = conv.weight[first + c, 0], conv.bias[first + c]  # (k, k), scalar
            E = torch.zeros(N, N, dtype=torch.float64)
            for p in range(N):
                for dy, dx in window_offsets(k):
                    y, x = p // W + dy, p % W + dx
                    if cfg.padding_mode == "circular":
                        y, x = y % H, x % W
                    elif not (0 <= y < H and 0 <= x < W):
                        continue
                    E[p, y * W + x] += q[0, head, p, c] * r[dy + k // 2, dx + k // 2]
            expected[0, head, :, c] = E @ v[0, head, :, c] + q[0, head, :, c] * b
    torch.testing.assert_close(gma.crpe(q, v, (H, W)), expected, rtol=0, atol=ATOL)


@given(case=gma_cases(attention="factorized"), new_scale=st.floats(0.05, 2.0))
def test_the_factorized_scale_is_a_change_of_parametrisation(case, new_scale):
    """The scale multiplies only the attention term. A layer with any other scale computes the same
    function once its CRPE kernels and biases are multiplied by new/old and the output projection's
    columns of the attention heads by old/new: the scale quirk limits nothing the layer can express."""
    cfg, (H, W), gma, seed = case
    x = random_tensor(seed, 2, H * W, cfg.dims[0])
    old_scale = gma.scale
    other = gma_layer(cfg, seed)
    other.scale = new_scale
    ratio = new_scale / old_scale
    attention_channels = cfg.num_heads * gma.head_dim
    with torch.no_grad():
        for conv in other.crpe.convs:
            conv.weight.mul_(ratio)
            conv.bias.mul_(ratio)
        other.proj.weight[:, :attention_channels].div_(ratio)
    torch.testing.assert_close(other(x, (H, W)), gma(x, (H, W)), rtol=0, atol=1e-9)
    if abs(ratio - 1) > 1e-3:  # the scale alone does change the layer
        other.scale = old_scale
        assert not torch.allclose(other(x, (H, W)), gma(x, (H, W)), rtol=0, atol=1e-9)


# ==============================================================================================
# 3. Gradients and numerics
# ==============================================================================================

@pytest.mark.parametrize("attention", gmf.ATTENTION_CORES)
def test_gradcheck_of_a_tiny_gma_layer(attention):
    """The analytic gradients of a GMA layer match finite differences (float64 gradcheck)."""
    cfg = one_stage_config(10, num_heads=4, crpe_windows=((3, 1), (5, 3)), attention=attention)
    gma = gma_layer(cfg, 0)
    x = random_tensor(0, 1, 6, 10).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: gma(t, (2, 3)), (x,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("attention", gmf.ATTENTION_CORES)
def test_every_parameter_receives_a_gradient(attention):
    """Every parameter influences the loss: none is dead weight."""
    model = tiny_model(attention=attention, drop_path_rate=0.0).train()
    model(torch.randn(2, 3, 16, 16)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@given(attention=st.sampled_from(gmf.ATTENTION_CORES), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       mode=st.sampled_from(["eval", "train"]), seed=seeds)
def test_outputs_are_finite(attention, scale, mode, seed):
    """Small, ordinary and large inputs give finite logits (LayerNorm before Q, K and V keeps the
    softmaxes' inputs moderate here; the next test pushes them past exp's range)."""
    model = tiny_model(attention=attention).train(mode == "train")
    x = scale * torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("core", [gmf.factorized_attention, gmf.softmax_attention])
@given(seed=seeds)
def test_both_cores_compute_their_softmax_stably(core, seed):
    """Adding one vector c to every key changes neither core (over tokens, each key channel moves
    by a constant; over keys, each row's logits move by scale q.c), even with c in the thousands,
    where exp() overflows float64: each softmax subtracts its maximum first."""
    q, k, v = (random_tensor(seed + i, 2, 3, 6, 4) for i in range(3))
    c = 1000 * random_tensor(seed + 3, 2, 3, 1, 4)
    torch.testing.assert_close(core(q, k + c, v, 0.5), core(q, k, v, 0.5), rtol=0, atol=1e-9)


def test_drop_path_drops_whole_samples_and_rescales_the_survivors():
    """In training, DropPath zeroes a sample's whole branch with probability p and scales the kept
    ones by 1/(1-p), so the expected output is the input; in eval it is the identity."""
    drop = gmf.DropPath(0.25).train()  # not 0.5, where p and 1 - p would be the same number
    torch.manual_seed(0)
    out = drop(torch.ones(4096, 3, 5))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 4 / 3).all(1)).all()  # all or nothing, kept x 4/3
    kept = (per_sample[:, 0] > 0).double().mean().item()
    assert abs(kept - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4096)  # within four standard errors
    assert torch.equal(drop.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_one_drop_path_serves_both_residual_branches_of_a_block():
    """With the branches dropped, a training block is x + DWConv(x): the drop applies to GMA and MLP."""
    cfg = one_stage_config(10, num_heads=4, crpe_windows=((3, 1), (5, 3)))
    block = gmf.GMABlock(10, 1, 0.5, cfg).double().train()
    block.drop_path.forward = lambda branch: torch.zeros_like(branch)  # every sample dropped
    x = random_tensor(0, 2, 6, 10)
    x_map = x.transpose(1, 2).reshape(2, 10, 2, 3)
    expected = x + block.conv_pos_enc(x_map).reshape(2, 10, 6).transpose(1, 2)
    torch.testing.assert_close(block(x, (2, 3)), expected, rtol=0, atol=ATOL)


def test_initialisation_follows_the_official_code():
    """Linear weights: truncated normal, std 0.02, within +-2 (official init); biases zero; norms 1/0;
    BatchNorm momentum 0.1 and convolutions as PyTorch makes them (as officially, where only linear
    layers and LayerNorms are initialised). A reset classifier is initialised alike."""
    torch.manual_seed(0)
    model = gmf.create_model("groupmixformer_m")
    model.reset_classifier(7)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None or torch.all(module.bias == 0), name
            if module.weight.numel() >= 1000:
                assert 0.016 < module.weight.std().item() < 0.024, name
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.momentum == 0.1 and module.eps == 1e-5, name
        if isinstance(module, torch.nn.Conv2d):  # PyTorch's default: uniform within 1/sqrt(fan_in)
            fan_in = module.weight[0].numel()
            assert module.weight.abs().max().item() <= fan_in ** -0.5, name
            if module.weight.numel() >= 1000:  # a uniform distribution's std is its bound / sqrt(3)
                assert 0.9 < module.weight.std().item() * math.sqrt(3 * fan_in) < 1.1, name
            assert module.bias is None or module.bias.abs().max().item() > 0, name
    assert model.head.weight.shape == (7, 160) and 0.016 < model.head.weight.std().item() < 0.024


def test_qkv_bias_can_be_switched_off():
    """qkv_bias=False removes the Q/K/V bias: 3C parameters fewer per block."""
    with_bias = gmf.create_model("groupmixformer_cifar")
    without = gmf.create_model("groupmixformer_cifar", qkv_bias=False)
    assert without.stages[0].blocks[0].attn.qkv.bias is None
    per_block = sum(3 * c * d for c, d in zip(with_bias.cfg.dims, with_bias.cfg.depths))
    assert sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in without.parameters()) == per_block


def test_same_seed_same_output():
    """Two models built under the same seed are identical and compute identical outputs."""
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny_model().eval()
        outputs.append(model(torch.ones(1, 3, 16, 16)))
    assert torch.equal(outputs[0], outputs[1])


# ==============================================================================================
# 4. API and shapes
# ==============================================================================================

def conv_output_side(n, stride, kernel=3, padding=1):
    """Side of a convolution's output: floor((n + 2 * padding - kernel) / stride) + 1."""
    return (n + 2 * padding - kernel) // stride + 1


def expected_stage_grids(image_size, cfg):
    """Each stage's (H, W): the image through the stem's two 3x3 convs, then through each stage's
    3x3 patch-embedding conv, all with padding 1 and their configured strides."""
    h, w = image_size
    grids = []
    for stride in cfg.stem_strides + cfg.stage_strides:
        h, w = conv_output_side(h, stride), conv_output_side(w, stride)
        grids.append((h, w))
    return grids[len(cfg.stem_strides):]


def test_official_variant_stage_shapes_on_a_non_square_image():
    """M on a 96 x 160 image: stages at /4, /8, /16, /32 with widths 40, 80, 160, 160."""
    model = gmf.create_model("groupmixformer_m").eval()
    maps = model.forward_stages(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 24, 40), (1, 80, 12, 20), (1, 160, 6, 10), (1, 160, 3, 5)]
    # The convolution formula the drawn test below relies on gives these grids too.
    assert expected_stage_grids((96, 160), model.cfg) == [(24, 40), (12, 20), (6, 10), (3, 5)]


@given(data=st.data(), stages=st.integers(1, 3), seed=seeds)
def test_any_input_size_runs_and_grids_follow_the_convolutions(data, stages, seed):
    """Any config and any input size, square or not, runs: stage i has width dims[i] and the grid
    its stride-s convolutions produce, which grid_sizes() reports too."""
    width = data.draw(st.sampled_from([10, 20, 30]))
    dims = tuple(width * data.draw(st.integers(1, 2)) for _ in range(stages))
    strides = tuple(data.draw(st.integers(1, 2)) for _ in range(stages))
    stem = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    model = gmf.GroupMixFormer(dims=dims, depths=(1,) * stages, mlp_ratios=(1,) * stages,
                               stage_strides=strides, stem_strides=stem, num_classes=3).eval()
    H, W = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    maps = model.forward_stages(random_tensor(seed, 1, 3, H, W).float())
    grids = expected_stage_grids((H, W), model.cfg)
    assert [tuple(m.shape) for m in maps] == [(1, dim, h, w) for dim, (h, w) in zip(dims, grids)]
    assert model.grid_sizes((H, W)) == grids


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
# Attention maps
# ----------------------------------------------------------------------------------------------

def core_inputs_and_outputs(model, x):
    """For every GMA layer, in forward order: its q, k, v and its core's output (eval mode)."""
    found = []

    def capture(attn, inputs):
        q, k, v, _ = attn.heads(*inputs)
        core = gmf.factorized_attention if attn.attention == "factorized" else gmf.softmax_attention
        found.append((q, k, v, core(q, k, v, attn.scale)))  # the cores, not attention_map

    hooks = [m.register_forward_pre_hook(capture) for m in model.modules() if isinstance(m, gmf.GroupMixAttention)]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return found


@pytest.mark.parametrize("attention", gmf.ATTENTION_CORES)
def test_attention_maps_applied_to_v_give_each_cores_output(attention):
    """One (B, h, N, N) map per block; map @ v is the core's output; softmax rows sum to one, and
    the factorized map, unnormalised, has rank <= d."""
    model = randomize_(tiny_model(attention=attention, depths=(2, 1)), 0).double()
    x = random_tensor(1, 2, 3, 16, 12)
    maps = gmf.attention_maps(model, x)
    found = core_inputs_and_outputs(model, x)
    assert len(found) == len(maps) == sum(model.cfg.depths)
    grids = [h * w for (h, w), depth in zip(model.grid_sizes((16, 12)), model.cfg.depths) for _ in range(depth)]
    assert [tuple(m.shape) for m in maps] == [(2, model.cfg.num_heads, n, n) for n in grids]
    for attention_map, (q, k, v, out) in zip(maps, found):
        torch.testing.assert_close(attention_map @ v, out, rtol=0, atol=1e-9)
        if attention == "softmax":
            torch.testing.assert_close(attention_map.sum(-1), torch.ones(attention_map.shape[:-1], dtype=torch.float64))
        else:
            assert not torch.allclose(attention_map.sum(-1), torch.ones(attention_map.shape[:-1], dtype=torch.float64))
            assert torch.linalg.matrix_rank(attention_map).max().item() <= q.shape[-1]


def test_attention_maps_leave_the_model_as_it_was():
    """Mode, BatchNorm statistics, hooks and outputs are untouched: the maps are computed in eval
    mode and the hooks removed, and a model in train or in eval mode is left in its mode."""
    model = randomize_(tiny_model(), 0).double().train()
    x = random_tensor(1, 2, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    gmf.attention_maps(model, x)
    assert model.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        again = model.eval()(x)
    torch.testing.assert_close(again, randomize_(tiny_model(), 0).double().eval()(x), rtol=0, atol=0)
    gmf.attention_maps(model, x)  # and a model in eval mode stays in eval mode
    assert not any(m.training for m in model.modules())


def test_attention_maps_too_large_for_memory_are_refused_before_anything_runs():
    """The maps' size is counted exactly, before the model runs: every block of every stage holds
    one (heads, N, N) map per image. Here two blocks on an 8 x 8 grid and one on 4 x 4, 8 heads,
    float32: 8 * 4 * (2 * 64**2 + 16**2) = 270,336 bytes."""
    model = tiny_model(depths=(2, 1))
    x = torch.randn(1, 3, 16, 16)
    assert model.grid_sizes((16, 16)) == [(8, 8), (4, 4)] and model.cfg.num_heads == 8
    gmf.attention_maps(model, x, max_bytes=270_336)
    model.stem.register_forward_pre_hook(lambda module, inputs: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match="max_bytes"):
        gmf.attention_maps(model, x, max_bytes=270_335)


# ----------------------------------------------------------------------------------------------
# Variants and create_model
# ----------------------------------------------------------------------------------------------

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
    """create_model's overrides set classes, input channels, drop path (its rate rising linearly
    from 0 at the first block to the rate given at the last), attention core, padding."""
    model = gmf.create_model("groupmixformer_cifar", num_classes=7, in_chans=1, drop_path_rate=0.3,
                             attention="softmax", padding_mode="circular").eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    rates = [block.drop_path.p for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 7).tolist())  # rising over all 7 blocks
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


def test_ablation_switches_are_on_by_default():
    """The official network has both parts; the fidelity tests below run with these defaults."""
    cfg = gmf.GroupMixFormerConfig()
    assert cfg.use_crpe is True and cfg.use_non_attention_branch is True


@pytest.mark.parametrize("switch, module", [("use_crpe", "crpe"),
                                            ("use_non_attention_branch", "non_attention_branch")])
def test_each_ablation_switch_removes_exactly_its_module(switch, module):
    """Switched off, a part's weights disappear from every GMA layer and nothing else does."""
    full = gmf.create_model("groupmixformer_cifar")
    ablated = gmf.create_model("groupmixformer_cifar", **{switch: False})
    names = lambda model: {name for name, _ in model.named_parameters()}  # noqa: E731
    gone = names(full) - names(ablated)
    assert gone and all(f".attn.{module}." in name for name in gone)
    assert names(ablated) <= names(full)
    layers = [m for m in ablated.modules() if isinstance(m, gmf.GroupMixAttention)]
    assert all(getattr(layer, module) is None for layer in layers)
    if switch == "use_crpe":  # nothing else changes shape: the count drops by the CRPE weights alone
        crpe = sum(p.numel() for name, p in full.named_parameters() if ".attn.crpe." in name)
        assert sum(p.numel() for p in ablated.parameters()) == sum(p.numel() for p in full.parameters()) - crpe
    else:  # the branch's channels join the attention segments: segments of C/4, heads cover C
        for layer, stage_width in zip(layers, [80] * 2 + [160] * 3 + [320] * 2):
            assert layer.segment_width == stage_width // 4
            assert layer.num_heads * layer.head_dim == stage_width


# ==============================================================================================
# 5. Fidelity to the official code
# ==============================================================================================

# The official checkpoint's layout, written out from the official code's module tree.

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
    # is to float64 rounding amplified by 22 to 58 blocks (M to L), far below any real difference.
    torch.testing.assert_close(logits[:, :4], torch.tensor(first, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits.sum(1), torch.tensor(sums, dtype=torch.float64), rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_official_logits_in_float32(mode):
    """In float32, the logits agree with the official float64 ones to float32 rounding."""
    logits = _logits("groupmixformer_m", mode, torch.float32)
    first, sums = OFFICIAL_LOGITS["groupmixformer_m"][mode]
    torch.testing.assert_close(logits[:, :4], torch.tensor(first, dtype=torch.float64), rtol=1e-4, atol=1e-4)


# The official GroupMixFormer-M checkpoint (models/groupmixformer.py at commit 3d3f409 with
# configs/groupmixformer_miny.yaml), module by module: each official module's weight shape, written
# from the stage widths C = 40, 80, 160, 160. Its bias, BatchNorm statistics and norm bias are
# (out,), out being the weight's first entry, and num_batches_tracked is a scalar; expanded over
# official_names() this gives the shape of each of the checkpoint's 1149 tensors. Where
# ../shared/docs holds the official code's own listing, a test checks that the two are identical.

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def official_m_module_shapes():
    """{official module name: its weight's shape} for GroupMixFormer-M."""
    shapes = {"conv_stem.proj1": (20, 3, 3, 3), "conv_stem.norm1": (20,),
              "conv_stem.proj2": (40, 20, 3, 3), "conv_stem.norm2": (40,),
              "norm4": (160,), "head": (1000, 160)}
    dims, depths = (40, 80, 160, 160), (3, 3, 12, 4)
    for i, (c_in, c) in enumerate(zip((40,) + dims[:-1], dims)):  # stage 0 embeds the stem's 40
        shapes |= {f"patch_embed_layers.{i}.proj.conv1": (c_in, 1, 3, 3),
                   f"patch_embed_layers.{i}.proj.pointwise_conv": (c, c_in, 1, 1),
                   f"patch_embed_layers.{i}.norm": (c,)}
        s, d = c // 5, c // 10  # s: one of 5 segments (4 attended, 1 not); d: a head, 2 per segment
        block = {"cpe.proj": (c, 1, 3, 3), "norm1": (c,), "att.qkv": (3 * c, c), "att.proj": (c, c),
                 "att.aggregator.norm0": (s,),  # window 1: the tokens themselves
                 "att.aggregator.agg0.conv.conv1": (3 * s, 1, 3, 3),  # non-attention branch on [Q4|K4|V4]
                 "att.aggregator.agg0.conv.pointwise_conv": (s, 3 * s, 1, 1), "att.aggregator.agg0.norm": (s,),
                 "att.crpe.conv_list.0": (2 * d, 1, 3, 3),  # heads 2, 3, 3 with kernels 3, 5, 7
                 "att.crpe.conv_list.1": (3 * d, 1, 5, 5), "att.crpe.conv_list.2": (3 * d, 1, 7, 7),
                 "norm2": (c,), "mlp.fc1": (4 * c, c), "mlp.fc2": (c, 4 * c)}
        for k, window in ((1, 3), (2, 5), (3, 7)):
            block |= {f"att.aggregator.agg{k}.conv1": (s, 1, window, window),
                      f"att.aggregator.agg{k}.pointwise_conv": (s, s, 1, 1), f"att.aggregator.norm{k}": (s,)}
        shapes |= {f"groupmixformer_backbone.{i}.gma_stage.{j}.{name}": shape
                   for j in range(depths[i]) for name, shape in block.items()}
    return shapes


def official_m_listing():
    """{name: shape} of every tensor of the official GroupMixFormer-M checkpoint, in its order."""
    modules = official_m_module_shapes()
    listing = {}
    for name in official_names((3, 3, 12, 4)):
        module, tensor = name.rsplit(".", 1)
        weight = modules[module]
        if tensor == "weight":
            listing[name] = weight
        elif tensor == "num_batches_tracked":
            listing[name] = ()
        else:  # bias, running_mean, running_var: one per output channel
            listing[name] = weight[:1]
    return listing


def test_every_official_weight_name_maps_with_its_shape():
    """Each name of the official M checkpoint maps onto a tensor of ours of the same shape."""
    listing = official_m_listing()
    parameters = [shape for name, shape in listing.items() if not name.endswith(BUFFERS)]
    # The official listing's totals: 1149 tensors, 864 of them parameters, 5,733,120 numbers.
    assert (len(listing), len(parameters), sum(map(math.prod, parameters))) == (1149, 864, 5_733_120)
    ours = gmf.create_model("groupmixformer_m").state_dict()
    converted = gmf.convert_official_state_dict({name: torch.empty(shape) for name, shape in listing.items()})
    assert sorted(converted) == sorted(ours)
    for name, tensor in converted.items():
        assert tensor.shape == ours[name].shape, name


@pytest.mark.skipif(not os.path.exists(OFFICIAL_M_LISTING), reason="needs ../shared/docs")
def test_the_official_m_listing_is_the_one_written_out_here():
    """The official code's own listing of the M checkpoint (name, shape, param or buffer, in order)
    is exactly official_m_listing(), so the test above needs no file outside the repository."""
    with open(OFFICIAL_M_LISTING) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    official = [(name, tuple(int(n) for n in shape.strip("()").split(",") if n.strip()), kind)
                for name, shape, kind in rows]
    ours = [(name, shape, "buffer" if name.endswith(BUFFERS) else "param")
            for name, shape in official_m_listing().items()]
    assert ours == official


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
# Parameter counts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name, params", [
    ("groupmixformer_m", 5_733_120), ("groupmixformer_t", 10_949_152),
    ("groupmixformer_s", 22_421_320), ("groupmixformer_b", 45_827_272),
    ("groupmixformer_l", 71_833_648)])
def test_official_parameter_counts(model_name, params):
    """Each official variant has exactly the parameter count of the official code (1000 classes)."""
    model = gmf.create_model(model_name)
    assert sum(p.numel() for p in model.parameters()) == params


# ==============================================================================================
# 6. Bad input
# ==============================================================================================

# Widths, non-positive depths, strides and MLP ratios, and group sizes are drawn further below.
BAD_CONFIGS = [
    (dict(attention="linear"), "attention='linear'"),
    (dict(padding_mode="reflect"), "padding_mode='reflect'"),
    (dict(num_heads=6), "num_heads=6"),  # not a multiple of the 4 attention segments
    (dict(num_heads=8.0), "num_heads=8.0"),  # not an integer
    (dict(crpe_windows=((3.0, 2), (5, 3), (7, 3))), "crpe_windows"),  # a float kernel
    (dict(crpe_windows=((4, 2), (5, 3), (7, 3))), "crpe_windows"),  # an even kernel has no centre
    (dict(depths=(3, 3, 12)), "depths"),  # one entry short of dims
    (dict(crpe_windows=((3, 2), (5, 3))), "crpe_windows"),
    (dict(stem_strides=(2, 2, 2)), "stem_strides"),
    (dict(num_classes=-1), "num_classes=-1"),
    (dict(in_chans=0), "in_chans=0"),
    (dict(drop_path_rate=1.0), "drop_path_rate=1.0"),
    (dict(drop_path_rate=-0.1), "drop_path_rate=-0.1"),
    (dict(img_size=0), "img_size=0"),
    (dict(qkv_bias="no"), "qkv_bias='no'"),
    (dict(dims=()), "dims"),
    (dict(use_crpe="no"), "use_crpe='no'"),
    (dict(use_non_attention_branch=0), "use_non_attention_branch=0"),
    (dict(use_non_attention_branch="no", dims=(40, 80, 160, 164)),  # named before any width
     "use_non_attention_branch='no'"),
    (dict(use_non_attention_branch=False, dims=(40, 80, 160, 170)), "170"),  # not 4 segments
    (dict(group_sizes=7), "group_sizes=7"),  # a number where a sequence belongs
    (dict(crpe_windows=(3, 8)), "crpe_windows=(3, 8)"),  # one pair, not a sequence of pairs
    (dict(mlp_ratios=("4", 4, 4, 4)), "mlp_ratios"),  # a word among the numbers
    (dict(dims=(True, 80, 160, 160)), "dims"),  # a flag is not a width
]


@pytest.mark.parametrize("overrides, named", BAD_CONFIGS)
def test_impossible_configs_raise_value_error_naming_the_value(overrides, named):
    """An impossible config raises ValueError at construction, naming the offending value."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gmf.create_model("groupmixformer_m", **overrides)


@given(width=st.integers(1, 400), heads=st.sampled_from([4, 8, 12, 16]), branch=st.booleans())
@example(width=42, heads=8, branch=True)  # not 5 segments
@example(width=45, heads=8, branch=True)  # segments of 9 do not split into 2 heads each
@example(width=44, heads=8, branch=False)  # without the branch: 4 segments of 11, not 2 heads each
def test_stage_widths_must_split_into_segments_and_heads(width, heads, branch):
    """A width builds exactly when it splits into 5 segments (4 without the non-attention branch)
    of whole heads; otherwise ValueError."""
    config = dict(num_heads=heads, crpe_windows=((3, heads // 4), (5, heads // 4), (7, heads - heads // 2)),
                  use_non_attention_branch=branch)
    segments = 5 if branch else 4
    fits = width % segments == 0 and (width // segments) % (heads // 4) == 0 and width >= 2
    if fits:
        one_stage_config(width, **config)
    else:
        with pytest.raises(ValueError, match=str(width)):
            one_stage_config(width, **config)


@given(field=st.sampled_from(["depths", "stage_strides", "stem_strides", "mlp_ratios"]),
       position=st.integers(0, 3), bad=st.integers(-3, 0))
@example(field="depths", position=1, bad=0)
@example(field="stage_strides", position=2, bad=0)
@example(field="mlp_ratios", position=2, bad=0)
def test_non_positive_depths_strides_and_mlp_ratios_raise_value_error(field, position, bad):
    """A depth, stride or MLP ratio of 0 or less, at any stage, is rejected at construction, naming the field."""
    values = list(getattr(gmf.GroupMixFormerConfig(), field))
    values[position % len(values)] = bad  # the stem has two strides, the stages four of each
    with pytest.raises(ValueError, match=field):
        gmf.GroupMixFormerConfig(**{field: tuple(values)})


@given(group_sizes=st.lists(st.integers(-2, 8), min_size=1, max_size=4).filter(
    lambda ks: any(k < 1 or k % 2 == 0 for k in ks)))
@example(group_sizes=[1, 3, 4, 7])
def test_even_or_non_positive_group_sizes_raise_value_error(group_sizes):
    """A window without a centre token (even) or empty cannot make a proxy per token."""
    with pytest.raises(ValueError, match="group_sizes"):
        gmf.GroupMixFormerConfig(group_sizes=tuple(group_sizes))


def test_unknown_model_or_override_is_named():
    """create_model (and model_config, which checks a config without building it) names an
    unknown variant or config field; model_config gives the config create_model builds."""
    for make in (gmf.create_model, gmf.model_config):
        with pytest.raises(ValueError, match="groupmixformer_xl"):
            make("groupmixformer_xl")
        with pytest.raises(ValueError, match="num_class"):
            make("groupmixformer_m", num_class=10)
    config = gmf.model_config("groupmixformer_cifar", group_sizes=[1, 1, 1, 1])  # a list, kept as a tuple
    assert config == gmf.create_model("groupmixformer_cifar", group_sizes=(1, 1, 1, 1)).cfg


@given(rank=st.integers(0, 6).filter(lambda r: r != 4), channels=st.integers(1, 5).filter(lambda c: c != 3),
       empty=st.sampled_from([(0, 3, 8, 8), (1, 3, 0, 8), (1, 3, 8, 0)]))
@example(rank=3, channels=1, empty=(2, 3, 0, 32))
@example(rank=5, channels=1, empty=(2, 3, 0, 32))
def test_inputs_of_the_wrong_rank_channels_size_or_dtype_raise_value_error(rank, channels, empty):
    """Any rank but 4, a channel count other than in_chans, an empty batch or image, or integer
    pixels (uint8, as image files hold them) raise ValueError saying what is wrong."""
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="torch.uint8"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f"rank {rank}"):
        model(torch.zeros((2,) * rank))
    with pytest.raises(ValueError, match=f"3 input channels, got {channels}"):
        model(torch.zeros(1, channels, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(empty))


def test_circular_padding_needs_grids_as_large_as_its_windows():
    """With circular padding a grid smaller than the padding of the largest window, of the group
    aggregators or of the position encoding, raises ValueError."""
    model = tiny_model(padding_mode="circular").eval()
    model(torch.zeros(1, 3, 12, 12))  # grids 6x6 and 3x3: fine
    with pytest.raises(ValueError, match="stage 1"):
        model(torch.zeros(1, 3, 8, 12))  # stage 1 grid 2x3
    model = tiny_model(padding_mode="circular", group_sizes=(1, 3, 3, 3)).eval()  # CRPE's 7x7 sets it
    with pytest.raises(ValueError, match="stage 1"):
        model(torch.zeros(1, 3, 8, 12))


# ==============================================================================================
# 7. tutorial.md
# ==============================================================================================

TUTORIAL = os.path.join(HERE, "tutorial.md")


def tutorial_blocks():
    """(line number, is_slow, code) of every ```python block in tutorial.md, indented ones too."""
    blocks, lines = [], open(TUTORIAL).read().split("\n")
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```python"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            start, i = i + 1, i + 1
            while lines[i].strip() != "```":
                i += 1
            code = "\n".join(line[indent:] for line in lines[start:i])
            blocks.append(pytest.param(code, marks=[pytest.mark.slow] if fence.endswith("slow") else [],
                                       id=f"line{start}"))
        i += 1
    return blocks


def expected_output(code):
    """The comment lines that end a block: what it prints, one '# ' line per printed line."""
    expected = []
    for line in reversed(code.rstrip().split("\n")):
        if not line.startswith("#"):
            break
        expected.insert(0, line[2:])
    return expected


@pytest.mark.parametrize("code", tutorial_blocks())
def test_tutorial_block_runs_and_prints_what_it_says(code, tmp_path, monkeypatch, capsys):
    """Each Python block of tutorial.md runs (in a scratch folder) and prints its documented output.

    With GMF_WRITE_FIGURES=1 the blocks run in the repository, so the figures they draw replace
    those in figures/."""
    monkeypatch.chdir(HERE if os.environ.get("GMF_WRITE_FIGURES") == "1" else tmp_path)
    monkeypatch.setattr(gmf, "VARIANTS", dict(gmf.VARIANTS))  # variants a block adds go away after it
    exec(compile(code, TUTORIAL, "exec"), {"__name__": "tutorial"})
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    expected = expected_output(code)
    if expected:
        assert printed == expected


def test_tutorial_cites_only_names_that_exist():
    """Every gmf.<name>, every `CamelCase` class and every `test_...` the tutorial cites exists."""
    text = open(TUTORIAL).read()
    missing = [n for n in re.findall(r"gmf\.(?!py\b)(\w+)", text) if not hasattr(gmf, n)]
    missing += [n for n in re.findall(r"`([A-Z][A-Za-z]+)(?:\.\w+)?`", text) if not hasattr(gmf, n)]
    missing += [n for n in re.findall(r"`(test_\w+)`", text) if n not in globals()]
    assert not missing, f"tutorial.md cites names that do not exist: {missing}"
