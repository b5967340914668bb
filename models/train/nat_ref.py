"""PyTorch reference of the multi-task NAT (CMLM mask-predict + AT decoder).

Written from fairseq's definitions (``TransformerEncoder``, ``TransformerDecoder``,
``NATransformerDecoder``, ``CMLMNATransformerModel``, ``IterativeRefinementGenerator``,
``SequenceGenerator``) and multi-task-nat's ``mt_transformer.py``; no fairseq import.
The training script (train_nat.py) uses it for the network, and tests can use it as
the reference of the C engine: it loads a converted model directory too
(``load_model_dir``).

Module layout == the model directory's tensor names (see README_train.md):

    encoder.*      shared encoder (fairseq TransformerEncoder)
    decoder.*      CMLM decoder (fairseq NATransformerDecoder, incl. embed_length)
    at_decoder.*   autoregressive decoder (fairseq TransformerDecoder), optional

Token conventions (as multi-task-nat's translation_mt task):
    source    = [bos, x1..xm, eos]
    NAT target= [bos, y1..yn, eos]   (length classes count bos and eos)
    AT input  = [eos, y1..yn], AT target = [y1..yn, eos]   (standard fairseq AT;
                 no bos, so fairseq's IterativeRefinementGenerator.rerank applies as is)

All tensors are batch-first here; the maths is fairseq's (which is time-first).
"""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors_io import read_safetensors  # noqa: F401 (re-exported)

BOS, PAD, EOS, UNK = 0, 1, 2, 3
MASK = UNK  # CMLM masks with <unk>
LN_EPS = 1e-5

# fairseq argument names that define the network, with the defaults used when a
# checkpoint/config lacks them (fairseq cmlm_base_architecture / mt_transformer).
ARCH_DEFAULTS = dict(
    encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=6,
    encoder_attention_heads=8, encoder_normalize_before=False, encoder_learned_pos=False,
    decoder_embed_dim=None, decoder_ffn_embed_dim=None, decoder_layers=6,
    decoder_attention_heads=8, decoder_normalize_before=False, decoder_learned_pos=False,
    at_decoder_layers=0,
    max_source_positions=1024, max_target_positions=1024,
    activation_fn="relu", dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
    share_all_embeddings=True, share_decoder_input_output_embed=True,
    no_scale_embedding=False, no_token_positional_embeddings=False,
    layernorm_embedding=False, pred_length_offset=False, length_loss_factor=0.1,
    sg_length_pred=False, src_embedding_copy=False,
)


def complete_args(a):
    """Fill missing architecture args with fairseq's defaults (SimpleNamespace)."""
    d = dict(ARCH_DEFAULTS)
    d.update({k: v for k, v in vars(a).items() if v is not None} if not isinstance(a, dict)
             else {k: v for k, v in a.items() if v is not None})
    if d["decoder_embed_dim"] is None:
        d["decoder_embed_dim"] = d["encoder_embed_dim"]
    if d["decoder_ffn_embed_dim"] is None:
        d["decoder_ffn_embed_dim"] = d["encoder_ffn_embed_dim"]
    if d["share_all_embeddings"]:
        d["share_decoder_input_output_embed"] = True
    return SimpleNamespace(**d)


# ------------------------------------------------------------------ dictionary

def load_dict(path):
    """fairseq Dictionary.load: 4 implicit specials, then one '<sym> <count>' a line."""
    symbols = ["<s>", "<pad>", "</s>", "<unk>"]
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            sym, _, rest = line.rpartition(" ")
            if rest == "#fairseq:overwrite":
                sym, _, _ = sym.rpartition(" ")
            symbols.append(sym)
    return symbols


class Vocab:
    """SentencePiece pieces <-> fairseq ids (through dict.txt)."""

    def __init__(self, spm_path, dict_path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=spm_path)
        self.symbols = load_dict(dict_path)
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self):
        return len(self.symbols)

    def encode(self, line, add_bos=True):
        ids = [self.index.get(p, UNK) for p in self.sp.encode(line, out_type=str)]
        return ([BOS] if add_bos else []) + ids + [EOS]

    def decode(self, ids):
        pieces = [self.symbols[i] for i in ids if i not in (BOS, EOS, PAD)]
        return self.sp.decode_pieces(pieces)


