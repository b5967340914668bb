"""PyTorch reference of the EqHard-EM multi-decoder T5 (dialogue family).

Written from Hugging Face's ``modeling_t5.py`` (the T5 maths) and EqHard-EM's
``model/adapter_t5.py`` / ``model/multidecoder_t5.py`` / ``generate.py`` /
``multi-decoder_trainer.py`` (Wen et al., "An Equal-Size Hard EM Algorithm for
Diverse Dialogue Generation"); no ``transformers`` import. The training script
(train_dialogue.py) uses it for the network and the EqHard assignment, the
converter (models/convert/eqhard_t5.py) for the model directory, and the C
engine is tested against it token for token. Everything runs in float32.

Module layout == the model directory's tensor names (README_dialogue.md):

    shared.weight                                   token embeddings [V x d]
    encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   [buckets x H]
    encoder.block.{i}.layer.0.layer_norm.weight
    encoder.block.{i}.layer.1.DenseReluDense.{wi,wo | wi_0,wi_1,wo}.weight
    encoder.block.{i}.layer.1.layer_norm.weight
    encoder.final_layer_norm.weight
    "adapter" variant (MultiAdapterT5): one decoder body, K adapters per sublayer
    decoder.block.{i}.layer.0.SelfAttention.* / layer.0.layer_norm.weight
    decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}.weight / layer.1.layer_norm.weight
    decoder.block.{i}.layer.2.DenseReluDense.* / layer.2.layer_norm.weight
    decoder.block.{i}.layer.{0,1,2}.adapters.{k}.{o2i,i2o}.{weight,bias}
    decoder.final_layer_norm.weight
    "transformer" variant (MultiDecoderT5): K full decoder copies
    decoders.{k}.embed_tokens.weight                (copy.deepcopy gives each its own)
    decoders.{k}.block.{i}.layer.{0,1,2}.* / decoders.{k}.final_layer_norm.weight
    lm_head.weight                                   only when not tie_word_embeddings

T5 semantics: RMSNorm (no mean, no bias), pre-norm residual sublayers, no
biases, scores q.k unscaled, relative position bias from block 0 of each stack
(bidirectional buckets in the encoder, causal ones in the decoder, none on
cross-attention) shared by the later blocks, ``relu`` or ``gated-gelu``
(gelu_new) FFN, lm_head tied to ``shared`` with the d_model**-0.5 rescale.
Adapter (EqHard): ``a(x) = i2o(relu(o2i(x))) + x`` applied to each decoder
sublayer's output before its residual add: ``h = h + a_k(sublayer(norm(h)))``.

Token ids (T5): pad 0 (= decoder start), eos 1, unk 2. The decoding contracts
(greedy, beam, sample, ranking) are documented on the functions and in
README_dialogue.md.
"""

import collections
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nz_sampler_ref import GOLDEN64, NzRng, _nz_argmax, nz_sample, row_seed  # noqa: F401 (re-exported)
from safetensors_io import read_safetensors, write_safetensors  # noqa: F401 (re-exported: R.read_safetensors)

PAD, EOS, UNK = 0, 1, 2
DECODER_START = PAD
SEP_PIECE = "<sep>"    # control symbol between context turns (id 3 in our spm models)
MASK_PIECE = "<mask>"  # control symbol of the denoising pre-training (id 4)

# config.json: HF T5Config names + the multi-decoder and dialogue keys.
DEFAULT_CONFIG = dict(
    architecture="t5_multidecoder", model_type="t5",
    vocab_size=8000, d_model=256, d_kv=64, d_ff=1024,
    num_layers=4, num_decoder_layers=4, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, feed_forward_proj="relu", tie_word_embeddings=True,
    dropout_rate=0.1, initializer_factor=1.0,
    pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=DECODER_START,
    num_modes=1, multidecoder="adapter", adapter_hidden_size=128,
    # dialogue input (see join_context); "" = turns joined as text with one space
    turn_separator=SEP_PIECE, max_context_turns=0, max_source_length=128,
    max_target_length=64, unk_token_id=UNK,
)
MULTIDECODER_KINDS = ("adapter", "transformer", "none")  # "none": plain T5 (K = 1, no adapters)


def make_config(cfg=None, **kw):
    """Complete a config dict with DEFAULT_CONFIG and check it."""
    c = dict(DEFAULT_CONFIG)
    if cfg:
        c.update({k: v for k, v in dict(cfg).items() if v is not None})
    c.update({k: v for k, v in kw.items() if v is not None})
    if c.get("num_decoder_layers") is None:
        c["num_decoder_layers"] = c["num_layers"]
    if c["multidecoder"] not in MULTIDECODER_KINDS:
        raise ValueError("multidecoder must be one of %s, got %r" % (MULTIDECODER_KINDS, c["multidecoder"]))
    if c["multidecoder"] == "none":
        c["num_modes"] = 1
    if int(c["num_modes"]) < 1:
        raise ValueError("num_modes must be >= 1")
    act_kind(c["feed_forward_proj"])
    for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        if c[k] != DEFAULT_CONFIG[k]:
            raise ValueError("%s must be %d (T5 ids)" % (k, DEFAULT_CONFIG[k]))
    return c


# ------------------------------------------------------------------ maths

def gelu_new(x):
    """HF gelu_new (tanh approximation), as T5 v1.1's gated-gelu uses."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_new, "silu": F.silu}


def act_kind(ff):
    """feed_forward_proj -> (activation name, gated) as HF T5Config parses it."""
    parts = ff.split("-")
    gated = len(parts) > 1
    if (gated and parts[0] != "gated") or len(parts) > 2:
        raise ValueError("bad feed_forward_proj %r" % ff)
    act = parts[-1]
    if ff == "gated-gelu":
        act = "gelu_new"
    if act not in _ACTS:
        raise ValueError("feed_forward_proj %r: activation %r not supported" % (ff, act))
    return act, gated


def relative_position_bucket(rel, bidirectional, num_buckets, max_distance):
    """HF T5Attention._relative_position_bucket (rel = key_pos - query_pos), fp32 log as there."""
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


class T5LayerNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight (no mean subtraction, no bias)."""

    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


