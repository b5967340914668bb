"""PyTorch reference implementations and case generator for the engine parity
tests (tests/python/test_parity.py, runner tests/parity_runner.c).

The references are written from the published definitions (fairseq
TransformerEncoderLayer / TransformerDecoderLayer / MultiheadAttention /
positional embeddings, Hugging Face T5 blocks) as plain functions of a weight
dictionary ``W`` (tensor name -> fp32 tensor), so that the same function can be
re-run on lossy weights. Everything is computed in fp32 like the originals.

A case is a model directory (model.safetensors + config.json, the config
telling the runner which layers to bind and how) plus an inputs file
(inputs.safetensors: the inputs, and the expected outputs under "expect.<name>").
Weights are drawn in fp32 and rounded to bf16 so that they are exactly
representable in every weight mode.
"""

import json
import math
import os

import numpy as np
import torch

from st_util import f32_to_bf16_bits, write_safetensors

torch.set_num_threads(1)

# ----------------------------------------------------------------- helpers


def bf16r(t):
    """Round fp32 values to the nearest bf16 (ties to even), back to fp32."""
    return t.bfloat16().float()


def round_mantissa(t, k):
    """The codec's lossy-k rounding (engine/nz_codec.h): fp32 rounded to k
    mantissa bits, nearest, ties to even (the lowest kept bit of the encoding),
    the carry running into the exponent. NaN becomes a quiet NaN."""
    assert t.dtype == torch.float32 and 0 <= k <= 23
    u = t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = u & 0x80000000
    mag = u & 0x7FFFFFFF
    drop = 23 - k
    if drop > 0:
        lsb = (mag >> drop) & 1
        mag = (mag + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)
    mag = torch.where((u & 0x7FFFFFFF) > 0x7F800000, torch.full_like(mag, 0x7FC00000), mag)
    r = sign | mag
    r = torch.where(r >= 2**31, r - 2**32, r)
    return r.to(torch.int32).view(torch.float32).reshape(t.shape)


def lossy_weights(W, k):
    """The weights a lossy-k pack stores: 2-D (and higher) float tensors are
    rounded, 1-D ones are stored raw (nzp packs 1-D tensors raw)."""
    return {n: (round_mantissa(w, k) if w.dim() >= 2 else w.clone()) for n, w in W.items()}


def linear(W, name, x, bias=True):
    """nn.Linear with weight W[name + '.weight'] ([out x in]) and bias when present."""
    y = x @ W[name + ".weight"].t()
    b = W.get(name + ".bias") if bias else None
    return y + b if b is not None else y


def layer_norm(x, g, b, eps):
    """torch.nn.LayerNorm over the last dim (biased variance)."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * g
    return y + b if b is not None else y


def rms_norm(x, g, eps):
    """HF T5LayerNorm: no mean subtraction, no bias."""
    var = x.pow(2).mean(-1, keepdim=True)
    return g * (x * torch.rsqrt(var + eps))


def gelu(x):
    """Exact GELU (torch.nn.functional.gelu, fairseq 'gelu')."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """HF gelu_new / fairseq gelu_accurate: tanh approximation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTS = {"relu": torch.relu, "gelu": gelu, "gelu_tanh": gelu_tanh}

# ----------------------------------------------------------------- positions


def make_positions(tokens, padding_idx, start=0):
    """fairseq utils.make_positions: non-pad tokens numbered padding_idx+1..
    from the left, pads get padding_idx; start offsets the count."""
    mask = tokens.ne(padding_idx).long()
    return (torch.cumsum(mask, dim=1) + start) * mask + padding_idx