# ------------------------------------------------------------------ modules

def make_positions(tokens, padding_idx):
    """fairseq utils.make_positions: non-pads numbered padding_idx+1.., pads -> padding_idx."""
    mask = tokens.ne(padding_idx).long()
    return torch.cumsum(mask, dim=1) * mask + padding_idx


def sinusoidal_table(num, dim, padding_idx):
    """fairseq SinusoidalPositionalEmbedding.get_embedding."""
    half = dim // 2
    f = math.log(10000) / (half - 1)
    f = torch.exp(torch.arange(half, dtype=torch.float) * -f)
    e = torch.arange(num, dtype=torch.float).unsqueeze(1) * f.unsqueeze(0)
    e = torch.cat([torch.sin(e), torch.cos(e)], dim=1).view(num, -1)
    if dim % 2 == 1:
        e = torch.cat([e, torch.zeros(num, 1)], dim=1)
    e[padding_idx, :] = 0
    return e


class LearnedPositionalEmbedding(nn.Embedding):
    """fairseq LearnedPositionalEmbedding: max_positions + padding_idx + 1 rows."""

    def __init__(self, max_positions, dim, padding_idx):
        super().__init__(max_positions + padding_idx + 1, dim, padding_idx)
        nn.init.normal_(self.weight, mean=0, std=dim ** -0.5)
        nn.init.constant_(self.weight[padding_idx], 0)

    def forward(self, tokens):
        return super().forward(make_positions(tokens, self.padding_idx))


class SinusoidalPositionalEmbedding(nn.Module):
    """No weights (fairseq's non-persistent ``_float_tensor`` buffer is omitted)."""

    def __init__(self, max_positions, dim, padding_idx):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.register_buffer("table", sinusoidal_table(max_positions + padding_idx + 1, dim,
                                                       padding_idx), persistent=False)

    def forward(self, tokens):
        pos = make_positions(tokens, self.padding_idx)
        need = int(pos.max()) + 1
        if need > self.table.size(0):
            self.table = sinusoidal_table(need, self.dim, self.padding_idx).to(self.table)
        return self.table[pos]


def positional_embedding(max_positions, dim, learned):
    if learned:
        return LearnedPositionalEmbedding(max_positions, dim, PAD)
    return SinusoidalPositionalEmbedding(max_positions, dim, PAD)


def Linear(i, o, bias=True):
    m = nn.Linear(i, o, bias)
    nn.init.xavier_uniform_(m.weight)
    if bias:
        nn.init.constant_(m.bias, 0.0)
    return m