class T5DenseActDense(nn.Module):
    """T5DenseReluDense (wi, wo) or the gated T5DenseGatedGeluDense (wi_0, wi_1, wo)."""

    def __init__(self, c):
        super().__init__()
        self.act_name, self.gated = act_kind(c["feed_forward_proj"])
        if self.gated:
            self.wi_0 = nn.Linear(c["d_model"], c["d_ff"], bias=False)
            self.wi_1 = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        else:
            self.wi = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        self.wo = nn.Linear(c["d_ff"], c["d_model"], bias=False)
        self.p = c["dropout_rate"]

    def forward(self, x):
        act = _ACTS[self.act_name]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        return self.wo(F.dropout(h, self.p, self.training))


class Adapter(nn.Module):
    """EqHard-EM Adapter: i2o(relu(o2i(x))) + x (both linears with bias)."""

    def __init__(self, d, r):
        super().__init__()
        self.o2i = nn.Linear(d, r)
        self.i2o = nn.Linear(r, d)

    def forward(self, x):
        return self.i2o(F.relu(self.o2i(x))) + x


class T5Attention(nn.Module):
    def __init__(self, c, has_relative_attention_bias):
        super().__init__()
        self.H, self.dk = c["num_heads"], c["d_kv"]
        inner = self.H * self.dk
        self.q = nn.Linear(c["d_model"], inner, bias=False)
        self.k = nn.Linear(c["d_model"], inner, bias=False)
        self.v = nn.Linear(c["d_model"], inner, bias=False)
        self.o = nn.Linear(inner, c["d_model"], bias=False)
        self.num_buckets = c["relative_attention_num_buckets"]
        self.max_distance = c["relative_attention_max_distance"]
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.H)
        self.p = c["dropout_rate"]

    def split(self, x):  # [N, T, H*dk] -> [N, H, T, dk]
        return x.view(x.shape[0], x.shape[1], self.H, self.dk).transpose(1, 2)

    def compute_bias(self, Tq, Tk, q0, bidirectional):
        """[1, H, Tq, Tk]: table[bucket(k_pos - q_pos)] for queries q0.. and keys 0.."""
        qpos = torch.arange(Tq, dtype=torch.long)[:, None] + q0
        kpos = torch.arange(Tk, dtype=torch.long)[None, :]
        b = relative_position_bucket(kpos - qpos, bidirectional, self.num_buckets, self.max_distance)
        b = b.to(self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)

    def attend(self, q, k, v, bias, mask):
        """q [N,H,Tq,dk], k/v [N,H,Tk,dk]; bias broadcastable to scores (or None);
        mask bool broadcastable, True = not attended. Returns o(...) [N,Tq,d]."""
        s = torch.matmul(q, k.transpose(-1, -2))
        if bias is not None:
            s = s + bias
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        p = torch.softmax(s.float(), dim=-1).type_as(s)
        p = F.dropout(p, self.p, self.training)
        o = torch.matmul(p, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], self.H * self.dk)
        return self.o(o)


def apply_adapters(adapters, x, groups):
    """Adapter of decoder k on rows [s, e) for each (k, s, e) in groups (contiguous, in order)."""
    if adapters is None:
        return x
    if len(groups) == 1:
        k, s, e = groups[0]
        return adapters[k](x)
    return torch.cat([adapters[k](x[s:e]) for k, s, e in groups], dim=0)


def _adapter_list(c, n):
    if n == 0:
        return None
    return nn.ModuleList([Adapter(c["d_model"], c["adapter_hidden_size"]) for _ in range(n)])


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c, has_bias, n_adapters):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_bias)
        self.layer_norm = T5LayerNorm(c["d_model"], c["layer_norm_epsilon"])
        self.adapters = _adapter_list(c, n_adapters)
        self.p = c["dropout_rate"]

    def forward(self, x, bias, mask, past=None, groups=None):
        a = self.SelfAttention
        h = self.layer_norm(x)
        q, k, v = a.split(a.q(h)), a.split(a.k(h)), a.split(a.v(h))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        o = apply_adapters(self.adapters, a.attend(q, k, v, bias, mask), groups)
        return x + F.dropout(o, self.p, self.training), (k, v)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, c, n_adapters):
        super().__init__()
        self.EncDecAttention = T5Attention(c, False)
        self.layer_norm = T5LayerNorm(c["d_model"], c["layer_norm_epsilon"])
        self.adapters = _adapter_list(c, n_adapters)
        self.p = c["dropout_rate"]

    def kv(self, enc):
        a = self.EncDecAttention
        return a.split(a.k(enc)), a.split(a.v(enc))

    def forward(self, x, kv, mask, groups=None):
        a = self.EncDecAttention
        q = a.split(a.q(self.layer_norm(x)))
        o = apply_adapters(self.adapters, a.attend(q, kv[0], kv[1], None, mask), groups)
        return x + F.dropout(o, self.p, self.training)


class T5LayerFF(nn.Module):
    def __init__(self, c, n_adapters):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(c)
        self.layer_norm = T5LayerNorm(c["d_model"], c["layer_norm_epsilon"])
        self.adapters = _adapter_list(c, n_adapters)
        self.p = c["dropout_rate"]

    def forward(self, x, groups=None):
        o = apply_adapters(self.adapters, self.DenseReluDense(self.layer_norm(x)), groups)
        return x + F.dropout(o, self.p, self.training)


class T5Block(nn.Module):
    def __init__(self, c, is_decoder, has_bias, n_adapters):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_bias, n_adapters)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(c, n_adapters))
        self.layer.append(T5LayerFF(c, n_adapters))


class T5Stack(nn.Module):
    """Encoder or decoder stack. embed_tokens is a module only for the
    "transformer" variant's decoders (each has its own copy); otherwise the
    caller passes the shared embedding."""

    def __init__(self, c, is_decoder, n_adapters=0, own_embedding=False):
        super().__init__()
        n = c["num_decoder_layers"] if is_decoder else c["num_layers"]
        if own_embedding:
            self.embed_tokens = nn.Embedding(c["vocab_size"], c["d_model"])
        self.block = nn.ModuleList([T5Block(c, is_decoder, i == 0, n_adapters) for i in range(n)])
        self.final_layer_norm = T5LayerNorm(c["d_model"], c["layer_norm_epsilon"])
        self.is_decoder = is_decoder
        self.p = c["dropout_rate"]

    def bias_table_owner(self):
        return self.block[0].layer[0].SelfAttention


