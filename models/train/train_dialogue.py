#!/usr/bin/python3
"""Train the EqHard-EM multi-decoder T5 dialogue model from scratch.

    /usr/bin/python3 models/train/train_dialogue.py --corpus /var/tmp/nzserve-dialogue-corpus \
        --out /var/tmp/nzserve-dialogue [--pretrain-text /var/tmp/nzserve-corpus/train.en \
        --pretrain-steps N] [--phase1-steps N] [--phase2-steps N] [--num-modes K] \
        [--decoder adapter|transformer] [--resume] [--max-minutes M] [--export DIR] ...

Corpus: JSONL lines {"context": [turns, oldest first], "response": str}; --corpus is
a directory with train.jsonl (+ valid.jsonl / dev.jsonl) or one file (then the
last --valid-fraction is held out); --train/--valid name files directly.

Steps: (1) SentencePiece with T5 ids (pad 0, eos 1, unk 2, control symbols
<sep> 3 and <mask> 4) on the corpus turns/responses (+ the pre-training text)
-> OUT/spm.model; (2) encoding (t5md_ref.join_context) -> OUT/data.pt;
(3) phase 1: a plain T5 ("none"), first --pretrain-steps updates of denoising
(BART-style text infilling on the English text: spans replaced by one <mask>,
target = the whole line) then seq2seq context -> response; one AdamW with
inverse-sqrt warm-up over both; -> OUT/phase1.pt (= EqHard-EM's --init-ckpt,
as a state dict); (4) phase 2: EqHard-EM (multi-decoder_trainer.py
EqualSizeHardEmTrainer): K decoders (adapters on the frozen phase-1 model by
default, as --freeze; or K full decoder copies), each loader batch of
K * --eq-batch-size samples gets per-sample losses of all K decoders (no_grad,
train mode), an equal-size assignment (t5md_ref.eqhard_assign) and then, for
each decoder in order, one optimizer step on its samples.

Checkpoints: OUT/checkpoint_last.pt (every --save-interval-updates / -minutes,
and at the end) and OUT/checkpoint_best.pt in EqHard-EM's BaseTrainer layout
({"model": state dict with MultiAdapterT5 / MultiDecoderT5 names, "optimizer",
"training_steps", "epoch", "global_step", ...} + "config" and "nzserve" for
resuming); --resume continues exactly. --export DIR writes a model directory
(models/convert/eqhard_t5.py does the same from any checkpoint).

Needs only Debian's python3-torch, python3-sentencepiece, python3-numpy.
See README_dialogue.md.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import t5md_ref as R  # noqa: E402
from progress import Progress, clear_line  # noqa: E402
from t5md_ref import EOS, PAD  # noqa: E402

IGNORE = -100


def log(*a):
    clear_line()  # not on the row of a progress line
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------ arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="dir with train.jsonl (+ valid.jsonl/dev.jsonl) or one .jsonl file")
    p.add_argument("--train", help="train JSONL (instead of --corpus)")
    p.add_argument("--valid", help="valid JSONL (default: held out from train)")
    p.add_argument("--valid-fraction", type=float, default=0.01)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--valid-limit", type=int, default=2000)
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-text", help="plain text, one sentence a line (e.g. /var/tmp/nzserve-corpus/train.en)")
    p.add_argument("--pretrain-limit", type=int, default=200000, help="lines of --pretrain-text used")
    # sentencepiece
    p.add_argument("--spm-vocab", type=int, default=8000)
    p.add_argument("--spm-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--spm-coverage", type=float, default=0.9995)
    p.add_argument("--spm-input-limit", type=int, default=1000000, help="sentences sampled for spm training")
    # dialogue input
    p.add_argument("--max-context-turns", type=int, default=0, help="last N turns (0: all)")
    p.add_argument("--max-source-length", type=int, default=128, help="context ids incl. eos (left-truncated)")
    p.add_argument("--max-target-length", type=int, default=64, help="response ids incl. eos (EqHard: 64)")
    # architecture (HF T5Config names)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-kv", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-decoder-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--buckets", type=int, default=32, help="relative_attention_num_buckets")
    p.add_argument("--max-distance", type=int, default=128, help="relative_attention_max_distance")
    p.add_argument("--feed-forward-proj", default="relu", choices=["relu", "gated-gelu"])
    p.add_argument("--untie", action="store_true", help="tie_word_embeddings false (separate lm_head)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout rate (default 0.1 for a new run; with --resume or --init-model it overrides "
                        "the run's own rate)")
    # multi-decoder
    p.add_argument("--num-modes", type=int, default=5, help="K decoders")
    p.add_argument("--decoder", default="adapter", choices=["adapter", "transformer"])
    p.add_argument("--proj-ratio", type=float, default=0.5, help="adapter_hidden_size = int(d_model * ratio)")
    p.add_argument("--no-freeze", action="store_true",
                   help="phase 2 trains everything (EqHard-EM without --freeze); default: adapters only")
    # optimisation
    p.add_argument("--batch-size", type=int, default=32, help="phase 1 samples per update")
    p.add_argument("--length-buckets", action="store_true",
                   help="batch dialogue pairs of similar lengths (less padding; same samples per update)")
    p.add_argument("--pretrain-steps", type=int, default=0)
    p.add_argument("--phase1-steps", type=int, default=20000, help="seq2seq updates after pre-training")
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup-updates", type=int, default=1000)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0, help="phase 1 gradient clipping (0: none)")
    p.add_argument("--mask-ratio", type=float, default=0.15, help="denoising: fraction of tokens masked")
    p.add_argument("--mask-span", type=float, default=3.0, help="denoising: mean span length")
    p.add_argument("--phase2-steps", type=int, default=5000, help="EqHard assignment rounds (loader batches)")
    p.add_argument("--eq-batch-size", type=int, default=16, help="samples per decoder update (loader batch = K x this)")
    p.add_argument("--phase2-lr", type=float, default=5e-4, help="constant (EqHard-EM's 'constant' scheduler)")
    p.add_argument("--phase2-weight-decay", type=float, default=0.0)
    p.add_argument("--phase2-clip-norm", type=float, default=0.0, help="0 = none, as EqHard-EM")
    p.add_argument("--assign-eval", action="store_true",
                   help="per-sample losses for the assignment without dropout (EqHard-EM: train mode)")
    # bookkeeping
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    p.add_argument("--init-model", metavar="DIR",
                   help="start from a model directory instead (e.g. `nzp unpack --model-dir` of a snapshot "
                        "from snapshot_dialogue.py): its weights, spm.model and config \"training\" state "
                        "(phase 1 update count and data position); the optimizer starts afresh")
    p.add_argument("--rewarm-updates", type=int, default=200,
                   help="with --init-model: the learning rate ramps up linearly over this many updates "
                        "(Adam's moments start from zero)")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (with a checkpoint) after this wall time")
    p.add_argument("--interrupt-at", type=int, default=0,
                   help="stop (with a checkpoint) after this many updates of both phases (testing --resume)")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--save-interval-updates", type=int, default=1000)
    p.add_argument("--save-interval-minutes", type=float, default=15)
    p.add_argument("--validate-interval-updates", type=int, default=1000)
    p.add_argument("--decode-n", type=int, default=4, help="valid contexts decoded at the end")
    p.add_argument("--no-final-decode", action="store_true")
    p.add_argument("--export", help="write a model directory here when the run ends")
    a = p.parse_args(argv)
    if not (a.corpus or a.train):
        p.error("--corpus or --train is required")
    if a.init_model and a.resume:
        p.error("--init-model starts a run; --resume continues one: give one of them")
    return a


def model_config(a, vocab_size):
    return R.make_config(
        vocab_size=vocab_size, d_model=a.d_model, d_kv=a.d_kv, d_ff=a.d_ff, num_layers=a.num_layers,
        num_decoder_layers=a.num_decoder_layers, num_heads=a.num_heads,
        relative_attention_num_buckets=a.buckets, relative_attention_max_distance=a.max_distance,
        feed_forward_proj=a.feed_forward_proj, tie_word_embeddings=not a.untie, dropout_rate=a.dropout,
        multidecoder="none", num_modes=1, adapter_hidden_size=max(1, int(a.d_model * a.proj_ratio)),
        turn_separator=R.SEP_PIECE, max_context_turns=a.max_context_turns,
        max_source_length=a.max_source_length, max_target_length=a.max_target_length)


# ------------------------------------------------------------------ data

def read_jsonl(path, limit=0):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            ctx, resp = d.get("context"), d.get("response")
            if ctx is None or not isinstance(resp, str) or not resp.strip():
                continue
            if isinstance(ctx, str):
                ctx = [ctx]
            out.append(([str(t) for t in ctx], resp))
            if limit and len(out) >= limit:
                break
    return out


def corpus_files(a):
    if a.train:
        return a.train, a.valid
    if os.path.isdir(a.corpus):
        tr = os.path.join(a.corpus, "train.jsonl")
        va = None
        for n in ("valid.jsonl", "dev.jsonl", "validation.jsonl"):
            if os.path.exists(os.path.join(a.corpus, n)):
                va = os.path.join(a.corpus, n)
                break
        return tr, (a.valid or va)
    return a.corpus, a.valid


def load_corpus(a):
    tr, va = corpus_files(a)
    train = read_jsonl(tr, a.train_limit)
    if va:
        valid = read_jsonl(va, a.valid_limit)
    else:
        n = max(1, int(len(train) * a.valid_fraction)) if len(train) > 1 else 0
        n = min(n, a.valid_limit) if a.valid_limit else n
        train, valid = train[:len(train) - n], train[len(train) - n:]
    if not train:
        raise SystemExit("no training pairs in %s" % tr)
    return train, valid


def read_lines(path, limit=0):
    out = []
    with open(path, encoding="utf-8") as f:
        for l in f:
            l = l.strip()
            if l:
                out.append(l)
                if limit and len(out) >= limit:
                    break
    return out


def train_spm(a, spm_prefix, train, pre_lines):
    import sentencepiece as spm
    texts = set()
    for ctx, resp in train:
        for t in ctx:
            if t.strip():
                texts.add(t.strip())
        texts.add(resp.strip())
    texts = sorted(texts) + list(pre_lines)
    if a.spm_input_limit and len(texts) > a.spm_input_limit:
        sel = np.random.RandomState(a.seed).choice(len(texts), a.spm_input_limit, replace=False)
        texts = [texts[i] for i in sorted(sel)]
    inp = spm_prefix + ".input.txt"
    with open(inp, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(t.replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(
        input=inp, model_prefix=spm_prefix, vocab_size=a.spm_vocab, model_type=a.spm_type,
        character_coverage=a.spm_coverage, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, hard_vocab_limit=False, pad_id=PAD, eos_id=EOS, unk_id=R.UNK, bos_id=-1,
        control_symbols=[R.SEP_PIECE, R.MASK_PIECE], minloglevel=2)
    os.remove(inp)


def prepare(a):
    os.makedirs(a.out, exist_ok=True)
    spm_prefix = os.path.join(a.out, "spm")
    data_path = os.path.join(a.out, "data.pt")
    if os.path.exists(data_path) and os.path.exists(spm_prefix + ".model"):
        return torch.load(data_path)
    t = time.time()
    train, valid = load_corpus(a)
    pre = read_lines(a.pretrain_text, a.pretrain_limit) if a.pretrain_text else []
    log("corpus: %d train / %d valid pairs, %d pre-training lines (%.0fs)" % (
        len(train), len(valid), len(pre), time.time() - t))
    if not os.path.exists(spm_prefix + ".model"):
        t = time.time()
        train_spm(a, spm_prefix, train, pre)
        log("sentencepiece %s vocab %d trained in %.0fs" % (a.spm_type, a.spm_vocab, time.time() - t))
    tok = R.Tokenizer(spm_prefix + ".model", R.SEP_PIECE, a.max_context_turns, a.max_source_length,
                      a.max_target_length)
    t = time.time()
    cache = {}
    plain_encode = tok.encode

    def enc_turn(s):
        v = cache.get(s)
        if v is None:
            v = cache[s] = plain_encode(s)
        return v
    tok.encode = enc_turn  # same ids, memoised (contexts repeat turns)
    data = {"vocab_size": len(tok)}
    for name, pairs in (("train", train), ("valid", valid)):
        src = [np.array(R.join_context(c, tok), np.int32) for c, _ in pairs]
        tgt = [np.array(tok.encode_response(r), np.int32) for _, r in pairs]
        data[name] = {"src": src, "tgt": tgt}
        log("%s: %d pairs, %d src / %d tgt tokens" % (name, len(src), sum(len(x) for x in src),
                                                      sum(len(x) for x in tgt)))
    lim = a.max_source_length - 1 if a.max_source_length > 0 else 10 ** 9
    pre_ids = [np.array(x[:lim], np.int32) for x in tok.sp.encode(pre)] if pre else []
    data["pretrain"] = [x for x in pre_ids if len(x) >= 2]
    torch.save(data, data_path)
    log("encoded in %.0fs (%d pre-training lines kept)" % (time.time() - t, len(data["pretrain"])))
    return data


def make_batches(n, size, seed, epoch, salt, lengths=None, pool=64):
    """Shuffled consecutive chunks of `size` sample indices (the last may be smaller). With lengths
    (--length-buckets: (src_lens, tgt_lens) arrays), the shuffled indices are cut into pools of
    pool * size samples, each pool is sorted by target length (in steps of 4) then source length and
    cut into batches, and the batches are shuffled: a batch holds samples of similar lengths, so
    little of it is padding, while its samples stay a random draw of the epoch."""
    rs = np.random.RandomState((seed * 1000003 + epoch * 7919 + salt) % (2 ** 32))
    idx = rs.permutation(n)
    if lengths is None:
        return [idx[i:i + size].tolist() for i in range(0, n, size)]
    src_len, tgt_len = lengths
    out = []
    for p in range(0, n, pool * size):
        chunk = idx[p:p + pool * size]
        chunk = chunk[np.lexsort((src_len[chunk], tgt_len[chunk] // 4))]
        out += [chunk[i:i + size].tolist() for i in range(0, len(chunk), size)]
    return [out[i] for i in rs.permutation(len(out))]


def collate(src, tgt, device):
    """(src [B,S], src_pad [B,S], dec_in [B,T], labels [B,T] with -100 on padding)."""
    s, sp = R.pad_batch([x.tolist() for x in src])
    T = max(len(y) for y in tgt)
    labels = torch.full((len(tgt), T), IGNORE, dtype=torch.long)
    dec_in = torch.full((len(tgt), T), PAD, dtype=torch.long)
    for i, y in enumerate(tgt):
        y = torch.as_tensor(y.astype(np.int64))
        labels[i, :len(y)] = y
        dec_in[i, 0] = R.DECODER_START  # HF _shift_right
        dec_in[i, 1:len(y)] = y[:-1]
    return s.to(device), sp.to(device), dec_in.to(device), labels.to(device)


def infill_noise(ids, mask_id, ratio, mean_span, rs):
    """BART text infilling: ~ratio of the tokens, in spans of Poisson(mean_span)
    length (>= 1), each span replaced by one <mask>; returns (input, target)."""
    n = len(ids)
    n_mask = max(1, int(round(n * ratio)))
    masked = np.zeros(n, bool)
    guard = 0
    while masked.sum() < n_mask and guard < 100:
        guard += 1
        ln = max(1, int(rs.poisson(mean_span)))
        st = int(rs.randint(0, n))
        masked[st:st + ln] = True
    out = []
    prev = False
    for i in range(n):
        if masked[i]:
            if not prev:
                out.append(mask_id)
            prev = True
        else:
            out.append(int(ids[i]))
            prev = False
    return np.array(out + [EOS], np.int32), np.array(list(ids) + [EOS], np.int32)


# ------------------------------------------------------------------ losses

def token_loss(logits, labels):
    """HF T5ForConditionalGeneration loss: mean CE over the batch's non-ignored tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