class MultiheadAttention(nn.Module):
    """fairseq MultiheadAttention (k_proj, v_proj, q_proj, out_proj; q scaled by hd^-0.5)."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.dim, self.heads, self.hd = dim, heads, dim // heads
        assert self.hd * heads == dim
        self.scaling = self.hd ** -0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        g = 1 / math.sqrt(2)
        for m in (self.k_proj, self.v_proj, self.q_proj):
            nn.init.xavier_uniform_(m.weight, gain=g)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, x, kv, key_padding_mask=None, attn_mask=None):
        B, Tq, C = x.shape
        Tk = kv.size(1)
        q = (self.q_proj(x) * self.scaling).view(B, Tq, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(kv).view(B, Tk, self.heads, self.hd).transpose(1, 2)
        v = self.v_proj(kv).view(B, Tk, self.heads, self.hd).transpose(1, 2)
        w = torch.matmul(q, k.transpose(-1, -2))  # B H Tq Tk
        if attn_mask is not None:
            w = w + attn_mask
        if key_padding_mask is not None:
            w = w.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        w = F.softmax(w.float(), dim=-1).type_as(w)
        w = F.dropout(w, p=self.dropout, training=self.training)
        o = torch.matmul(w, v).transpose(1, 2).reshape(B, Tq, C)
        return self.out_proj(o)


def _act(name):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return lambda x: F.gelu(x.float()).type_as(x)
    raise ValueError("activation_fn %r not supported" % name)


class TransformerLayer(nn.Module):
    """fairseq TransformerEncoderLayer / TransformerDecoderLayer (cross=True)."""

    def __init__(self, dim, ffn, heads, a, normalize_before, cross):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, a.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=LN_EPS)
        if cross:
            self.encoder_attn = MultiheadAttention(dim, heads, a.attention_dropout)
            self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=LN_EPS)
        else:
            self.encoder_attn = None
        self.fc1 = Linear(dim, ffn)
        self.fc2 = Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.nb = normalize_before
        self.dropout, self.act_dropout = a.dropout, a.activation_dropout
        self.act = _act(a.activation_fn)

    def _sub(self, x, ln, fn):
        r = x
        if self.nb:
            x = ln(x)
        x = F.dropout(fn(x), p=self.dropout, training=self.training)
        x = r + x
        if not self.nb:
            x = ln(x)
        return x

    def forward(self, x, pad=None, attn_mask=None, enc=None, enc_pad=None):
        x = self._sub(x, self.self_attn_layer_norm,
                      lambda h: self.self_attn(h, h, pad, attn_mask))
        if self.encoder_attn is not None:
            x = self._sub(x, self.encoder_attn_layer_norm,
                          lambda h: self.encoder_attn(h, enc, enc_pad))

        def ffn(h):
            h = self.act(self.fc1(h))
            h = F.dropout(h, p=self.act_dropout, training=self.training)
            return self.fc2(h)
        return self._sub(x, self.final_layer_norm, ffn)


class Encoder(nn.Module):
    def __init__(self, a, embed_tokens):
        super().__init__()
        d = a.encoder_embed_dim
        self.register_buffer("version", torch.Tensor([3]))
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if a.no_scale_embedding else math.sqrt(d)
        self.embed_positions = (None if a.no_token_positional_embeddings else
                                positional_embedding(a.max_source_positions, d,
                                                     a.encoder_learned_pos))
        self.layernorm_embedding = nn.LayerNorm(d, eps=LN_EPS) if a.layernorm_embedding else None
        self.layers = nn.ModuleList(
            TransformerLayer(d, a.encoder_ffn_embed_dim, a.encoder_attention_heads, a,
                             a.encoder_normalize_before, cross=False)
            for _ in range(a.encoder_layers))
        self.layer_norm = nn.LayerNorm(d, eps=LN_EPS) if a.encoder_normalize_before else None
        self.dropout = a.dropout

    def forward(self, src_tokens):
        pad = src_tokens.eq(PAD)
        x = self.embed_scale * self.embed_tokens(src_tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(src_tokens)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = x * (1 - pad.unsqueeze(-1).type_as(x))
        kpm = pad if pad.any() else None
        for layer in self.layers:
            x = layer(x, kpm)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return {"encoder_out": x, "encoder_padding_mask": pad}


def reorder_encoder_out(enc, order):
    return {"encoder_out": enc["encoder_out"].index_select(0, order),
            "encoder_padding_mask": enc["encoder_padding_mask"].index_select(0, order)}


class Decoder(nn.Module):
    """fairseq TransformerDecoder (causal=True) or NATransformerDecoder (nat=True)."""

    def __init__(self, a, embed_tokens, nat, num_layers):
        super().__init__()
        d = a.decoder_embed_dim
        self.nat = nat
        self.register_buffer("version", torch.Tensor([3]))
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if a.no_scale_embedding else math.sqrt(d)
        self.embed_positions = (None if a.no_token_positional_embeddings else
                                positional_embedding(a.max_target_positions, d,
                                                     a.decoder_learned_pos))
        self.layernorm_embedding = nn.LayerNorm(d, eps=LN_EPS) if a.layernorm_embedding else None
        self.layers = nn.ModuleList(
            TransformerLayer(d, a.decoder_ffn_embed_dim, a.decoder_attention_heads, a,
                             a.decoder_normalize_before, cross=True)
            for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(d, eps=LN_EPS) if a.decoder_normalize_before else None
        V = embed_tokens.num_embeddings
        self.output_projection = nn.Linear(d, V, bias=False)
        if a.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        else:
            nn.init.normal_(self.output_projection.weight, mean=0, std=d ** -0.5)
        if nat:
            self.embed_length = nn.Embedding(256, a.encoder_embed_dim)
            nn.init.normal_(self.embed_length.weight, mean=0, std=a.encoder_embed_dim ** -0.5)
            self.pred_length_offset = a.pred_length_offset
            self.sg_length_pred = a.sg_length_pred
            self.length_loss_factor = a.length_loss_factor
        self.dropout = a.dropout

    def forward(self, prev_tokens, enc, normalize=False, features_only=False):
        x = self.embed_scale * self.embed_tokens(prev_tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(prev_tokens)
        # NATransformerDecoder.forward_embedding has no layernorm_embedding
        if self.layernorm_embedding is not None and not self.nat:
            x = self.layernorm_embedding(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        pad = prev_tokens.eq(PAD)
        if self.nat:
            kpm, attn_mask = pad, None
        else:
            kpm = pad if pad.any() else None
            T = prev_tokens.size(1)
            attn_mask = torch.triu(torch.full((T, T), float("-inf"), device=x.device), 1)
        enc_out, enc_pad = enc["encoder_out"], enc["encoder_padding_mask"]
        for layer in self.layers:
            x = layer(x, kpm, attn_mask, enc_out, enc_pad)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if features_only:
            return x
        x = self.output_projection(x)
        return F.log_softmax(x.float(), -1) if normalize else x

    # ---- length prediction (NATransformerDecoder)
    def forward_length(self, enc, normalize=False):
        feats, pad = enc["encoder_out"], enc["encoder_padding_mask"]
        m = (~pad).type_as(feats)  # B x T
        feats = ((feats / m.sum(1)[:, None, None]) * m[:, :, None]).sum(1)
        if self.sg_length_pred:
            feats = feats.detach()
        out = F.linear(feats, self.embed_length.weight)
        return F.log_softmax(out, -1) if normalize else out

    def length_target(self, enc, tgt_tokens):
        tl = tgt_tokens.ne(PAD).sum(1).long()
        if self.pred_length_offset:
            sl = (~enc["encoder_padding_mask"]).sum(1).long()
            tl = tl - sl + 128
        return tl.clamp(min=0, max=255)

    def predict_length(self, enc, length_out):
        pred = length_out.max(-1)[1]
        if self.pred_length_offset:
            sl = (~enc["encoder_padding_mask"]).sum(1).long()
            pred = pred - 128 + sl
        return pred


class NATModel(nn.Module):
    """Shared encoder + CMLM decoder (+ AT decoder when at_decoder_layers > 0)."""

    def __init__(self, a, vocab_size):
        super().__init__()
        a = complete_args(a)
        self.args = a
        if not a.share_all_embeddings:
            raise ValueError("only --share-all-embeddings (joined dictionary) is supported")
        if a.encoder_embed_dim != a.decoder_embed_dim:
            raise ValueError("share_all_embeddings needs encoder_embed_dim == decoder_embed_dim")
        emb = nn.Embedding(vocab_size, a.encoder_embed_dim, padding_idx=PAD)
        nn.init.normal_(emb.weight, mean=0, std=a.encoder_embed_dim ** -0.5)
        nn.init.constant_(emb.weight[PAD], 0)
        self.encoder = Encoder(a, emb)
        self.decoder = Decoder(a, emb, nat=True, num_layers=a.decoder_layers)
        self.at_decoder = (Decoder(a, emb, nat=False, num_layers=a.at_decoder_layers)
                           if a.at_decoder_layers > 0 else None)

    def apply_bert_init(self):
        """fairseq init_bert_params (multi-task-nat's --apply-bert-init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.normal_(mean=0.0, std=0.02)
                if m.bias is not None:
                    m.bias.data.zero_()
            if isinstance(m, nn.Embedding):
                m.weight.data.normal_(mean=0.0, std=0.02)
                if m.padding_idx is not None:
                    m.weight.data[m.padding_idx].zero_()

    def encode(self, src_tokens):
        return self.encoder(src_tokens)


# ------------------------------------------------------------------ losses

def random_mask(target, generator):
    """translation_lev/translation_mt 'random_mask' noise: mask (with unk) a uniform
    random number 1..L of the L non-special target tokens, chosen uniformly."""
    specials = target.eq(PAD) | target.eq(BOS) | target.eq(EOS)
    score = torch.rand(target.shape, generator=generator).to(target.device)
    score.masked_fill_(specials, 2.0)
    length = (~specials).sum(1).float()
    length = length * torch.rand(length.shape, generator=generator).to(target.device)
    length = length + 1
    _, rank = score.sort(1)
    cutoff = torch.arange(target.size(1), device=target.device)[None, :] < length[:, None].long()
    return target.masked_fill(cutoff.scatter(1, rank, cutoff), UNK)


def nat_word_loss(logits, target, mask, ls):
    """multi-task-nat _compute_loss: mean over masked tokens (mask=None: logits and
    target are already the masked rows)."""
    if mask is not None:
        logits, target = logits[mask], target[mask]
    if target.numel() == 0:
        return logits.sum() * 0, logits.sum() * 0
    lp = F.log_softmax(logits.float(), -1)
    nll = F.nll_loss(lp, target, reduction="none").mean()
    loss = nll * (1 - ls) - lp.mean() * ls if ls > 0 else nll
    return loss, nll


def at_loss(logits, target, eps):
    """fairseq (multi-task-nat era) label_smoothed_nll_loss, summed; returns (loss, nll, ntok)."""
    lp = F.log_softmax(logits.float(), -1)
    keep = target.ne(PAD)
    nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep].sum()
    smooth = -lp.sum(-1)[keep].sum()
    loss = (1.0 - eps) * nll + eps / lp.size(-1) * smooth
    return loss, nll, int(keep.sum())