class DecoderState:
    """Incremental decoding state of N decoder rows.

    groups: [(k, s, e)] contiguous row ranges in order, rows [s, e) decode with
    decoder k (the same k may appear in several groups). cross[i] = (K, V) of
    block i's cross-attention [N, H, S, dk]; past[i] = (K, V) of block i's
    self-attention [N, H, length, dk] (None before the first step)."""

    def __init__(self, groups, enc_pad, cross, use_cache=True):
        self.groups = list(groups)
        self.enc_pad = enc_pad
        self.cross = cross
        self.past = None
        self.length = 0
        self.use_cache = use_cache

    def reorder(self, rows):
        """Keep rows `rows` (LongTensor [N']) in that order (beam search); the
        caller keeps the groups valid (rows stay inside their group)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.enc_pad.device)
        self.enc_pad = self.enc_pad.index_select(0, rows)
        self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
        if self.past is not None:
            self.past = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.past]


def check_groups(groups, N):
    pos = 0
    for k, s, e in groups:
        if s != pos or e < s:
            raise ValueError("groups must be contiguous row ranges in order: %r" % (groups,))
        pos = e
    if pos != N:
        raise ValueError("groups cover %d rows, batch has %d" % (pos, N))


class T5MultiDecoder(nn.Module):
    """Encoder + K decoders (EqHard-EM MultiAdapterT5 / MultiDecoderT5)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = make_config(config)
        self.kind = c["multidecoder"]
        self.num_modes = int(c["num_modes"])
        self.shared = nn.Embedding(c["vocab_size"], c["d_model"])
        self.encoder = T5Stack(c, False)
        if self.kind == "transformer":
            self.decoders = nn.ModuleList([T5Stack(c, True, 0, own_embedding=True)
                                           for _ in range(self.num_modes)])
        else:
            self.decoder = T5Stack(c, True, self.num_modes if self.kind == "adapter" else 0)
        if not c["tie_word_embeddings"]:
            self.lm_head = nn.Linear(c["d_model"], c["vocab_size"], bias=False)
        self.p = c["dropout_rate"]

    # -------------------------------------------------------------- encoder

    def encode(self, src, src_pad):
        """src [B, S] ids, src_pad [B, S] bool (True = padding) -> [B, S, d]."""
        enc = self.encoder
        x = F.dropout(self.shared(src), self.p, self.training)
        S = src.shape[1]
        bias = enc.bias_table_owner().compute_bias(S, S, 0, True)
        mask = src_pad[:, None, None, :]
        for blk in enc.block:
            x, _ = blk.layer[0](x, bias, mask)
            x = blk.layer[1](x)
        return F.dropout(enc.final_layer_norm(x), self.p, self.training)

    # -------------------------------------------------------------- decoder

    def decoder_stack(self, k):
        return self.decoders[k] if self.kind == "transformer" else self.decoder

    def init_state(self, enc, src_pad, row_src, groups, use_cache=True):
        """Decoder state for N rows: row r reads source row_src[r] of enc [B, S, d]."""
        row_src = torch.as_tensor(row_src, dtype=torch.long, device=enc.device)
        N = row_src.shape[0]
        check_groups(groups, N)
        for k, _, _ in groups:
            if not 0 <= k < self.num_modes:
                raise ValueError("decoder %d out of range (K = %d)" % (k, self.num_modes))
        if self.kind == "transformer":
            cross = None
            for k, s, e in groups:
                st = self.decoders[k]
                part = [blk.layer[1].kv(enc) for blk in st.block]
                part = [(a[row_src[s:e]], b[row_src[s:e]]) for a, b in part]
                cross = part if cross is None else [(torch.cat([a0, a1]), torch.cat([b0, b1]))
                                                    for (a0, b0), (a1, b1) in zip(cross, part)]
        else:
            cross = [blk.layer[1].kv(enc) for blk in self.decoder.block]
            cross = [(a[row_src], b[row_src]) for a, b in cross]
        return DecoderState(groups, src_pad[row_src], cross, use_cache)

    def _run_stack(self, st, x, cross, enc_pad, past, t0, groups):
        T = x.shape[1]
        bias = st.bias_table_owner().compute_bias(T, t0 + T, t0, False)
        causal = torch.arange(t0 + T, device=x.device)[None, :] > (torch.arange(T, device=x.device)[:, None] + t0)
        cmask = enc_pad[:, None, None, :]
        x = F.dropout(x, self.p, self.training)
        new_past = []
        for i, blk in enumerate(st.block):
            x, kv = blk.layer[0](x, bias, causal, None if past is None else past[i], groups)
            new_past.append(kv)
            x = blk.layer[1](x, cross[i], cmask, groups)
            x = blk.layer[2](x, groups)
        return F.dropout(st.final_layer_norm(x), self.p, self.training), new_past

    def decode(self, tokens, state):
        """Append tokens [N, T] (positions state.length ..) and return logits [N, T, V].
        With state.use_cache the self-attention keys/values are kept for the next call."""
        N, T = tokens.shape
        t0 = state.length
        if self.kind == "transformer":
            hs, pasts = [], []
            for k, s, e in state.groups:
                st = self.decoders[k]
                cross = [(a[s:e], b[s:e]) for a, b in state.cross]
                past = None if state.past is None else [(a[s:e], b[s:e]) for a, b in state.past]
                h, p = self._run_stack(st, st.embed_tokens(tokens[s:e]), cross, state.enc_pad[s:e], past, t0, None)
                hs.append(h)
                pasts.append(p)
            h = torch.cat(hs, dim=0)
            new_past = [(torch.cat([p[i][0] for p in pasts]), torch.cat([p[i][1] for p in pasts]))
                        for i in range(len(pasts[0]))]
        else:
            groups = state.groups if self.kind == "adapter" else None
            h, new_past = self._run_stack(self.decoder, self.shared(tokens), state.cross, state.enc_pad,
                                          state.past, t0, groups)
        if state.use_cache:
            state.past = new_past
        state.length = t0 + T
        return self.lm_logits(h)

    def lm_logits(self, h):
        if self.config["tie_word_embeddings"]:
            return F.linear(h * (self.config["d_model"] ** -0.5), self.shared.weight)
        return self.lm_head(h)

    def forward(self, src, src_pad, dec_in, k=0):
        """Teacher-forced logits [B, T, V] of decoder k (training / full forward)."""
        enc = self.encode(src, src_pad)
        B = src.shape[0]
        state = self.init_state(enc, src_pad, torch.arange(B, device=src.device), [(k, 0, B)], use_cache=False)
        return self.decode(dec_in, state)

    def forward_encoded(self, enc, src_pad, dec_in, k):
        B = enc.shape[0]
        state = self.init_state(enc, src_pad, torch.arange(B, device=enc.device), [(k, 0, B)], use_cache=False)
        return self.decode(dec_in, state)