def sinusoidal_table(num, dim, padding_idx):
    """fairseq SinusoidalPositionalEmbedding.get_embedding (fp32 as there)."""
    half = dim // 2
    f = math.log(10000) / (half - 1)
    f = torch.exp(torch.arange(half, dtype=torch.float) * -f)
    e = torch.arange(num, dtype=torch.float).unsqueeze(1) * f.unsqueeze(0)
    e = torch.cat([torch.sin(e), torch.cos(e)], dim=1).view(num, -1)
    if dim % 2 == 1:
        e = torch.cat([e, torch.zeros(num, 1)], dim=1)
    if padding_idx is not None:
        e[padding_idx, :] = 0
    return e


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
    """HF T5Attention._relative_position_bucket (rel = key - query), fp32 log as there."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    small = rel < max_exact
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(small, rel, large)


def t5_position_bias(table, Tq, Tk, q0, k0, bidirectional, num_buckets, max_distance):
    """HF T5Attention.compute_bias for queries q0.. and keys k0..: [H x Tq x Tk]."""
    qpos = torch.arange(Tq, dtype=torch.long)[:, None] + q0
    kpos = torch.arange(Tk, dtype=torch.long)[None, :] + k0
    b = t5_bucket(kpos - qpos, bidirectional, num_buckets, max_distance)
    return table[b].permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------- attention


def mha(W, prefix, names, xq, xkv, H, scale=None, key_pad=None, causal=False, q0=0, bias=None, with_bias=True):
    """Multi-head attention as fairseq MultiheadAttention (q = (Wq x + bq) *
    head_dim**-0.5, masked softmax in fp32, out_proj) or, with scale=1,
    bias=position bias and with_bias=False, as HF T5Attention.

    xq [B x Tq x d], xkv [B x Tk x d]; key_pad [B x Tk] bool (True = pad);
    causal: query i sees keys j <= q0 + i; bias [H x Tq x Tk].
    A query whose keys are all masked gets zero attention (the engine's
    documented convention; fairseq would produce NaN there)."""
    q = linear(W, prefix + names[0], xq, with_bias)
    k = linear(W, prefix + names[1], xkv, with_bias)
    v = linear(W, prefix + names[2], xkv, with_bias)
    B, Tq, HD = q.shape
    Tk = k.shape[1]
    dh = HD // H
    q = q * (dh**-0.5 if scale is None else scale)
    q = q.view(B, Tq, H, dh).transpose(1, 2)
    k = k.view(B, Tk, H, dh).transpose(1, 2)
    v = v.view(B, Tk, H, dh).transpose(1, 2)
    s = q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias.unsqueeze(0)
    mask = torch.zeros(B, 1, Tq, Tk, dtype=torch.bool)
    if key_pad is not None:
        mask = mask | key_pad.bool()[:, None, None, :]
    if causal:
        mask = mask | (torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + q0)[None, None]
    s = s.masked_fill(mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # all keys masked
    o = (p @ v).transpose(1, 2).reshape(B, Tq, HD)
    return linear(W, prefix + names[3], o, with_bias)


FAIRSEQ_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_ATTN = ("q", "k", "v", "o")


def adapter(W, prefix, x):
    """Residual adapter: x + up(relu(down x + b1)) + b2."""
    return x + linear(W, prefix + "up", torch.relu(linear(W, prefix + "down", x)))


def fairseq_ffn(W, prefix, x, act):
    return linear(W, prefix + "fc2", ACTS[act](linear(W, prefix + "fc1", x)))


def fairseq_ln(W, name, x, eps):
    return layer_norm(x, W[name + ".weight"], W[name + ".bias"], eps)


def fairseq_layer(W, cfg, x, pad=None, causal=False, enc=None, enc_pad=None, kv_map=None):
    """fairseq TransformerEncoderLayer (has_cross false) / TransformerDecoderLayer
    (has_cross true), post-norm or pre-norm (normalize_before), then the
    adapter (when cfg['adapter']) on the layer output."""
    p, H, eps, pre = cfg["prefix"], cfg["heads"], cfg["eps"], cfg["pre_norm"]

    def sub(x, norm, fn):
        if pre:
            return x + fn(fairseq_ln(W, p + norm, x, eps))
        return fairseq_ln(W, p + norm, x + fn(x), eps)

    x = sub(x, "self_attn_layer_norm",
            lambda h: mha(W, p + "self_attn.", FAIRSEQ_ATTN, h, h, H, key_pad=pad, causal=causal))
    if cfg["has_cross"]:
        e, ep = expand(enc, enc_pad, kv_map)
        x = sub(x, "encoder_attn_layer_norm",
                lambda h: mha(W, p + "encoder_attn.", FAIRSEQ_ATTN, h, e, H, key_pad=ep))
    x = sub(x, "final_layer_norm", lambda h: fairseq_ffn(W, p, h, cfg["act"]))
    groups = cfg.get("group_adapters")
    if groups:  # rows [g * group_B, (g + 1) * group_B) use adapter g (None: no adapter at all)
        gB = cfg["group_B"]
        x = torch.cat([adapter(W, p + a, x[g * gB:(g + 1) * gB]) if a else x[g * gB:(g + 1) * gB]
                       for g, a in enumerate(groups)])
    elif cfg.get("adapter"):
        x = adapter(W, p + "adapter.", x)
    return x


def t5_ffn(W, prefix, x, act):
    if act == "gated_gelu":  # T5DenseGatedActDense
        return linear(W, prefix + "wo", gelu_tanh(linear(W, prefix + "wi_0", x)) * linear(W, prefix + "wi_1", x))
    return linear(W, prefix + "wo", torch.relu(linear(W, prefix + "wi", x)))  # T5DenseActDense


def t5_block(W, cfg, x, pad=None, causal=False, enc=None, enc_pad=None, kv_map=None):
    """HF T5Block (pre-norm, RMSNorm, no biases, unscaled scores, relative
    position bias on self-attention, none on cross-attention)."""
    p, H, eps = cfg["prefix"], cfg["heads"], cfg["eps"]
    T = x.shape[1]
    table = W[p + "layer.0.SelfAttention.relative_attention_bias.weight"]
    bias = t5_position_bias(table, T, T, 0, 0, not causal, cfg["num_buckets"], cfg["max_distance"])
    h = rms_norm(x, W[p + "layer.0.layer_norm.weight"], eps)
    x = x + mha(W, p + "layer.0.SelfAttention.", T5_ATTN, h, h, H, scale=1.0, key_pad=pad, causal=causal,
                bias=bias, with_bias=False)
    i = 1
    if cfg["has_cross"]:
        e, ep = expand(enc, enc_pad, kv_map)
        h = rms_norm(x, W[p + "layer.1.layer_norm.weight"], eps)
        x = x + mha(W, p + "layer.1.EncDecAttention.", T5_ATTN, h, e, H, scale=1.0, key_pad=ep, with_bias=False)
        i = 2
    h = rms_norm(x, W[p + f"layer.{i}.layer_norm.weight"], eps)
    return x + t5_ffn(W, p + f"layer.{i}.DenseReluDense.", h, cfg["act"])


def expand(enc, enc_pad, kv_map):
    """Encoder rows picked per query row (kv_map: length beam / shared encoders)."""
    if kv_map is None:
        return enc, enc_pad
    return enc[kv_map], (enc_pad[kv_map] if enc_pad is not None else None)


def incremental(full, x, pad, chunks, reorder_at, src):
    """What an incremental causal run (chunks of new positions appended to a
    KV cache, a beam reorder before chunk reorder_at) must produce: for each
    position, the full causal computation over the sequence as it stands
    then. full(x, pad) -> [B x T x d]."""
    if reorder_at < 0:
        return full(x, pad)
    p = int(sum(chunks[:reorder_at]))
    before = full(x, pad)[:, :p]
    x2 = torch.cat([x[src, :p], x[:, p:]], dim=1)
    pad2 = torch.cat([pad[src, :p], pad[:, p:]], dim=1) if pad is not None else None
    after = full(x2, pad2)[:, p:]
    return torch.cat([before, after], dim=1)


# ----------------------------------------------------------------- cases


class Case:
    """One parity case: config (for the runner), fp32 weights (bf16-representable),
    inputs, and compute(W, inputs) -> expected outputs. tie: output -> reference
    scores for index outputs (argmax/top-k compared up to ties)."""

    def __init__(self, name, config, weights, inputs, compute, tie=None):
        self.name, self.config, self.weights, self.inputs = name, config, weights, inputs
        self.compute, self.tie = compute, tie or {}

    def expected(self, W=None):
        with torch.no_grad():
            out = self.compute(self.weights if W is None else W, self.inputs)
        return {k: v.contiguous() for k, v in out.items()}


class Gen:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=self.g) * std + mean

    def w(self, *shape, std=None):
        """bf16-representable weight; std defaults to 1/sqrt(fan_in)."""
        if std is None:
            std = shape[-1] ** -0.5
        return bf16r(self.normal(*shape, std=std))

    def gain(self, d):
        return bf16r(1.0 + self.normal(d, std=0.1))

    def ints(self, lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=self.g)


def pad_mask(B, T, spec):
    """spec: list per row of (left, right) padding counts -> uint8 [B x T]."""
    m = torch.zeros(B, T, dtype=torch.uint8)
    for b, (lft, rgt) in enumerate(spec):
        m[b, :lft] = 1
        if rgt:
            m[b, T - rgt:] = 1
    return m


def attn_weights(g, W, prefix, names, d, hd, with_bias=True):
    for i, n in enumerate(names):
        shape = (hd, d) if i < 3 else (d, hd)
        W[prefix + n + ".weight"] = g.w(*shape)
        if with_bias:
            W[prefix + n + ".bias"] = g.w(shape[0], std=0.1)


def ln_weights(g, W, name, d):
    W[name + ".weight"] = g.gain(d)
    W[name + ".bias"] = bf16r(g.normal(d, std=0.1))


def case_embed(name, seed, V, D, padding_idx, scale, positions, max_pos=16):
    g = Gen(seed)
    W = {"embed_tokens.weight": g.w(V, D)}
    W["embed_tokens.weight"][padding_idx] = 0  # nn.Embedding(padding_idx) zeroes that row
    if positions == "learned":  # fairseq LearnedPositionalEmbedding: max_pos + padding_idx + 1 rows
        E = g.w(max_pos + padding_idx + 1, D, std=0.5)
        E[padding_idx] = 0
        W["embed_positions.weight"] = E
    B, T, n = 3, 7, 3
    tok = g.ints(padding_idx + 1, V, B, T).to(torch.int32)
    tok[1, :2] = padding_idx  # left padding
    tok[2, T - 3:] = padding_idx  # right padding
    inc = g.ints(padding_idx + 1, V, B, n).to(torch.int32)
    cfg = {"kind": "embed", "vocab": V, "d_model": D, "padding_idx": padding_idx, "scale": scale,
           "positions": positions, "tokens": "embed_tokens.weight", "table": "embed_positions.weight"}

    def pos_emb(W, pos):
        if positions == "sinusoidal":
            return sinusoidal_table(int(pos.max()) + 1, D, padding_idx)[pos]
        return W["embed_positions.weight"][pos]

    def compute(W, I):
        tok = I["tokens"].long()
        pos = make_positions(tok, padding_idx)
        out = scale * W["embed_tokens.weight"][tok] + pos_emb(W, pos)
        # incremental decoding: step s has s tokens before it; fairseq uses
        # position padding_idx + s + 1 for the new token
        inc = I["inc_tokens"].long()
        ipos = padding_idx + 1 + torch.arange(inc.shape[1]).expand(inc.shape[0], -1)
        iout = scale * W["embed_tokens.weight"][inc] + pos_emb(W, ipos)
        return {"out": out, "positions": pos, "inc_out": iout, "inc_positions": ipos.contiguous()}

    return Case(name, cfg, W, {"tokens": tok, "inc_tokens": inc}, compute)


T5_BUCKET_PARAMS = [[32, 128], [8, 16], [16, 20]]


def case_t5_bias(name, seed):
    g = Gen(seed)
    H, nb, md = 4, 32, 128
    W = {"relative_attention_bias.weight": g.w(nb, H, std=1.0)}
    rel = torch.arange(-300, 301, dtype=torch.long)
    # (Tq, Tk, q0, k0, bidirectional): encoder, decoder steps (q0 = step), offsets
    args = torch.tensor([[5, 5, 0, 0, 1], [6, 6, 0, 0, 0], [1, 7, 6, 0, 0], [3, 9, 6, 0, 0], [4, 6, 2, 3, 1],
                         [2, 170, 150, 0, 0], [3, 140, 0, 5, 1]], dtype=torch.long)
    cfg = {"kind": "t5_bias", "heads": H, "num_buckets": nb, "max_distance": md,
           "table": "relative_attention_bias.weight", "bucket_params": T5_BUCKET_PARAMS}

    def compute(W, I):
        out = {}
        for nbk, mdk in T5_BUCKET_PARAMS:
            for bi in (0, 1):
                out[f"bucket.{nbk}.{mdk}.{bi}"] = t5_bucket(I["rel"], bool(bi), nbk, mdk)
        for i, (tq, tk, q0, k0, bi) in enumerate(I["bias_args"].tolist()):
            out[f"bias.{i}"] = t5_position_bias(W["relative_attention_bias.weight"], tq, tk, q0, k0, bool(bi), nb, md)
        return out

    return Case(name, cfg, W, {"rel": rel, "bias_args": args}, compute)


def case_norm(name, seed, kind, D, eps):
    g = Gen(seed)
    W = {"norm.weight": g.gain(D)}
    if kind == "layer":
        W["norm.bias"] = bf16r(g.normal(D, std=0.1))
    x = g.normal(3, 5, D, std=2.0, mean=3.0)
    cfg = {"kind": "norm", "norm": kind, "d_model": D, "eps": eps, "gain": "norm.weight",
           "bias": "norm.bias" if kind == "layer" else None}

    def compute(W, I):
        if kind == "layer":
            y = layer_norm(I["x"], W["norm.weight"], W["norm.bias"], eps)
        else:
            y = rms_norm(I["x"], W["norm.weight"], eps)
        return {"out": y, "out_inplace": y}

    return Case(name, cfg, W, {"x": x}, compute)


def case_attn_self(name, seed, D, H):
    g = Gen(seed)
    W = {}
    attn_weights(g, W, "attn.", FAIRSEQ_ATTN, D, D)
    B, T = 3, 8
    x = g.normal(B, T, D)
    pad = pad_mask(B, T, [(0, 0), (2, 0), (0, 3)])  # left pad; right pad
    chunks = torch.tensor([3, 1, 1, 1, 1, 1], dtype=torch.long)
    reorder_at, src = 4, torch.tensor([2, 0, 0], dtype=torch.long)
    cfg = {"kind": "attn_self", "d_model": D, "heads": H, "prefix": "attn.", "names": list(FAIRSEQ_ATTN),
           "with_bias": True, "scale": 0}

    def compute(W, I):
        def full(x, pad, causal=True):
            return mha(W, "attn.", FAIRSEQ_ATTN, x, x, H, key_pad=pad, causal=causal)

        return {"out": full(I["x"], I["pad"], False), "out_causal": full(I["x"], I["pad"]),
                "inc_out": incremental(full, I["x"], I["pad"], I["chunks"].tolist(), int(I["reorder_at"][0]),
                                       I["reorder_src"])}

    inputs = {"x": x, "pad": pad, "chunks": chunks, "reorder_at": torch.tensor([reorder_at]), "reorder_src": src}
    return Case(name, cfg, W, inputs, compute)


def case_attn_cross(name, seed, D, H):
    g = Gen(seed)
    W = {}
    attn_weights(g, W, "attn.", FAIRSEQ_ATTN, D, D)
    Be, S, B, T = 2, 6, 5, 3
    enc = g.normal(Be, S, D)
    enc_pad = pad_mask(Be, S, [(0, 0), (0, 2)])
    kv_map = torch.tensor([0, 0, 1, 1, 0], dtype=torch.long)
    x = g.normal(B, T, D)
    x_id = g.normal(Be, T, D)
    cfg = {"kind": "attn_cross", "d_model": D, "heads": H, "prefix": "attn.", "names": list(FAIRSEQ_ATTN),
           "with_bias": True, "scale": 0}

    def compute(W, I):
        e, ep = expand(I["enc"], I["enc_pad"], I["kv_map"])
        return {"out": mha(W, "attn.", FAIRSEQ_ATTN, I["x"], e, H, key_pad=ep),
                "out_id": mha(W, "attn.", FAIRSEQ_ATTN, I["x_id"], I["enc"], H, key_pad=I["enc_pad"])}

    return Case(name, cfg, W, {"enc": enc, "enc_pad": enc_pad, "x": x, "kv_map": kv_map, "x_id": x_id}, compute)


def case_ffn(name, seed, act, D, F):
    g = Gen(seed)
    W = {}
    if act == "gated_gelu":  # T5 v1.1 names, no biases
        W["ff.wi_0.weight"], W["ff.wi_1.weight"], W["ff.wo.weight"] = g.w(F, D), g.w(F, D), g.w(D, F)
        names = {"wi_w": "ff.wi_0.weight", "wi_b": None, "wg_w": "ff.wi_1.weight", "wo_w": "ff.wo.weight",
                 "wo_b": None}
    else:
        W["fc1.weight"], W["fc1.bias"] = g.w(F, D), g.w(F, std=0.2)
        W["fc2.weight"], W["fc2.bias"] = g.w(D, F), g.w(D, std=0.2)
        names = {"wi_w": "fc1.weight", "wi_b": "fc1.bias", "wg_w": None, "wo_w": "fc2.weight", "wo_b": "fc2.bias"}
    x = g.normal(3, 5, D)
    cfg = dict({"kind": "ffn", "act": act, "d_model": D}, **names)

    def compute(W, I):
        if act == "gated_gelu":
            return {"out": t5_ffn(W, "ff.", I["x"], act)}
        return {"out": fairseq_ffn(W, "", I["x"], act)}

    return Case(name, cfg, W, {"x": x}, compute)


def adapter_weights(g, W, prefix, D, r):
    W[prefix + "down.weight"], W[prefix + "down.bias"] = g.w(r, D), g.w(r, std=0.2)
    W[prefix + "up.weight"], W[prefix + "up.bias"] = g.w(D, r), g.w(D, std=0.2)


def case_adapter(name, seed, D, r):
    g = Gen(seed)
    W = {}
    adapter_weights(g, W, "adapter.", D, r)
    x = g.normal(2, 6, D)
    cfg = {"kind": "adapter", "d_model": D, "prefix": "adapter."}
    return Case(name, cfg, W, {"x": x}, lambda W, I: {"out": adapter(W, "adapter.", I["x"])})


def case_fairseq_layer(name, seed, D, H, F, pre_norm, has_cross, causal, act="relu", with_adapter=False,
                       incremental_run=False, kv_map=None, self_pad=None, group_adapters=None, group_B=0):
    g = Gen(seed)
    p = "decoder.layers.0." if has_cross else "encoder.layers.0."
    W = {}
    attn_weights(g, W, p + "self_attn.", FAIRSEQ_ATTN, D, D)
    ln_weights(g, W, p + "self_attn_layer_norm", D)
    if has_cross:
        attn_weights(g, W, p + "encoder_attn.", FAIRSEQ_ATTN, D, D)
        ln_weights(g, W, p + "encoder_attn_layer_norm", D)
    W[p + "fc1.weight"], W[p + "fc1.bias"] = g.w(F, D), g.w(F, std=0.2)
    W[p + "fc2.weight"], W[p + "fc2.bias"] = g.w(D, F), g.w(D, std=0.2)
    ln_weights(g, W, p + "final_layer_norm", D)
    if with_adapter:
        adapter_weights(g, W, p + "adapter.", D, 16)
    for a in group_adapters or []:
        if a:
            adapter_weights(g, W, p + a, D, 8)
    cfg = {"kind": "block", "family": "fairseq", "prefix": p, "d_model": D, "heads": H, "eps": 1e-5,
           "pre_norm": pre_norm, "has_cross": has_cross, "causal": causal, "act": act, "adapter": with_adapter}
    if group_adapters:
        cfg.update(group_adapters=group_adapters, group_B=group_B)
    B = len(kv_map) if kv_map is not None else 3
    T = 6
    I = {"x": g.normal(B, T, D)}
    if self_pad:  # (left, right) padding per row
        I["pad"] = pad_mask(B, T, self_pad)
    if has_cross:
        Be, S = (max(kv_map) + 1 if kv_map is not None else B), 5
        I["enc"] = g.normal(Be, S, D)
        I["enc_pad"] = pad_mask(Be, S, [(0, 0)] + [(1, 0)] * (Be - 1))
        if kv_map is not None:
            I["kv_map"] = torch.tensor(kv_map, dtype=torch.long)
    if incremental_run:
        I["chunks"] = torch.tensor([2, 1, 1, 1, 1], dtype=torch.long)
        I["reorder_at"] = torch.tensor([3])
        I["reorder_src"] = torch.tensor([(b + 1) % B for b in range(B)], dtype=torch.long)
    return Case(name, cfg, W, I, lambda W, I: block_compute(fairseq_layer, W, cfg, I))


def block_compute(fn, W, cfg, I):
    def run(x, pad, causal):
        return fn(W, cfg, x, pad, causal, I.get("enc"), I.get("enc_pad"), I.get("kv_map"))

    out = {"out": run(I["x"], I.get("pad"), cfg["causal"])}
    if "chunks" in I:
        out["inc_out"] = incremental(lambda x, pad: run(x, pad, True), I["x"], I.get("pad"), I["chunks"].tolist(),
                                     int(I["reorder_at"][0]), I["reorder_src"])
    return out


def case_t5_block(name, seed, D, H, dkv, F, has_cross, act, incremental_run=False):
    g = Gen(seed)
    p = "decoder.block.0." if has_cross else "encoder.block.0."
    HD = H * dkv
    nb, md = 32, 128
    W = {}
    attn_weights(g, W, p + "layer.0.SelfAttention.", T5_ATTN, D, HD, with_bias=False)
    W[p + "layer.0.SelfAttention.relative_attention_bias.weight"] = g.w(nb, H, std=1.0)
    W[p + "layer.0.layer_norm.weight"] = g.gain(D)
    i = 1
    if has_cross:
        attn_weights(g, W, p + "layer.1.EncDecAttention.", T5_ATTN, D, HD, with_bias=False)
        W[p + "layer.1.layer_norm.weight"] = g.gain(D)
        i = 2
    f = p + f"layer.{i}.DenseReluDense."
    if act == "gated_gelu":
        W[f + "wi_0.weight"], W[f + "wi_1.weight"] = g.w(F, D), g.w(F, D)
    else:
        W[f + "wi.weight"] = g.w(F, D)
    W[f + "wo.weight"] = g.w(D, F)
    W[p + f"layer.{i}.layer_norm.weight"] = g.gain(D)
    cfg = {"kind": "block", "family": "t5", "prefix": p, "d_model": D, "heads": H, "eps": 1e-6, "pre_norm": True,
           "has_cross": has_cross, "causal": has_cross, "act": act, "adapter": False, "num_buckets": nb,
           "max_distance": md}
    B, T = 3, 7
    I = {"x": g.normal(B, T, D)}
    if has_cross:
        Be, S = 2, 6
        I["enc"] = g.normal(Be, S, D)
        I["enc_pad"] = pad_mask(Be, S, [(0, 0), (0, 2)])
        I["kv_map"] = torch.tensor([0, 1, 1], dtype=torch.long)
    else:
        I["pad"] = pad_mask(B, T, [(0, 0), (0, 3), (0, 1)])
    if incremental_run:
        I["chunks"] = torch.tensor([3, 1, 1, 1, 1], dtype=torch.long)
        I["reorder_at"] = torch.tensor([2])
        I["reorder_src"] = torch.tensor([1, 1, 0], dtype=torch.long)
    return Case(name, cfg, W, I, lambda W, I: block_compute(t5_block, W, cfg, I))


TOPK = 5


def case_output(name, seed, V, D, tied):
    g = Gen(seed)
    W = {}
    if tied:
        E = g.w(V, D, std=0.25)
        E[37] = E[5]  # duplicate rows: exact ties in the logits
        E[V - 1] = E[20]
        W["embed_tokens.weight"] = E
        wname, bname = "embed_tokens.weight", None
    else:
        W["output_projection.weight"] = g.w(V, D, std=0.25)
        W["output_projection.bias"] = g.w(V, std=0.5)
        wname, bname = "output_projection.weight", "output_projection.bias"
    h = g.normal(2, 4, D)
    h[1, 2] = 0.0  # an all-zero state: every tied logit is 0 (a V-way tie)
    cfg = {"kind": "output", "d_model": D, "vocab": V, "weight": wname, "bias": bname, "k": TOPK}

    def compute(W, I):
        logits = I["h"] @ W[wname].t()
        if bname:
            logits = logits + W[bname]
        lp = torch.log_softmax(logits, dim=-1)
        tv, ti = torch.topk(lp, TOPK, dim=-1)
        return {"logits": logits, "logits_mm": I["h"] @ W[wname].t(), "lprobs": lp,
                "probs": torch.softmax(logits, dim=-1), "argmax": torch.argmax(logits, dim=-1),
                "topk_idx": ti, "topk_val": tv}

    return Case(name, cfg, W, {"h": h}, compute, tie={"argmax": "logits", "topk_idx": "lprobs"})


def all_cases():
    """Every parity case (deterministic: fixed seeds)."""
    return [
        case_embed("embed_sinusoidal", 101, V=120, D=48, padding_idx=1, scale=math.sqrt(48), positions="sinusoidal"),
        case_embed("embed_sinusoidal_odd", 102, V=100, D=33, padding_idx=1, scale=1.0, positions="sinusoidal"),
        case_embed("embed_learned", 103, V=150, D=32, padding_idx=1, scale=math.sqrt(32), positions="learned"),
        case_t5_bias("t5_position_bias", 104),
        case_norm("layernorm", 105, "layer", 64, 1e-5),
        case_norm("rmsnorm", 106, "rms", 48, 1e-6),
        case_attn_self("attn_self", 107, D=32, H=4),
        case_attn_cross("attn_cross", 108, D=64, H=4),
        case_ffn("ffn_relu", 109, "relu", 32, 64),
        case_ffn("ffn_gelu", 110, "gelu", 48, 96),
        case_ffn("ffn_gelu_tanh", 111, "gelu_tanh", 64, 128),
        case_ffn("ffn_gated_gelu", 112, "gated_gelu", 32, 80),
        case_adapter("adapter", 113, 64, 16),
        case_fairseq_layer("fairseq_enc_postnorm", 114, 64, 4, 128, pre_norm=False, has_cross=False, causal=False,
                           self_pad=[(0, 0), (0, 2), (1, 0)]),
        case_fairseq_layer("fairseq_enc_prenorm_adapter", 115, 48, 4, 96, pre_norm=True, has_cross=False,
                           causal=False, act="gelu", with_adapter=True, self_pad=[(0, 0), (0, 2), (0, 1)]),
        case_fairseq_layer("fairseq_dec_cmlm", 116, 32, 4, 64, pre_norm=False, has_cross=True, causal=False,
                           kv_map=[0, 0, 1, 1], self_pad=[(0, 0), (0, 2), (0, 1), (0, 0)]),
        case_fairseq_layer("fairseq_dec_ar", 117, 32, 4, 64, pre_norm=False, has_cross=True, causal=True,
                           incremental_run=True, kv_map=[0, 1, 1]),
        # right padding in row 1 only: the first chunk has none (key_pad NULL), later ones do
        case_fairseq_layer("fairseq_dec_ar_prenorm", 118, 48, 4, 96, pre_norm=True, has_cross=True, causal=True,
                           incremental_run=True, self_pad=[(0, 0), (0, 2), (0, 0)]),
        # several decoders batched in one call: rows [2g, 2g + 2) use adapter g; a None entry means no
        # adapter even though the block has its own (b->adapter is overridden)
        case_fairseq_layer("fairseq_dec_group_adapters", 123, 32, 4, 64, pre_norm=True, has_cross=True,
                           causal=False, with_adapter=True, incremental_run=True, kv_map=[0, 1, 0, 1, 0, 1],
                           self_pad=[(0, 0), (0, 1)] * 3, group_adapters=["adapters.0.", None, "adapters.2."],
                           group_B=2),
        case_t5_block("t5_encoder_block", 119, 32, 4, 12, 64, has_cross=False, act="relu"),
        case_t5_block("t5_decoder_block", 120, 32, 4, 8, 48, has_cross=True, act="gated_gelu",
                      incremental_run=True),
        case_output("output_tied", 121, V=200, D=48, tied=True),
        case_output("output_untied_bias", 122, V=257, D=64, tied=False),
    ]


# ----------------------------------------------------------------- files

_ST = {torch.float32: "F32", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}


def to_st(t):
    return (_ST[t.dtype], t.contiguous().numpy())


def write_model_dir(case, path, dtype="F32", W=None):
    """model.safetensors (weights as F32 or BF16) + config.json."""
    os.makedirs(path, exist_ok=True)
    W = case.weights if W is None else W
    tensors = {}
    for n, w in W.items():
        a = w.contiguous().numpy().astype(np.float32)
        if dtype == "BF16":
            bits = f32_to_bf16_bits(a)
            tensors[n] = ("BF16", bits)
        else:
            tensors[n] = ("F32", a)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(case.config, f, indent=1)


def write_inputs(case, path, expected=None):
    """inputs.safetensors: the inputs and expect.<name> for each expected output."""
    expected = case.expected() if expected is None else expected
    tensors = {n: to_st(t) for n, t in case.inputs.items()}
    for n, t in expected.items():
        tensors["expect." + n] = to_st(t)
    write_safetensors(path, tensors)
    return expected