def per_sample_token_losses(logits, labels):
    """EqHard-EM get_per_sample_loss: cross_entropy(logits[i], labels[i]) per sample (mean over its tokens)."""
    ce = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")
    return ce.sum(1) / labels.ne(IGNORE).sum(1).clamp(min=1)


def per_sample_losses(model, s, sp, dec_in, labels):
    """[B, K] losses of every decoder (encoder run once, as EqHard-EM)."""
    with torch.no_grad():
        enc = model.encode(s, sp)
        cols = [per_sample_token_losses(model.forward_encoded(enc, sp, dec_in, k), labels)
                for k in range(model.num_modes)]
    return torch.stack(cols, 1).cpu()


# ------------------------------------------------------------------ checkpoints

def to_eqhard_state_dict(model):
    """state dict with the aliases HF's MultiAdapterT5 / MultiDecoderT5 state_dict() has."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        out[k] = v
        if k == "shared.weight":
            out["encoder.embed_tokens.weight"] = v
            if model.kind != "transformer":
                out["decoder.embed_tokens.weight"] = v
    if model.config["tie_word_embeddings"]:
        out["lm_head.weight"] = sd["shared.weight"]
    return out


def from_eqhard_state_dict(sd, model):
    drop = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if model.config["tie_word_embeddings"]:
        drop.add("lm_head.weight")
    return {k: v for k, v in sd.items() if k not in drop}


def save_checkpoint(path, a, model, opt, state):
    ck = {
        "model": to_eqhard_state_dict(model),
        "optimizer": opt.state_dict(),
        "scaler": {},
        "training_steps": state["training_steps"],
        "epoch": state["iters"][state["source"]][0],
        "global_step": state["global_step"],
        "lr_scheduler": {"phase": state["phase"]},
        "config": dict(model.config),
        "nzserve": {
            "phase": state["phase"], "updates": state["updates"], "iters": state["iters"],
            "source": state["source"], "best": state.get("best"), "wall_seconds": state["wall"],
            "rewarm_from": state.get("rewarm_from"),
            "steps_trained_per_mode": state.get("per_mode"),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "noise_rng": state["noise_rs"].get_state(),
            "train_args": vars(a),
            "format": "EqHard-EM BaseTrainer checkpoint; model names of MultiAdapterT5 (adapter), "
                      "MultiDecoderT5 (transformer) or T5ForConditionalGeneration (phase 1)",
        },
    }
    tmp = path + ".tmp"
    torch.save(ck, tmp)
    os.replace(tmp, path)


def build_model(config, device):
    m = R.T5MultiDecoder(config)
    return m.to(device)


def set_trainable(model, a):
    if model.kind == "adapter" and not a.no_freeze:
        for n, p in model.named_parameters():
            p.requires_grad = ".adapters." in n
    else:
        for p in model.parameters():
            p.requires_grad = True


def make_optimizer(model, a, phase):
    if phase == 1:
        return torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), eps=1e-8,
                                 weight_decay=a.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=a.phase2_lr, weight_decay=a.phase2_weight_decay)


def lr_at(a, u, rewarm_from=None):
    """inverse sqrt with linear warm-up (phase 1); after --init-model at update rewarm_from, also a
    linear ramp over --rewarm-updates (fresh Adam moments)."""
    if a.warmup_updates > 0 and u < a.warmup_updates:
        lr = a.lr * (u + 1) / a.warmup_updates
    else:
        lr = a.lr * math.sqrt(max(a.warmup_updates, 1)) / math.sqrt(max(u + 1, 1))
    if rewarm_from is not None and a.rewarm_updates > 0 and u - rewarm_from < a.rewarm_updates:
        lr *= (u - rewarm_from + 1) / a.rewarm_updates
    return lr


# ------------------------------------------------------------------ snapshots (--init-model)

def read_init_model(a):
    """(config, state dict, training state) of --init-model DIR; copies its spm.model into OUT
    (so the corpus is encoded with the same ids). A phase-1 snapshot: K = 1, adapters dropped."""
    d = a.init_model
    with open(os.path.join(d, "config.json")) as f:
        conf = json.load(f)
    tr = conf.get("training")
    if not isinstance(tr, dict) or tr.get("phase") != 1:
        raise SystemExit("%s: config.json has no phase-1 \"training\" state (a snapshot_dialogue.py "
                         "snapshot has one)" % d)
    os.makedirs(a.out, exist_ok=True)
    dst = os.path.join(a.out, "spm.model")
    if os.path.exists(dst):
        with open(dst, "rb") as f1, open(os.path.join(d, "spm.model"), "rb") as f2:
            if f1.read() != f2.read():
                raise SystemExit("%s: spm.model differs from %s/spm.model: use a fresh --out" % (a.out, d))
    else:
        shutil.copyfile(os.path.join(d, "spm.model"), dst)
    sd = {k: v.float() for k, v in R.read_safetensors(os.path.join(d, "model.safetensors")).items()
          if ".adapters." not in k}
    conf = {k: v for k, v in conf.items() if k not in ("training", "architecture", "generation")}
    conf.update(multidecoder="none", num_modes=1)
    return R.make_config(conf, dropout_rate=a.dropout), sd, tr


# ------------------------------------------------------------------ validation / demo

@torch.no_grad()
def validate(model, a, valid, device):
    was = model.training
    model.eval()
    n = len(valid["src"])
    if n == 0:
        return {}
    K = model.num_modes
    tok_sum = np.zeros(K)
    tok_n = 0
    smin, sall = 0.0, np.zeros(K)
    for b in make_batches(n, 64, 0, 0, 0):
        s, sp, di, lb = collate([valid["src"][i] for i in b], [valid["tgt"][i] for i in b], device)
        enc = model.encode(s, sp)
        ntok = int(lb.ne(IGNORE).sum())
        ps = []
        for k in range(K):
            logits = model.forward_encoded(enc, sp, di, k)
            tok_sum[k] += float(token_loss(logits, lb)) * ntok
            ps.append(per_sample_token_losses(logits, lb).cpu())
        tok_n += ntok
        ps = torch.stack(ps, 1)
        smin += float(ps.min(1).values.sum())
        sall += ps.sum(0).numpy()
    model.train(was)
    out = {"nll": float(tok_sum.mean() / tok_n), "ppl": float(math.exp(min(20.0, tok_sum.mean() / tok_n)))}
    if K > 1:
        out["min_sample_loss"] = smin / n
        for k in range(K):
            out["nll_%d" % k] = float(tok_sum[k] / tok_n)
    out["select"] = out.get("min_sample_loss", out["nll"])
    return out


def final_decode(model, a, data, tok):
    n = min(a.decode_n, len(data["valid"]["src"]))
    if n <= 0:
        return
    model.eval()
    t0 = time.time()
    for i in range(n):
        src = data["valid"]["src"][i].tolist()
        outs = R.greedy(model, [src], None, max_new_tokens=a.max_target_length - 1)[0]
        turns, cur = [], []
        for x in src:
            if x == tok.sep_id:
                turns.append(cur)
                cur = []
            else:
                cur.append(x)
        turns.append(cur)
        print("CTX  %s" % " | ".join(tok.decode(t) for t in turns))
        print("REF  %s" % tok.decode(data["valid"]["tgt"][i].tolist()))
        for r in R.rank(outs):
            print("D%-2d  %s   (mean log-prob %.3f)" % (r["decoder"], tok.decode(r["tokens"]), r["mean_logprob"]))
    log("decoded %d contexts x %d decoders in %.1fs" % (n, model.num_modes, time.time() - t0))


# ------------------------------------------------------------------ main

def main(argv=None):
    """Parse argv and train; SIGTERM / SIGINT stop the run after the current update, with a checkpoint
    (as --max-minutes does). The previous handlers are back when it returns."""
    a = parse_args(argv)
    signalled = []
    old = {sig: signal.signal(sig, lambda num, frame: signalled.append(num))
           for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return train(a, signalled)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def train(a, signalled):
    """The run of parsed arguments a; signalled: the signals received so far (stop when not empty)."""
    torch.set_num_threads(a.threads)
    if torch.get_num_interop_threads() != 1:  # a second call aborts the process (in-process reruns)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    dev_name = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    if dev_name == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    init = read_init_model(a) if a.init_model else None  # before prepare(): its spm.model
    data = prepare(a)
    spm_path = os.path.join(a.out, "spm.model")
    tok = R.Tokenizer(spm_path, R.SEP_PIECE, a.max_context_turns, a.max_source_length, a.max_target_length)
    with open(os.path.join(a.out, "train_args.json"), "w") as f:
        json.dump(vars(a), f, indent=1, sort_keys=True)
    train, valid = data["train"], data["valid"]
    if a.pretrain_steps and not data["pretrain"]:
        raise SystemExit("--pretrain-steps needs --pretrain-text (and a fresh OUT/data.pt)")

    cfg1 = model_config(a, data["vocab_size"])
    state = {"phase": 1, "updates": 0, "training_steps": 0, "global_step": 0, "best": None, "wall": 0.0,
             "iters": {"pretrain": [1, 0], "dialogue": [1, 0], "eqhard": [1, 0]}, "source": "dialogue",
             "noise_rs": np.random.RandomState(a.seed + 17), "per_mode": None}
    last = os.path.join(a.out, "checkpoint_last.pt")
    ck = None
    if a.resume:
        ck = torch.load(last, map_location="cpu")
        ns = ck["nzserve"]
        state.update(phase=ns["phase"], updates=ns["updates"], iters=ns["iters"], source=ns["source"],
                     best=ns["best"], wall=ns["wall_seconds"], per_mode=ns.get("steps_trained_per_mode"),
                     rewarm_from=ns.get("rewarm_from"),
                     training_steps=ck["training_steps"], global_step=ck["global_step"])
        state["noise_rs"].set_state(ns["noise_rng"])
        cfg = R.make_config(ck["config"], dropout_rate=a.dropout)
        if a.dropout is not None and a.dropout != ck["config"].get("dropout_rate"):
            log("dropout %s -> %s from this update on" % (ck["config"].get("dropout_rate"), a.dropout))
    elif init is not None:
        cfg, tr = init[0], init[2]
        if cfg["vocab_size"] != data["vocab_size"]:
            raise SystemExit("--init-model: vocabulary %d, but OUT's encoded corpus has %d (a stale "
                             "OUT/data.pt?)" % (cfg["vocab_size"], data["vocab_size"]))
        state.update(updates=int(tr["updates"]), training_steps=int(tr["updates"]),
                     global_step=int(tr["updates"]), wall=float(tr.get("wall_seconds", 0.0)),
                     iters={**state["iters"], **{k: list(v) for k, v in tr.get("iters", {}).items()}})
        state["rewarm_from"] = state["updates"]
    else:
        cfg = cfg1
    torch.manual_seed(a.seed)
    model = build_model(cfg, device)
    if init is not None:
        model.load_state_dict(init[1], strict=True)
        log("initialised from %s: phase 1 update %d (dialogue epoch %d batch %d); fresh AdamW, learning "
            "rate ramped over %d updates" % (a.init_model, state["updates"], *state["iters"]["dialogue"],
                                             a.rewarm_updates))
        init = None
    elif ck is None:
        R.init_weights(model, a.seed)
    else:
        model.load_state_dict(from_eqhard_state_dict(ck["model"], model))
    set_trainable(model, a) if state["phase"] == 2 else None
    opt = make_optimizer(model, a, state["phase"])
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["nzserve"]["torch_rng"])
        if ck["nzserve"]["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["nzserve"]["cuda_rng"])
        log("resumed: phase %d update %d (%s epoch %d batch %d)" % (
            state["phase"], state["updates"], state["source"], *state["iters"][state["source"]]))
        del ck
    nparam = sum(p.numel() for p in model.parameters())
    log("model: %d parameters (%.2fM); vocab %d; phase %d (%s, K=%d); device %s" % (
        nparam, nparam / 1e6, cfg["vocab_size"], state["phase"], model.kind, model.num_modes, dev_name))

    phase1_total = a.pretrain_steps + a.phase1_steps
    t_start = time.time()
    wall0 = state["wall"]
    last_save = time.time()
    acc = {}
    acc_n, ntok, t_log = 0, 0, time.time()
    batches_cache = {}

    # --length-buckets: batches of similar lengths (the dialogue pairs; pre-training noise changes lengths)
    train_lengths = (np.array([len(x) for x in train["src"]]), np.array([len(y) for y in train["tgt"]])) \
        if a.length_buckets else None

    def next_batch(source, n_items, size, salt):
        ep, bi = state["iters"][source]
        key = (source, ep)
        lengths = train_lengths if source != "pretrain" else None
        if key not in batches_cache:
            batches_cache.clear()
            batches_cache[key] = make_batches(n_items, size, a.seed, ep, salt, lengths)
        bl = batches_cache[key]
        if bi >= len(bl):
            ep, bi = ep + 1, 0
            batches_cache.clear()
            batches_cache[(source, ep)] = bl = make_batches(n_items, size, a.seed, ep, salt, lengths)
            log("%s epoch %d: %d batches" % (source, ep, len(bl)))
        state["iters"][source] = [ep, bi + 1]
        return bl[bi]

    def do_validate_and_save(finished):
        nonlocal last_save
        u = state["updates"]
        if u % a.validate_interval_updates == 0 or finished:
            v = validate(model, a, valid, device)
            if v:
                log("valid phase %d update %d | %s" % (state["phase"], u, " ".join(
                    "%s %.4f" % kv for kv in sorted(v.items()))))
                if state["best"] is None or v["select"] < state["best"]:
                    state["best"] = v["select"]
                    save_checkpoint(os.path.join(a.out, "checkpoint_best.pt"), a, model, opt, state)
        if u % a.save_interval_updates == 0 or finished or time.time() - last_save > a.save_interval_minutes * 60:
            save_checkpoint(last, a, model, opt, state)
            last_save = time.time()
            log("saved %s (phase %d update %d)" % (last, state["phase"], u))

    def must_stop():
        if signalled:
            return "signal %d" % signalled[0]
        if a.max_minutes and (time.time() - t_start) > a.max_minutes * 60:
            return "--max-minutes"
        if a.interrupt_at and state["global_step"] >= a.interrupt_at:
            return "--interrupt-at"
        return ""

    stopped = False
    # ---------------- phase 1: denoising pre-training, then seq2seq
    model.train()
    progress = Progress(phase1_total, "phase 1", unit="updates", done=state["updates"]) \
        if state["phase"] == 1 else None
    while state["phase"] == 1 and state["updates"] < phase1_total:
        u = state["updates"]
        pre = u < a.pretrain_steps
        state["source"] = "pretrain" if pre else "dialogue"
        if pre:
            b = next_batch("pretrain", len(data["pretrain"]), a.batch_size, 1)
            pairs = [infill_noise(data["pretrain"][i], tok.sp.piece_to_id(R.MASK_PIECE), a.mask_ratio,
                                  a.mask_span, state["noise_rs"]) for i in b]
            s, sp, di, lb = collate([x for x, _ in pairs], [y for _, y in pairs], device)
        else:
            b = next_batch("dialogue", len(train["src"]), a.batch_size, 2)
            s, sp, di, lb = collate([train["src"][i] for i in b], [train["tgt"][i] for i in b], device)
        lr = lr_at(a, u, state.get("rewarm_from"))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = token_loss(model(s, sp, di, 0), lb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_norm if a.clip_norm > 0 else float("inf"))
        opt.step()
        state["updates"] += 1
        state["training_steps"] += 1
        state["global_step"] += 1
        u = state["updates"]
        k = "denoise" if pre else "loss"
        acc[k] = acc.get(k, 0.0) + float(loss)
        acc["gnorm"] = acc.get("gnorm", 0.0) + float(gn)
        acc_n += 1
        ntok += int(lb.ne(IGNORE).sum()) + int((~sp).sum())
        progress.update(u, note="%s %.3f" % (k, acc[k] / acc_n))
        if u % a.log_interval == 0 or u == phase1_total:
            dt = time.time() - t_log
            log("update %d phase 1 (%s) epoch %d lr %.3g | %s | %.0f tok/s" % (
                u, state["source"], state["iters"][state["source"]][0], lr,
                " ".join("%s %.4f" % (kk, vv / acc_n) for kk, vv in sorted(acc.items())), ntok / dt))
            acc, acc_n, ntok, t_log = {}, 0, 0, time.time()
        state["wall"] = wall0 + time.time() - t_start
        out_of_time = must_stop()
        do_validate_and_save(u >= phase1_total or out_of_time)
        if out_of_time:
            log("stopping: %s reached" % out_of_time)
            stopped = True
            break
    if progress:
        progress.close()

    # ---------------- phase 1 -> phase 2
    if not stopped and state["phase"] == 1:
        torch.save({"model": to_eqhard_state_dict(model), "config": dict(model.config)},
                   os.path.join(a.out, "phase1.pt"))
        log("phase 1 done (%d updates): %s" % (state["updates"], os.path.join(a.out, "phase1.pt")))
        if a.phase2_steps > 0:
            model = R.multi_from_single(model.cpu(), a.num_modes, a.decoder,
                                        max(1, int(a.d_model * a.proj_ratio)), seed=a.seed + 2).to(device)
            set_trainable(model, a)
            opt = make_optimizer(model, a, 2)
            state.update(phase=2, updates=0, best=None, source="eqhard", per_mode=[0] * a.num_modes)
            ntrain = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log("phase 2: EqHard-EM, %s decoders K=%d, %d trainable parameters, loader batch %d" % (
                a.decoder, a.num_modes, ntrain, a.num_modes * a.eq_batch_size))

    # ---------------- phase 2: EqHard-EM
    if state["phase"] == 2:
        model.train()
        K = model.num_modes
        bs = a.eq_batch_size
        if state["per_mode"] is None:
            state["per_mode"] = [0] * K
        progress = Progress(a.phase2_steps, "phase 2", unit="updates", done=state["updates"])
    while not stopped and state["phase"] == 2 and state["updates"] < a.phase2_steps:
        b = next_batch("eqhard", len(train["src"]), K * bs, 3)
        s, sp, di, lb = collate([train["src"][i] for i in b], [train["tgt"][i] for i in b], device)
        if a.assign_eval:
            model.eval()
        L = per_sample_losses(model, s, sp, di, lb)
        model.train()
        assign = R.eqhard_assign(L)
        for i in range(K):
            idx = np.nonzero(assign == i)[0][:bs]
            if len(idx) == 0:
                continue
            ii = torch.as_tensor(idx, device=device)
            sub_lb = lb[ii]
            T = int(sub_lb.ne(IGNORE).sum(1).max())
            loss = token_loss(model(s[ii], sp[ii], di[ii][:, :T], i), sub_lb[:, :T])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if a.phase2_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.phase2_clip_norm)
            opt.step()
            state["training_steps"] += 1
            state["per_mode"][i] += 1
            acc["loss_%d" % i] = acc.get("loss_%d" % i, 0.0) + float(loss)
            acc["n_%d" % i] = acc.get("n_%d" % i, 0.0) + len(idx)
        acc["assigned_loss"] = acc.get("assigned_loss", 0.0) + float(L[np.arange(len(b)), assign].mean())
        acc["min_loss"] = acc.get("min_loss", 0.0) + float(L.min(1).values.mean())
        acc_n += 1
        ntok += int(lb.ne(IGNORE).sum()) * (K + 1) + int((~sp).sum()) * (K + 1)
        state["updates"] += 1
        state["global_step"] += 1
        u = state["updates"]
        progress.update(u, note="assigned_loss %.3f" % (acc["assigned_loss"] / acc_n))
        if u % a.log_interval == 0 or u == a.phase2_steps:
            dt = time.time() - t_log
            parts = ["loss %s" % ",".join("%.3f" % (acc.get("loss_%d" % i, 0.0) / acc_n) for i in range(K)),
                     "assigned %s" % ",".join("%d" % acc.get("n_%d" % i, 0) for i in range(K)),
                     "assigned_loss %.4f" % (acc["assigned_loss"] / acc_n), "min_loss %.4f" % (acc["min_loss"] / acc_n)]
            log("update %d phase 2 epoch %d | %s | %.0f tok/s" % (u, state["iters"]["eqhard"][0], " | ".join(parts),
                                                                  ntok / dt))
            tot = sum(state["per_mode"]) or 1
            log("percent trained: %s" % " ".join("%d:%.1f%%" % (i, 100.0 * c / tot)
                                                 for i, c in enumerate(state["per_mode"])))
            acc, acc_n, ntok, t_log = {}, 0, 0, time.time()
        state["wall"] = wall0 + time.time() - t_start
        out_of_time = must_stop()
        do_validate_and_save(u >= a.phase2_steps or out_of_time)
        if out_of_time:
            log("stopping: %s reached" % out_of_time)
            stopped = True
    if state["phase"] == 2:
        progress.close()

    finished = (state["phase"] == 2 and state["updates"] >= a.phase2_steps) or \
               (state["phase"] == 1 and state["updates"] >= phase1_total and a.phase2_steps == 0)
    if not stopped and not os.path.exists(last):
        save_checkpoint(last, a, model, opt, state)
    model.eval()
    if finished and not a.no_final_decode:
        final_decode(model, a, data, tok)
    if a.export:
        conf = R.save_model_dir(model.cpu(), a.export, spm_path)
        log("exported %s (%s, K=%d)" % (a.export, conf["multidecoder"], conf["num_modes"]))
    log("done: phase %d update %d, %.1f min this run" % (state["phase"], state["updates"],
                                                          (time.time() - t_start) / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