# ------------------------------------------------------------------ init / phase 2 construction

def init_weights(model, seed=None):
    """HF T5PreTrainedModel._init_weights (factor 1) for the T5 parts; adapters keep
    PyTorch's nn.Linear default init (HF's _init_weights does not touch them, so
    EqHard-EM's adapters start that way too)."""
    if seed is not None:
        torch.manual_seed(seed)
    c = model.config
    f = c["initializer_factor"]
    d, dff, H, dk = c["d_model"], c["d_ff"], c["num_heads"], c["d_kv"]
    with torch.no_grad():
        model.shared.weight.normal_(0.0, f * 1.0)
        for m in model.modules():
            if isinstance(m, T5LayerNorm):
                m.weight.fill_(f * 1.0)
            elif isinstance(m, T5DenseActDense):
                for n in ("wi", "wi_0", "wi_1"):
                    if hasattr(m, n):
                        getattr(m, n).weight.normal_(0.0, f * d ** -0.5)
                m.wo.weight.normal_(0.0, f * dff ** -0.5)
            elif isinstance(m, T5Attention):
                m.q.weight.normal_(0.0, f * (d * dk) ** -0.5)
                m.k.weight.normal_(0.0, f * d ** -0.5)
                m.v.weight.normal_(0.0, f * d ** -0.5)
                m.o.weight.normal_(0.0, f * (H * dk) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    m.relative_attention_bias.weight.normal_(0.0, f * d ** -0.5)
        if hasattr(model, "lm_head"):
            model.lm_head.weight.normal_(0.0, f * 1.0)
        if model.kind == "transformer":
            for st in model.decoders:
                st.embed_tokens.weight.copy_(model.shared.weight)
    return model


def multi_from_single(single, num_modes, kind="adapter", adapter_hidden_size=None, seed=0, adapter_init="default"):
    """EqHard-EM's ``from_single_pretrained``: a K-decoder model from a plain T5
    ("none") one. adapter: shared weights loaded, adapters freshly initialised
    (nn.Linear default, torch seed `seed`; adapter_init "zero" then zeroes each
    adapter's output projection i2o, so that every decoder starts as the single
    model's decoder exactly); transformer: K copies of the decoder (each with its
    own copy of the embedding as copy.deepcopy gives)."""
    if adapter_init not in ("default", "zero"):
        raise ValueError("adapter_init %r: default or zero" % adapter_init)
    c = dict(single.config)
    c.update(multidecoder=kind, num_modes=num_modes)
    if adapter_hidden_size:
        c["adapter_hidden_size"] = adapter_hidden_size
    torch.manual_seed(seed)
    m = T5MultiDecoder(c)
    sd = single.state_dict()
    if kind == "transformer":
        new = {}
        for k, v in sd.items():
            if k.startswith("decoder."):
                for i in range(num_modes):
                    new["decoders.%d.%s" % (i, k[len("decoder."):])] = v
            else:
                new[k] = v
        for i in range(num_modes):
            new["decoders.%d.embed_tokens.weight" % i] = sd["shared.weight"]
        m.load_state_dict(new, strict=True)
    else:
        missing, unexpected = m.load_state_dict(sd, strict=False)
        if unexpected or any(".adapters." not in k for k in missing):
            raise ValueError("phase-1 state mismatch: missing %s unexpected %s" % (missing, unexpected))
        if adapter_init == "zero":
            with torch.no_grad():
                for mod in m.modules():
                    if isinstance(mod, Adapter):
                        mod.i2o.weight.zero_()
                        mod.i2o.bias.zero_()
    return m


# ------------------------------------------------------------------ EqHard-EM assignment

def eqhard_assign(losses):
    """EqHard-EM's ``EqualSizeHardEmTrainer.assign``: per_sample_loss [B, K] ->
    decoder index per sample (np.int64 [B]).

    EqHard-EM repeats each column ceil(B / K) times and solves the rectangular
    assignment with scipy's linear_sum_assignment (every sample gets one slot,
    each decoder has ceil(B / K) slots; B = K * batch_size in training, so each
    decoder gets exactly batch_size samples), minimising the summed loss. This
    is the same capacitated problem solved exactly by successive shortest
    augmenting paths over the K decoders (no scipy here): samples are added in
    order, each along the cheapest chain of moves that ends at a decoder with a
    free slot. The total is optimal; among equal-cost optima the pick may
    differ from scipy's."""
    C = np.asarray(losses.detach().cpu().numpy() if torch.is_tensor(losses) else losses, dtype=np.float64)
    B, K = C.shape
    cap = -(-B // K)
    assign = np.full(B, -1, dtype=np.int64)
    count = np.zeros(K, dtype=np.int64)
    eps = 1e-12 * max(1.0, float(np.abs(C).max()) if C.size else 1.0)
    ar = np.arange(K)
    for i in range(B):
        # W[a, b]: cheapest move of a sample now in a to b, Wrow[a, b] that sample
        W = np.full((K, K), np.inf)
        Wrow = np.full((K, K), -1, dtype=np.int64)
        for a in range(K):
            rows = np.nonzero(assign == a)[0]
            if len(rows) == 0:
                continue
            d = C[rows] - C[rows, a][:, None]
            j = d.argmin(axis=0)
            W[a] = d[j, ar]
            Wrow[a] = rows[j]
            W[a, a] = np.inf
        dist = C[i].copy()
        pred = np.full(K, -1, dtype=np.int64)
        for _ in range(K):  # Bellman-Ford (no negative cycles: the current assignment is optimal)
            cand = dist[:, None] + W
            a_best = cand.argmin(axis=0)
            nd = cand[a_best, ar]
            upd = nd < dist - eps
            if not upd.any():
                break
            dist[upd] = nd[upd]
            pred[upd] = a_best[upd]
        free = np.nonzero(count < cap)[0]
        m = int(free[np.argmin(dist[free])])
        count[m] += 1
        seen = 0
        while pred[m] >= 0:
            a = int(pred[m])
            assign[Wrow[a, m]] = m
            m = a
            seen += 1
            if seen > K:
                raise RuntimeError("eqhard_assign: cycle in the augmenting path")
        assign[i] = m
    return assign


# ------------------------------------------------------------------ tokenizer

class Tokenizer:
    """SentencePiece with T5 ids (pad 0, eos 1, unk 2) and the dialogue input contract."""

    def __init__(self, spm_path, turn_separator=SEP_PIECE, max_context_turns=0, max_source_length=128,
                 max_target_length=64):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=spm_path)
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (PAD, EOS, UNK):
            raise ValueError("%s: not a T5-id SentencePiece model (pad %d eos %d unk %d)" % (
                spm_path, self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()))
        self.turn_separator = turn_separator or ""
        self.sep_id = None
        if self.turn_separator:
            sid = self.sp.piece_to_id(self.turn_separator)
            if sid == UNK:
                raise ValueError("turn separator %r is not a piece of %s" % (self.turn_separator, spm_path))
            self.sep_id = sid
        self.max_context_turns = int(max_context_turns or 0)
        self.max_source_length = int(max_source_length or 0)
        self.max_target_length = int(max_target_length or 0)

    @classmethod
    def from_config(cls, spm_path, config):
        c = config
        return cls(spm_path, c.get("turn_separator", ""), c.get("max_context_turns", 0),
                   c.get("max_source_length", 0), c.get("max_target_length", 0))

    def __len__(self):
        return self.sp.get_piece_size()

    def encode(self, text):
        return list(self.sp.encode(text))

    def decode(self, ids):
        """Text of ids up to the first eos; pad/unk/control pieces dropped (HF skip_special_tokens)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, UNK) or i >= len(self) or self.sp.is_control(i):
                continue
            out.append(i)
        return self.sp.decode(out)

    def encode_context(self, turns):
        return join_context(turns, self)

    def encode_response(self, text):
        """Training target: pieces + eos, cut to max_target_length (EqHard-EM's
        tokenizer(..., truncation=True): a cut response loses its eos)."""
        ids = self.encode(text.strip()) + [EOS]
        if self.max_target_length > 0:
            ids = ids[:self.max_target_length]
        return ids


def join_context(turns, tok):
    """Model input ids of a dialogue context (oldest turn first), as training builds them:

    1. a str is one turn; each turn is str.strip()-ed; with max_context_turns > 0
       only the last max_context_turns turns are kept;
    2. turn_separator set (our models: the control piece "<sep>"): each turn is
       encoded on its own and the separator id goes between turns;
       turn_separator "" (converted EqHard-EM models): the turns are joined with
       one space and encoded once;
    3. with max_source_length > 0 only the last max_source_length - 1 ids are
       kept (the most recent context);
    4. eos is appended (EqHard-EM: tokenizer(context + ' </s>')).
    """
    if isinstance(turns, str):
        turns = [turns]
    turns = [str(t).strip() for t in turns]
    if tok.max_context_turns > 0:
        turns = turns[-tok.max_context_turns:]
    if tok.sep_id is None:
        ids = tok.encode(" ".join(turns))
    else:
        ids = []
        for i, t in enumerate(turns):
            if i:
                ids.append(tok.sep_id)
            ids.extend(tok.encode(t))
    if tok.max_source_length > 0 and len(ids) > tok.max_source_length - 1:
        ids = ids[len(ids) - (tok.max_source_length - 1):]
    return ids + [EOS]


# ------------------------------------------------------------------ decoding

def pad_batch(seqs, pad=PAD):
    """Right-padded LongTensor [B, S] and its padding mask (True = pad)."""
    n = max(len(s) for s in seqs)
    t = torch.full((len(seqs), n), pad, dtype=torch.long)
    m = torch.ones((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        m[i, :len(s)] = False
    return t, m


def _prepare(model, src_ids, decoders, per_item_rows=1):
    """Encode the sources once; rows are decoder-major: row = (j * B + b) * per_item_rows + r."""
    if decoders is None:
        decoders = list(range(model.num_modes))
    decoders = [int(k) for k in decoders]
    if isinstance(src_ids[0], int):
        src_ids = [src_ids]
    dev = model.shared.weight.device
    src, src_pad = pad_batch(src_ids)
    src, src_pad = src.to(dev), src_pad.to(dev)
    enc = model.encode(src, src_pad)
    B, D = len(src_ids), len(decoders)
    R = per_item_rows
    row_src = torch.arange(B, device=dev).repeat_interleave(R).repeat(D)
    groups = [(k, j * B * R, (j + 1) * B * R) for j, k in enumerate(decoders)]
    state = model.init_state(enc, src_pad, row_src, groups)
    return decoders, B, state


def _processed(logits, ban_unk):
    """EqHard-EM generate(): bad_words_ids=[[unk]] -> the unk logit is -inf."""
    logits = logits.float().clone()
    if ban_unk:
        logits[:, UNK] = float("-inf")
    return logits


def banned_ngram_tokens(seq, n):
    """HF NoRepeatNGramLogitsProcessor for one row (transformers' _get_ngrams,
    _get_generated_ngrams, _calc_banned_ngram_tokens): seq = the row's decoder input
    so far ([DECODER_START] + the tokens generated), n = no_repeat_ngram_size (0 = off).

    With cur_len = len(seq): nothing is banned when cur_len + 1 < n; otherwise the
    banned tokens are every t such that seq[cur_len - n + 1:] + [t] already occurs in
    seq (as seq[s:s + n], s + n <= cur_len). n = 1 bans every token of seq, the start
    token 0 included. Returns a set of ids."""
    seq = [int(t) for t in seq]
    cur_len = len(seq)
    if n <= 0 or cur_len + 1 < n:
        return set()
    ngrams = {}  # (n - 1)-gram prefix -> the tokens that followed it
    for g in zip(*[seq[i:] for i in range(n)]):
        ngrams.setdefault(g[:-1], []).append(g[-1])
    return set(ngrams.get(tuple(seq[cur_len + 1 - n:cur_len]), []))


def _ban_ngrams(scores, rows, n):
    """scores[r, t] = -inf for the banned_ngram_tokens of each (r, seq) in rows (n > 0)."""
    for r, seq in rows:
        banned = banned_ngram_tokens(seq, n)
        if banned:
            scores[r, sorted(banned)] = float("-inf")


def _result(k, toks, lps, finished):
    s = float(sum(float(x) for x in lps))
    return {"decoder": k, "tokens": list(toks), "token_logprobs": [float(x) for x in lps],
            "sum_logprob": s, "mean_logprob": s / len(toks) if toks else 0.0, "finished": finished}


def _autoregress(model, src_ids, decoders, max_new_tokens, ban_unk, pick, no_repeat_ngram=0):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            decoders, B, state = _prepare(model, src_ids, decoders)
            N = B * len(decoders)
            dev = model.shared.weight.device
            toks = [[] for _ in range(N)]
            lps = [[] for _ in range(N)]
            done = [False] * N
            inp = torch.full((N, 1), DECODER_START, dtype=torch.long, device=dev)
            for step in range(max_new_tokens):
                logits = _processed(model.decode(inp, state)[:, -1], ban_unk)
                if no_repeat_ngram:  # on the logits, before the pick and the log_softmax
                    _ban_ngrams(logits, [(r, [DECODER_START] + toks[r]) for r in range(N) if not done[r]],
                                no_repeat_ngram)
                logp = torch.log_softmax(logits, dim=-1).cpu().numpy()
                ln = logits.cpu().numpy()
                nxt = [PAD] * N
                for r in range(N):
                    if done[r]:
                        continue
                    t = pick(r, ln[r])
                    toks[r].append(t)
                    lps[r].append(logp[r, t])
                    nxt[r] = t
                    if t == EOS:
                        done[r] = True
                if all(done):
                    break
                inp = torch.tensor(nxt, dtype=torch.long, device=dev)[:, None]
    finally:
        model.train(was)
    out = [[None] * len(decoders) for _ in range(B)]
    for j, k in enumerate(decoders):
        for b in range(B):
            r = j * B + b
            out[b][j] = _result(k, toks[r], lps[r], done[r])
    return out


def greedy(model, src_ids, decoders=None, max_new_tokens=63, ban_unk=True, no_repeat_ngram=0):
    """Greedy decoding of each source with each decoder in `decoders` (HF greedy_search
    as EqHard-EM's generate() calls it: bad_words_ids=[[unk]], max_length = 1 +
    max_new_tokens, so EqHard's max_length=64 is max_new_tokens=63).

    src_ids: list of id lists (each ends with eos, see join_context) or one list.
    Per step and row: logits of the last position, unk -> -inf, with no_repeat_ngram
    n > 0 the row's banned_ngram_tokens([DECODER_START] + its tokens, n) -> -inf too
    (HF no_repeat_ngram_size), next = first argmax; a row stops after emitting eos
    (eos is part of tokens) or max_new_tokens tokens.
    Returns out[b][j] for source b and decoders[j]: dict tokens, token_logprobs
    (log_softmax of the masked logits at the chosen token, EqHard generate()'s
    greedy score), sum_logprob, mean_logprob (float64 sum / len(tokens)), finished."""
    return _autoregress(model, src_ids, decoders, max_new_tokens, ban_unk, lambda r, row: _nz_argmax(row),
                        no_repeat_ngram)


def sample(model, src_ids, decoders=None, temperature=1.0, top_k=0, top_p=1.0, seed=0, max_new_tokens=63,
           ban_unk=True, no_repeat_ngram=0):
    """Sampling with the engine's nz_sample / nz_rng contract (engine/nz_ops.h).

    Row (source b, decoder k) draws from its own stream nz_rng_seed(row_seed(s, k)),
    s = seed (an int: every source) or seed[b] (a list); one draw per generated token
    (none when temperature <= 0 or top_k == 1: that is greedy), on the unk-masked
    (and, with no_repeat_ngram, n-gram-masked as in greedy) float32 logits. Finished
    rows draw nothing. Outputs as greedy(); token_logprobs are log_softmax of the
    masked logits (no temperature)."""
    decs = list(range(model.num_modes)) if decoders is None else [int(k) for k in decoders]
    srcs = [src_ids] if isinstance(src_ids[0], int) else src_ids
    B = len(srcs)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * B
    rngs = [NzRng(row_seed(seeds[b], k)) for k in decs for b in range(B)]
    return _autoregress(model, srcs, decs, max_new_tokens, ban_unk,
                        lambda r, row: nz_sample(row, temperature, top_k, top_p, rngs[r]), no_repeat_ngram)


class _BeamHyps:
    """HF BeamHypotheses (transformers 4.x before the decoder_prompt_len change)."""

    def __init__(self, num_beams, length_penalty, early_stopping):
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.beams = []
        self.worst_score = 1e9

    def add(self, hyp_len, sum_logprobs, payload):
        score = sum_logprobs / (hyp_len ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, payload))
            if len(self.beams) > self.num_beams:
                srt = sorted([(s, i) for i, (s, _) in enumerate(self.beams)])
                del self.beams[srt[0][1]]
                self.worst_score = srt[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_sum_logprobs / cur_len ** self.length_penalty


def _stable_topk_desc(x, k):
    """Top k of each row of x [R, M] (descending; ties: lower index first)."""
    vals, idx = torch.sort(x, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


def beam(model, src_ids, decoders=None, beam_size=4, max_new_tokens=63, length_penalty=1.0, num_return=1,
         early_stopping=False, ban_unk=True, no_repeat_ngram=0):
    """Beam search of each (source, decoder) pair, HF beam_search + BeamSearchScorer
    as EqHard-EM's generate() uses them (transformers 4.x of 2021-22), exactly:

    * beam scores start [0, -1e9, ...] (float32); per step
      scores = log_softmax(logits) (float32), unk -> -inf, with no_repeat_ngram n > 0
      each beam's banned_ngram_tokens([DECODER_START] + that beam's tokens, n) -> -inf
      (HF applies its logits processors after the log_softmax in beam search),
      + beam score; flattened
      over (beam, token) and the top 2 * beam_size taken (ties: lower flat index);
    * candidates in that order: an eos candidate ranked < beam_size becomes a
      hypothesis (tokens so far, sum = its score) with score sum / len ** length_penalty,
      len = tokens so far + 1 (the decoder start token counts, eos does not); eos
      candidates ranked >= beam_size are skipped; other candidates fill the next
      beam_size beams;
    * the item is done once it holds beam_size hypotheses and (early_stopping or
      worst kept score >= best candidate score / cur_len ** length_penalty, cur_len =
      1 + tokens so far before this step);
    * after max_new_tokens steps (or when all items are done) the live beams of items
      not done are offered as hypotheses (len = 1 + max_new_tokens, no eos);
    * the best num_return hypotheses by score (ties: the later added) are returned.

    Returns out[b][j] = list of num_return dicts (tokens incl. eos when ended by eos,
    token_logprobs = the log_softmax values the beam summed, sum/mean_logprob,
    beam_score = the HF sequences_score, finished)."""
    nb = int(beam_size)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            decoders, B, state = _prepare(model, src_ids, decoders, per_item_rows=nb)
            items = B * len(decoders)
            N = items * nb
            dev = model.shared.weight.device
            V = model.config["vocab_size"]
            max_length = 1 + int(max_new_tokens)
            beam_scores = torch.zeros(items, nb, dtype=torch.float32)
            beam_scores[:, 1:] = -1e9
            beam_scores = beam_scores.view(-1)
            seqs = [[] for _ in range(N)]        # tokens after the start token
            seq_lps = [[] for _ in range(N)]
            hyps = [_BeamHyps(nb, length_penalty, early_stopping) for _ in range(items)]
            done = [False] * items
            inp = torch.full((N, 1), DECODER_START, dtype=torch.long, device=dev)
            cur_len = 1
            while True:
                logits = model.decode(inp, state)[:, -1].float()
                lp = torch.log_softmax(logits, dim=-1).cpu()
                if ban_unk:
                    lp[:, UNK] = float("-inf")
                if no_repeat_ngram:
                    _ban_ngrams(lp, [(r, [DECODER_START] + seqs[r]) for r in range(N) if not done[r // nb]],
                                no_repeat_ngram)
                scores = (lp + beam_scores[:, None]).view(items, nb * V)
                top_s, top_i = _stable_topk_desc(scores, 2 * nb)
                nxt_scores = torch.zeros(items, nb, dtype=torch.float32)
                nxt_tok = torch.full((items, nb), PAD, dtype=torch.long)
                nxt_row = torch.arange(N, dtype=torch.long).view(items, nb).clone()
                for it in range(items):
                    if done[it]:
                        continue
                    bi = 0
                    for rank in range(2 * nb):
                        flat = int(top_i[it, rank])
                        tok, src_beam = flat % V, flat // V
                        row = it * nb + src_beam
                        sc = top_s[it, rank]
                        if tok == EOS:
                            if rank >= nb:
                                continue
                            hyps[it].add(cur_len, float(sc),
                                         (seqs[row] + [EOS], seq_lps[row] + [float(lp[row, EOS])], True))
                        else:
                            nxt_scores[it, bi] = sc
                            nxt_tok[it, bi] = tok
                            nxt_row[it, bi] = row
                            bi += 1
                        if bi == nb:
                            break
                    if bi < nb:
                        raise ValueError("beam: fewer than beam_size non-eos candidates (vocabulary too small)")
                    done[it] = done[it] or hyps[it].is_done(float(top_s[it].max()), cur_len)
                rows = nxt_row.view(-1)
                toks = nxt_tok.view(-1)
                seqs = [seqs[int(r)] + [int(t)] for r, t in zip(rows, toks)]
                seq_lps = [seq_lps[int(r)] + [float(lp[int(r), int(t)])] for r, t in zip(rows, toks)]
                beam_scores = nxt_scores.view(-1)
                state.reorder(rows.to(dev))
                inp = toks.to(dev)[:, None]
                cur_len += 1
                if all(done) or cur_len >= max_length:
                    break
            for it in range(items):
                if done[it]:
                    continue
                for bm in range(nb):
                    r = it * nb + bm
                    hyps[it].add(cur_len, float(beam_scores[r]), (seqs[r], seq_lps[r], False))
    finally:
        model.train(was)
    out = [[None] * len(decoders) for _ in range(B)]
    for j, k in enumerate(decoders):
        for b in range(B):
            it = j * B + b
            srt = sorted(hyps[it].beams, key=lambda x: x[0])
            res = []
            for _ in range(min(num_return, len(srt))):
                score, (toks, lps, fin) = srt.pop()
                r = _result(k, toks, lps, fin)
                r["beam_score"] = score
                res.append(r)
            out[b][j] = res
    return out


def rank(results, key="mean_logprob"):
    """EqHard-EM's perplexity ranking (evaluate_generations.select_by_column on
    score = exp(-mean log-prob), lowest first): the responses of one source sorted by
    `key` descending; ties keep the given (decoder) order. Use key="beam_score" for
    beam outputs to rank by HF's sequences_scores as EqHard-EM's beam runs do;
    key="consensus" ranks by consensus() (ties by mean log-prob), as nz_t5md_rank; results that carry
    a "consensus" (consensus_pool's) are ranked by it."""
    if key == "consensus":
        given = all("consensus" in r for r in results)  # e.g. consensus_pool's
        cons = [r["consensus"] for r in results] if given else consensus([r["tokens"] for r in results])
        order = sorted(range(len(results)), key=lambda i: (-cons[i], -results[i]["mean_logprob"]))
        return [dict(results[i], consensus=cons[i]) for i in order]
    return sorted(results, key=lambda r: -r[key])


def agreement(h, r):
    """nz_t5md_agreement: token-level BLEU+1 of hypothesis h against reference r (id lists
    without eos): exp(mean of log p1..p4 + min(0, 1 - |r| / |h|)), p1 = m1 / |h|, pn = (mn + 1) /
    (tn + 1) for n >= 2, matches clipped by the counts in r; 0 for an empty h or no shared token."""
    if not h:
        return 0.0
    logp = 0.0
    for n in range(1, 5):
        hc = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
        rc = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        match = sum(min(c, rc[g]) for g, c in hc.items())
        total = max(len(h) - n + 1, 0)
        if n == 1:
            if match == 0:
                return 0.0
            logp += math.log(match / total)
        else:
            logp += math.log((match + 1) / (total + 1))
    return math.exp(logp / 4 + min(0.0, 1.0 - len(r) / len(h)))


def consensus(responses, eos_id=1):
    """nz_t5md_consensus for the responses of one context (token id lists; a final eos is left
    out): per response the mean agreement() with each other response (0 for one alone)."""
    toks = [list(t[:-1]) if t and t[-1] == eos_id else list(t) for t in responses]
    out = []
    for i, h in enumerate(toks):
        others = [agreement(h, r) for j, r in enumerate(toks) if j != i]
        out.append(sum(others) / len(others) if others else 0.0)
    return out


def consensus_pool(returns, eos_id=1):
    """nz_t5md_consensus_pool (the dialogue's consensus ranking with beam search): returns[j] = decoder
    j's beam returns, best first (results with "tokens"). Every return's consensus() is taken over all
    the returns of all decoders; each decoder's response is its return with the highest one (ties: the
    better return). -> one result per decoder, in decoder order, with "consensus" and its return
    index "ret"."""
    flat = [r for rs in returns for r in rs]
    cons = consensus([r["tokens"] for r in flat], eos_id)
    out, q = [], 0
    for rs in returns:
        c = cons[q:q + len(rs)]
        best = max(range(len(rs)), key=lambda r: (c[r], -r))
        out.append(dict(rs[best], consensus=c[best], ret=best))
        q += len(rs)
    return out


def score_responses(model, src, responses, decoders=None, ban_unk=True):
    """Teacher-forced token log-probs of given responses (ids incl. eos) under each
    decoder (same definition as greedy's token_logprobs). out[i][j] for response i."""
    decs = list(range(model.num_modes)) if decoders is None else list(decoders)
    was = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            dev = model.shared.weight.device
            s, sp = pad_batch([src])
            enc = model.encode(s.to(dev), sp.to(dev))
            for resp in responses:
                row = []
                dec_in = torch.tensor([[DECODER_START] + list(resp[:-1])], dtype=torch.long, device=dev)
                for k in decs:
                    logits = model.forward_encoded(enc, sp.to(dev), dec_in, k)[0].float()
                    if ban_unk:
                        logits[:, UNK] = float("-inf")
                    lp = torch.log_softmax(logits, -1)
                    row.append(_result(k, list(resp), [lp[t, x] for t, x in enumerate(resp)], resp[-1] == EOS))
                out.append(row)
    finally:
        model.train(was)
    return out


# ------------------------------------------------------------------ model directory

CONFIG_KEYS = [
    "architecture", "model_type", "multidecoder", "num_modes", "adapter_hidden_size",
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
    "feed_forward_proj", "tie_word_embeddings", "pad_token_id", "eos_token_id", "unk_token_id",
    "decoder_start_token_id", "turn_separator", "max_context_turns", "max_source_length",
    "max_target_length",
]


def model_dir_tensors(model):
    """The model directory's tensors (name -> tensor) in module order. A plain T5
    ("none") is written as the equivalent adapter model with K = 1 and zero adapters."""
    sd = model.state_dict()
    if model.kind != "none":
        return dict(sd), dict(model.config)
    c = dict(model.config)
    c.update(multidecoder="adapter", num_modes=1)
    d, r = c["d_model"], c["adapter_hidden_size"]
    out = {}
    for k, v in sd.items():
        out[k] = v
        if k.startswith("decoder.block.") and k.endswith("layer_norm.weight"):
            p = k[:-len("layer_norm.weight")] + "adapters.0."
            out[p + "o2i.weight"] = torch.zeros(r, d)
            out[p + "o2i.bias"] = torch.zeros(r)
            out[p + "i2o.weight"] = torch.zeros(d, r)
            out[p + "i2o.bias"] = torch.zeros(d)
    return out, c


def save_model_dir(model, path, spm_path=None, dtype="F32", extra_config=None):
    """config.json + model.safetensors (+ spm.model copied) (README_dialogue.md)."""
    os.makedirs(path, exist_ok=True)
    tensors, c = model_dir_tensors(model)
    if extra_config:
        c.update(extra_config)
    conf = {k: c[k] for k in CONFIG_KEYS if k in c}
    conf["architecture"] = "t5_multidecoder"
    conv = (lambda t: t.float()) if dtype == "F32" else (lambda t: t.float().to(torch.bfloat16))
    write_safetensors(os.path.join(path, "model.safetensors"), {k: conv(v) for k, v in tensors.items()},
                      {"format": "pt", "architecture": "t5_multidecoder"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f, indent=1, sort_keys=True)
        f.write("\n")
    if spm_path:
        dst = os.path.join(path, "spm.model")
        if os.path.abspath(spm_path) != os.path.abspath(dst):
            shutil.copyfile(spm_path, dst)
    return conf


def load_model_dir(path, device="cpu"):
    """(model in eval mode, config) from a model directory."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("architecture") != "t5_multidecoder":
        raise ValueError("%s: architecture %r is not t5_multidecoder" % (path, cfg.get("architecture")))
    sd = read_safetensors(os.path.join(path, "model.safetensors"))
    cfg = make_config(cfg, dropout_rate=0.0)
    model = T5MultiDecoder(cfg)
    if model.kind == "transformer":
        for k in range(model.num_modes):
            sd.setdefault("decoders.%d.embed_tokens.weight" % k, sd["shared.weight"])
    model.load_state_dict(sd, strict=True)
    model.to(device).eval()
    return model, cfg


def load_tokenizer(path, config=None):
    if config is None:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    return Tokenizer.from_config(os.path.join(path, "spm.model"), config)