def at_inputs(nat_target):
    """[bos, y.., eos] (right-padded) -> AT input [eos, y..] and target [y.., eos]
    (fairseq collate with move_eos_to_beginning, without the bos)."""
    tgt = nat_target[:, 1:]
    prev = torch.cat([torch.full_like(tgt[:, :1], EOS), tgt[:, :-1]], 1)
    prev = prev.masked_fill(tgt.eq(PAD), PAD)
    return prev, tgt


# ------------------------------------------------------------------ decoding

@torch.no_grad()
def mask_predict(model, src_tokens, max_iter=10, length_beam=1, adaptive=False,
                 rerank_at=False, return_all=False):
    """fairseq IterativeRefinementGenerator + CMLMNATransformerModel.forward_decoder.

    src_tokens: B x S ([bos, x.., eos], right- or left-padded).
    max_iter T  -> T+1 decoder passes (steps 0..T, max_step = T+1).
    After pass t (t+1 < T+1) the floor((L-2) * p) lowest-scoring tokens are re-masked,
    p = 1 - (t+1)/(T+1) computed in double then multiplied in float32 by (L-2)
    (L = non-pad length incl. bos/eos); scores sorted ascending with a *stable* sort
    (bos/eos keep score 0 and are never masked unless ties with 0 force it; fairseq's
    sort is unstable there). By default every sentence runs all T+1 passes (fairseq
    --iter-decode-force-max-iter, as multi-task-nat and the mask-predict paper decode);
    adaptive=True (fairseq's generator default) stops a sentence whose tokens did not
    change in a pass -- which can leave re-masked <unk>s in the output, as fairseq does.
    Length beam b: predicted length L0 (argmax, clamped >= 2), candidates
    L0 - b//2 + j (j = 0..b-1), clamped >= 2. Candidate score = mean of the
    positional scores over its non-pad tokens (bos/eos count with 0); argmax picks
    the first best. rerank_at: fairseq's rerank() with the AT decoder: teacher-forced
    mean log-prob of [y.., eos] given [eos, y..].
    Returns per sentence a dict(tokens=[ids incl. bos/eos], score, steps, candidates).
    """
    model.eval()
    enc = model.encode(src_tokens)
    dec = model.decoder
    B = src_tokens.size(0)
    length_out = dec.forward_length(enc, normalize=True)
    length_tgt = dec.predict_length(enc, length_out).clamp(min=2)
    if length_beam > 1:
        length_tgt = (length_tgt[:, None] + torch.arange(length_beam) - length_beam // 2)
        length_tgt = length_tgt.reshape(-1).clamp(min=2)
        order = torch.arange(B).repeat_interleave(length_beam)
        enc = reorder_encoder_out(enc, order)
    N = length_tgt.size(0)
    maxlen = int(length_tgt.max())
    idx = torch.arange(maxlen)
    tokens = torch.full((N, maxlen), PAD, dtype=torch.long)
    tokens.masked_fill_(idx[None, :] < length_tgt[:, None], UNK)
    tokens[:, 0] = BOS
    tokens.scatter_(1, (length_tgt - 1)[:, None], EOS)
    scores = torch.zeros(N, maxlen, dtype=torch.float)
    sent = torch.arange(N)
    prev = tokens.clone()
    final = [None] * N
    max_step = max_iter + 1
    for step in range(max_step):
        masks = tokens.eq(UNK)
        lp = dec(tokens, enc, normalize=True)
        s_, t_ = lp.max(-1)
        tokens[masks] = t_[masks]
        scores[masks] = s_[masks].float()
        if step + 1 < max_step:
            p = torch.tensor(1 - (step + 1) / max_step, dtype=torch.float32)
            L = tokens.ne(PAD).sum(1, keepdim=True).float()
            boundary = ((L - 2) * p).long()
            sorted_index = torch.sort(scores, dim=-1, stable=True)[1]
            sk = torch.arange(maxlen)[None, :] < boundary
            sk = sk.scatter(1, sorted_index, sk)
            tokens.masked_fill_(sk, UNK)
            scores.masked_fill_(sk, 0.0)
        if adaptive:
            term = (prev == tokens).all(1)
        else:
            term = torch.zeros(tokens.size(0), dtype=torch.bool)
        if step == max_iter:
            term[:] = True
        for i in term.nonzero().flatten().tolist():
            keep = tokens[i].ne(PAD)
            final[int(sent[i])] = {"tokens": tokens[i][keep].tolist(),
                                   "positional_scores": scores[i][keep].clone(),
                                   "score": float(scores[i][keep].mean()), "steps": step}
        if bool(term.all()):
            break
        nt = ~term
        tokens, scores, sent = tokens[nt], scores[nt], sent[nt]
        enc = reorder_encoder_out(enc, nt.nonzero().flatten())
        prev = tokens.clone()
    if rerank_at:
        if model.at_decoder is None:
            raise ValueError("rerank_at needs an AT decoder")
        enc_all = model.encode(src_tokens)
        order = torch.arange(B).repeat_interleave(length_beam)
        enc_all = reorder_encoder_out(enc_all, order)
        for i, f in enumerate(final):
            f["nat_score"] = f["score"]
            f["score"] = at_score(model, enc_all, i, f["tokens"])
    out = []
    for b in range(B):
        cands = final[b * length_beam:(b + 1) * length_beam]
        best = int(np.argmax([c["score"] for c in cands]))
        r = dict(cands[best])
        if return_all:
            r["candidates"] = cands
        out.append(r)
    return out


@torch.no_grad()
def at_score(model, enc, row, tokens):
    """fairseq rerank(): tokens [bos, y.., eos] -> [eos, y.., eos]; mean log-prob of
    targets [y.., eos] given inputs [eos, y..] (row: index into enc)."""
    t = torch.tensor([EOS] + tokens[1:], dtype=torch.long)[None]
    e = reorder_encoder_out(enc, torch.tensor([row]))
    lp = model.at_decoder(t[:, :-1], e, normalize=True)
    return float(lp.gather(2, t[:, 1:, None])[0, :, 0].mean())


@torch.no_grad()
def at_greedy(model, src_tokens, max_len_a=0, max_len_b=200, min_len=1):
    """fairseq SequenceGenerator, beam 1: starts from [eos]; pad never chosen; eos
    banned while step < min_len; eos forced at step == max_len where
    max_len = min(a * S + b, max_target_positions - 1), S = padded source width.
    Returns [ids] per sentence ending with eos (no bos)."""
    model.eval()
    B, S = src_tokens.shape
    enc = model.encode(src_tokens)
    max_len = min(int(max_len_a * S + max_len_b), model.args.max_target_positions - 1)
    toks = torch.full((B, 1), EOS, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    out = [None] * B
    for step in range(max_len + 1):
        lp = model.at_decoder(toks, enc, normalize=True)[:, -1]
        lp[:, PAD] = float("-inf")
        if step >= max_len:
            lp[:, :EOS] = float("-inf")
            lp[:, EOS + 1:] = float("-inf")
        if step < min_len:
            lp[:, EOS] = float("-inf")
        nxt = lp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        toks = torch.cat([toks, nxt[:, None]], 1)
        for i in ((nxt == EOS) & ~done).nonzero().flatten().tolist():
            out[i] = toks[i, 1:].tolist()
        done |= nxt.eq(EOS)
        if bool(done.all()):
            break
    return out


@torch.no_grad()
def at_beam(model, src_tokens, beam=5, max_len_a=0, max_len_b=200, min_len=1, lenpen=1.0,
            return_all=False):
    """fairseq SequenceGenerator + search.BeamSearch (normalize_scores, no unk penalty,
    no repeat-ngram blocking, no prefix), one full decoder pass per step (no cache).

    Every sentence has `beam` rows, all starting from [eos]; beam is clamped to
    vocab - 1 as fairseq does. max_len = min(int(a * S + b), max_target_positions - 1),
    S = padded source width. At step t each row's log-probs get pad banned, every
    token but eos banned when t >= max_len, and eos banned when t < min_len; then
    (t > 0) the row's cumulative score is added (float32). At t = 0 only row 0 of a
    sentence takes part (all rows are the same [eos]). The best min(2*beam,
    candidates - 1) (row, token) pairs over the sentence's rows are the candidates
    (torch.topk order). Candidates among the first `beam` that are eos with a finite
    score, and not masked by the previous step's "ignore" flags (fairseq's
    cands_to_ignore / blacklist, indexed by candidate position), are finalized in
    candidate order with score cum / (t + 1) ** lenpen, while the sentence holds
    fewer than `beam` of them. A sentence that finalized something this step stops
    when it holds `beam` hypotheses or t == max_len. The others continue with the
    first `beam` candidates after moving the finalizable eos ones and the ignored
    positions behind the rest (eos_mask * cand_size + position, smallest first); the
    positions j < beam whose chosen candidate came from that back part are flagged
    "ignore" for the next step (only possible with fewer than 2*beam candidates, a
    beam close to the vocabulary size: there is at most one eos candidate per row).
    The result of a sentence is its finalized hypothesis with the best score (the
    first one on ties, Python's stable sort): dict(tokens=[y.., eos], score,
    steps=len(tokens)) (plus hypos, all finalized ones best first, with
    return_all), or None when nothing was finalized (min_len > max_len).
    """
    model.eval()
    B, S = src_tokens.shape
    V = model.encoder.embed_tokens.num_embeddings
    K = max(1, min(int(beam), V - 1))
    max_len = min(int(max_len_a * S + max_len_b), model.args.max_target_positions - 1)
    enc_all = model.encode(src_tokens)
    cand_size = 2 * K
    finalized = [[] for _ in range(B)]
    active = list(range(B))                               # unfinished sentences
    toks = torch.full((B * K, 1), EOS, dtype=torch.long)  # rows of the active sentences
    cum = torch.zeros(B * K, dtype=torch.float)           # cumulative score of each row
    ignore = torch.zeros(B, K, dtype=torch.bool)
    for step in range(max_len + 1):
        rows_sent = torch.tensor(active).repeat_interleave(K)
        enc = reorder_encoder_out(enc_all, rows_sent)
        lp = model.at_decoder(toks, enc, normalize=True)[:, -1].float()
        lp[:, PAD] = float("-inf")
        if step >= max_len:
            keep = lp[:, EOS].clone()
            lp[:] = float("-inf")
            lp[:, EOS] = keep
        if step < min_len:
            lp[:, EOS] = float("-inf")
        lp = lp.view(len(active), K, V)
        if step == 0:
            lp = lp[:, :1, :]
        else:
            lp = lp + cum.view(len(active), K, 1)
        flat = lp.reshape(len(active), -1)
        k = min(cand_size, flat.size(1) - 1)
        cand_scores, cand_idx = torch.topk(flat, k)
        cand_rows = torch.div(cand_idx, V, rounding_mode="trunc")
        cand_toks = cand_idx.fmod(V)
        new_toks, new_cum, new_active, new_ignore = [], [], [], []
        for a, s in enumerate(active):
            eos_mask = cand_toks[a].eq(EOS) & cand_scores[a].ne(float("-inf"))
            eos_mask[:K] &= ~ignore[s]
            seen = False
            for c in range(K):
                if not bool(eos_mask[c]):
                    continue
                seen = True
                if len(finalized[s]) < K:
                    parent = a * K + int(cand_rows[a, c])
                    score = float(cand_scores[a, c] / (step + 1) ** lenpen)
                    finalized[s].append({"tokens": toks[parent, 1:].tolist() + [EOS], "score": score,
                                         "steps": step + 1})
            if seen and (len(finalized[s]) == K or step == max_len):
                continue  # sentence finished
            eos_mask[:K] |= ignore[s]  # ignored positions do not continue either
            order = eos_mask.long() * cand_size + torch.arange(k)
            chosen = torch.sort(order)[1][:K]
            new_ignore.append(order[chosen] >= cand_size)
            for c in chosen.tolist():
                parent = a * K + int(cand_rows[a, c])
                new_toks.append(torch.cat([toks[parent], cand_toks[a, c:c + 1]]))
                new_cum.append(cand_scores[a, c])
            new_active.append(s)
        if not new_active or step == max_len:
            break
        for s, ig in zip(new_active, new_ignore):
            ignore[s] = ig
        active = new_active
        toks = torch.stack(new_toks)
        cum = torch.stack(new_cum).float()
    out = []
    for s in range(B):
        hyps = sorted(finalized[s], key=lambda h: h["score"], reverse=True)
        if not hyps:
            out.append(None)
            continue
        r = dict(hyps[0])
        if return_all:
            r["hypos"] = hyps
        out.append(r)
    return out


def pad_batch(seqs, pad=PAD):
    n = max(len(s) for s in seqs)
    t = torch.full((len(seqs), n), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        t[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return t


# ------------------------------------------------------------------ model directory

def load_model_dir(path):
    """Build NATModel from a converter output directory (config.json + model.safetensors)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    sd = read_safetensors(os.path.join(path, "model.safetensors"))
    a = complete_args({k: v for k, v in cfg.items() if k in ARCH_DEFAULTS})
    a.dropout = a.attention_dropout = a.activation_dropout = 0.0
    model = NATModel(a, sd["encoder.embed_tokens.weight"].size(0))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {"decoder.embed_tokens.weight", "decoder.output_projection.weight",
               "at_decoder.embed_tokens.weight", "at_decoder.output_projection.weight",
               "encoder.version", "decoder.version", "at_decoder.version"}
    bad = [k for k in missing if k not in allowed]
    if bad or unexpected:
        raise ValueError("state mismatch: missing %s unexpected %s" % (bad, unexpected))
    model.eval()
    return model, cfg
