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
from dialogue_data import IGNORE, collate, infill_noise, make_batches, prepare  # noqa: E402
from progress import Progress, log  # noqa: E402
from torch_setup import setup_torch  # noqa: E402

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
    p.add_argument("--adapter-init", choices=("default", "zero"), default="default",
                   help="phase 2 adapters: nn.Linear's default init (EqHard-EM) or zero output projections, so "
                        "every decoder starts as the phase-1 decoder (the default init costs ~0.08 nats of valid NLL "
                        "that a short phase 2 does not win back)")
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
    p.add_argument("--decay-updates", type=int, default=0,
                   help="the last N phase-1 updates decay the learning rate linearly to 0 (keep the checkpoint "
                        "where they start to continue phase 1 later without the decay)")
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
                        "(phase 1 or 2, update or round count, data position; phase 2: its K decoders and "
                        "their step counts); the optimizer starts afresh")
    p.add_argument("--rewarm-updates", type=int, default=200,
                   help="with --init-model in phase 1: the learning rate ramps up linearly over this many "
                        "updates (Adam's moments start from zero; phase 2's constant rate is not ramped)")
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


def lr_at(a, u, rewarm_from=None, total=0):
    """inverse sqrt with linear warm-up (phase 1); after --init-model at update rewarm_from, also a
    linear ramp over --rewarm-updates (fresh Adam moments); the last --decay-updates of the total
    phase-1 updates fall linearly from the rate where they start to 0 (the last one 1/--decay-updates
    of it)."""
    d = getattr(a, "decay_updates", 0)
    if total and d > 0 and total - d <= u < total:
        return lr_at(a, total - d, rewarm_from) * (total - u) / d
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
    (so the corpus is encoded with the same ids). A phase-1 snapshot: K = 1, adapters dropped; a
    phase-2 snapshot: its K decoders, which must match --num-modes and --decoder."""
    d = a.init_model
    with open(os.path.join(d, "config.json")) as f:
        conf = json.load(f)
    tr = conf.get("training")
    if not isinstance(tr, dict) or tr.get("phase") not in (1, 2):
        raise SystemExit("%s: config.json has no phase-1 or phase-2 \"training\" state (a "
                         "snapshot_dialogue.py snapshot has one)" % d)
    phase2 = tr["phase"] == 2
    if phase2 and (conf.get("num_modes"), conf.get("multidecoder")) != (a.num_modes, a.decoder):
        raise SystemExit("%s: a phase-2 snapshot of K=%s %s decoders, but this run asks for --num-modes %d "
                         "--decoder %s" % (d, conf.get("num_modes"), conf.get("multidecoder"), a.num_modes,
                                           a.decoder))
    os.makedirs(a.out, exist_ok=True)
    dst = os.path.join(a.out, "spm.model")
    if os.path.exists(dst):
        with open(dst, "rb") as f1, open(os.path.join(d, "spm.model"), "rb") as f2:
            if f1.read() != f2.read():
                raise SystemExit("%s: spm.model differs from %s/spm.model: use a fresh --out" % (a.out, d))
    else:
        shutil.copyfile(os.path.join(d, "spm.model"), dst)
    sd = {k: v.float() for k, v in R.read_safetensors(os.path.join(d, "model.safetensors")).items()
          if phase2 or ".adapters." not in k}
    conf = {k: v for k, v in conf.items() if k not in ("training", "architecture", "generation")}
    if not phase2:
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


def new_state(a):
    """The run's state as a checkpoint keeps it ("nzserve"), at update 0 of phase 1."""
    return {"phase": 1, "updates": 0, "training_steps": 0, "global_step": 0, "best": None, "wall": 0.0,
            "iters": {"pretrain": [1, 0], "dialogue": [1, 0], "eqhard": [1, 0]}, "source": "dialogue",
            "noise_rs": np.random.RandomState(a.seed + 17), "per_mode": None}


class Run:
    """One training run: the encoded data, the model and its optimizer, the state a checkpoint keeps,
    and the bookkeeping of logging, validation, saving and stopping. train() drives it through
    phase 1 (Run.phase1), the switch to K decoders (Run.to_phase2) and EqHard-EM (Run.phase2)."""

    def __init__(self, a, signalled):
        """Set up from parsed arguments a (new, --resume or --init-model); signalled: the signals
        received so far (the run stops after the current update when it is not empty)."""
        self.a, self.signalled = a, signalled
        self.device = setup_torch(a.threads, a.device)
        init = read_init_model(a) if a.init_model else None  # before prepare(): its spm.model
        self.data = prepare(a)
        self.spm_path = os.path.join(a.out, "spm.model")
        self.tok = R.Tokenizer(self.spm_path, R.SEP_PIECE, a.max_context_turns, a.max_source_length,
                               a.max_target_length)
        with open(os.path.join(a.out, "train_args.json"), "w") as f:
            json.dump(vars(a), f, indent=1, sort_keys=True)
        self.train, self.valid = self.data["train"], self.data["valid"]
        if a.pretrain_steps and not self.data["pretrain"]:
            raise SystemExit("--pretrain-steps needs --pretrain-text (and a fresh OUT/data.pt)")
        self.last = os.path.join(a.out, "checkpoint_last.pt")
        self.state = new_state(a)
        self._open_model(init)
        self.phase1_total = a.pretrain_steps + a.phase1_steps
        self.t_start = self.last_save = self.t_log = time.time()
        self.wall0 = self.state["wall"]
        self.acc, self.acc_n, self.ntok = {}, 0, 0
        self.batches = {}  # (source, epoch) -> that epoch's batches (one epoch kept)
        # --length-buckets: batches of similar lengths (the dialogue pairs; pre-training noise changes lengths)
        self.lengths = (np.array([len(x) for x in self.train["src"]]),
                        np.array([len(y) for y in self.train["tgt"]])) if a.length_buckets else None
        self.stopped = False

    def _open_model(self, init):
        """The model and optimizer: from OUT/checkpoint_last.pt (--resume: weights, optimizer, RNGs and
        state exactly), from a snapshot directory (--init-model: weights and data position, a fresh
        AdamW), or new (initialised from --seed)."""
        a, state = self.a, self.state
        ck = None
        if a.resume:
            ck = torch.load(self.last, map_location="cpu")
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
            if cfg["vocab_size"] != self.data["vocab_size"]:
                raise SystemExit("--init-model: vocabulary %d, but OUT's encoded corpus has %d (a stale "
                                 "OUT/data.pt?)" % (cfg["vocab_size"], self.data["vocab_size"]))
            steps = int(tr.get("global_step", tr["updates"]))
            state.update(updates=int(tr["updates"]), training_steps=int(tr.get("training_steps", steps)),
                         global_step=steps, wall=float(tr.get("wall_seconds", 0.0)),
                         iters={**state["iters"], **{k: list(v) for k, v in tr.get("iters", {}).items()}})
            if tr["phase"] == 2:  # EqHard rounds go on at a constant learning rate: no ramp
                state.update(phase=2, source="eqhard", per_mode=list(tr["per_mode"]))
            else:
                state["rewarm_from"] = state["updates"]
        else:
            cfg = model_config(a, self.data["vocab_size"])
        torch.manual_seed(a.seed)
        self.model = model = build_model(cfg, self.device)
        if init is not None:
            model.load_state_dict(init[1], strict=True)
            if state["phase"] == 2:
                log("initialised from %s: phase 2 round %d (eqhard epoch %d batch %d, K=%d); fresh AdamW" % (
                    a.init_model, state["updates"], *state["iters"]["eqhard"], model.num_modes))
            else:
                log("initialised from %s: phase 1 update %d (dialogue epoch %d batch %d); fresh AdamW, "
                    "learning rate ramped over %d updates" % (a.init_model, state["updates"],
                                                              *state["iters"]["dialogue"], a.rewarm_updates))
        elif ck is None:
            R.init_weights(model, a.seed)
        else:
            model.load_state_dict(from_eqhard_state_dict(ck["model"], model))
        set_trainable(model, a) if state["phase"] == 2 else None
        self.opt = make_optimizer(model, a, state["phase"])
        if ck is not None:
            self.opt.load_state_dict(ck["optimizer"])
            torch.set_rng_state(ck["nzserve"]["torch_rng"])
            if ck["nzserve"]["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ck["nzserve"]["cuda_rng"])
            log("resumed: phase %d update %d (%s epoch %d batch %d)" % (
                state["phase"], state["updates"], state["source"], *state["iters"][state["source"]]))
        nparam = sum(p.numel() for p in model.parameters())
        log("model: %d parameters (%.2fM); vocab %d; phase %d (%s, K=%d); device %s" % (
            nparam, nparam / 1e6, cfg["vocab_size"], state["phase"], model.kind, model.num_modes,
            self.device.type))

    def next_batch(self, source, n_items, size, salt):
        """The sample indices of `source`'s next batch (a new epoch's batches when one runs out)."""
        a, state = self.a, self.state
        ep, bi = state["iters"][source]
        lengths = self.lengths if source != "pretrain" else None
        if (source, ep) not in self.batches:
            self.batches.clear()
            self.batches[(source, ep)] = make_batches(n_items, size, a.seed, ep, salt, lengths)
        bl = self.batches[(source, ep)]
        if bi >= len(bl):
            ep, bi = ep + 1, 0
            self.batches.clear()
            self.batches[(source, ep)] = bl = make_batches(n_items, size, a.seed, ep, salt, lengths)
            log("%s epoch %d: %d batches" % (source, ep, len(bl)))
        state["iters"][source] = [ep, bi + 1]
        return bl[bi]

    def batch_tensors(self, idx):
        """collate() of the training pairs idx."""
        return collate([self.train["src"][i] for i in idx], [self.train["tgt"][i] for i in idx], self.device)

    def must_stop(self):
        """Why the run stops after this update ("" to go on)."""
        a = self.a
        if self.signalled:
            return "signal %d" % self.signalled[0]
        if a.max_minutes and (time.time() - self.t_start) > a.max_minutes * 60:
            return "--max-minutes"
        if a.interrupt_at and self.state["global_step"] >= a.interrupt_at:
            return "--interrupt-at"
        return ""

    def end_update(self, phase_total):
        """After an update: validate and save when due (and at the end of the phase or run).
        @return True when the run stops here."""
        a, state = self.a, self.state
        state["wall"] = self.wall0 + time.time() - self.t_start
        why = self.must_stop()
        u = state["updates"]
        finished = u >= phase_total or bool(why)
        if u % a.validate_interval_updates == 0 or finished:
            v = validate(self.model, a, self.valid, self.device)
            if v:
                log("valid phase %d update %d | %s" % (state["phase"], u, " ".join(
                    "%s %.4f" % kv for kv in sorted(v.items()))))
                if state["best"] is None or v["select"] < state["best"]:
                    state["best"] = v["select"]
                    save_checkpoint(os.path.join(a.out, "checkpoint_best.pt"), a, self.model, self.opt, state)
        if u % a.save_interval_updates == 0 or finished or \
                time.time() - self.last_save > a.save_interval_minutes * 60:
            save_checkpoint(self.last, a, self.model, self.opt, state)
            self.last_save = time.time()
            log("saved %s (phase %d update %d)" % (self.last, state["phase"], u))
        if why:
            log("stopping: %s reached" % why)
            self.stopped = True
        return self.stopped

    def take_log(self):
        """The mean of each accumulated value since the last log line, and the tokens per second;
        starts the next interval."""
        means = {k: v / self.acc_n for k, v in self.acc.items()}
        rate = self.ntok / (time.time() - self.t_log)
        self.acc, self.acc_n, self.ntok, self.t_log = {}, 0, 0, time.time()
        return means, rate

    def add(self, key, value):
        self.acc[key] = self.acc.get(key, 0.0) + value

    # ---------------- phase 1: denoising pre-training, then seq2seq

    def phase1_update(self):
        """One update of phase 1 (a denoising batch while u < --pretrain-steps, else a dialogue batch)."""
        a, state = self.a, self.state
        u = state["updates"]
        pre = u < a.pretrain_steps
        state["source"] = "pretrain" if pre else "dialogue"
        if pre:
            b = self.next_batch("pretrain", len(self.data["pretrain"]), a.batch_size, 1)
            mask_id = self.tok.sp.piece_to_id(R.MASK_PIECE)
            pairs = [infill_noise(self.data["pretrain"][i], mask_id, a.mask_ratio, a.mask_span, state["noise_rs"])
                     for i in b]
            s, sp, di, lb = collate([x for x, _ in pairs], [y for _, y in pairs], self.device)
        else:
            s, sp, di, lb = self.batch_tensors(self.next_batch("dialogue", len(self.train["src"]), a.batch_size, 2))
        lr = lr_at(a, u, state.get("rewarm_from"), self.phase1_total)
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = token_loss(self.model(s, sp, di, 0), lb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                            a.clip_norm if a.clip_norm > 0 else float("inf"))
        self.opt.step()
        for k in ("updates", "training_steps", "global_step"):
            state[k] += 1
        k = "denoise" if pre else "loss"
        self.add(k, float(loss))
        self.add("gnorm", float(gn))
        self.acc_n += 1
        self.ntok += int(lb.ne(IGNORE).sum()) + int((~sp).sum())
        self.progress.update(state["updates"], note="%s %.3f" % (k, self.acc[k] / self.acc_n))
        if state["updates"] % a.log_interval == 0 or state["updates"] == self.phase1_total:
            means, rate = self.take_log()
            log("update %d phase 1 (%s) epoch %d lr %.3g | %s | %.0f tok/s" % (
                state["updates"], state["source"], state["iters"][state["source"]][0], lr,
                " ".join("%s %.4f" % kv for kv in sorted(means.items())), rate))

    def phase1(self):
        if self.state["phase"] != 1:
            return
        self.model.train()
        self.progress = Progress(self.phase1_total, "phase 1", unit="updates", done=self.state["updates"])
        while self.state["updates"] < self.phase1_total:
            self.phase1_update()
            if self.end_update(self.phase1_total):
                break
        self.progress.close()

    def to_phase2(self):
        """Phase 1 done: OUT/phase1.pt, then K decoders on the phase-1 model (--phase2-steps > 0)."""
        a, state = self.a, self.state
        if self.stopped or state["phase"] != 1:
            return
        torch.save({"model": to_eqhard_state_dict(self.model), "config": dict(self.model.config)},
                   os.path.join(a.out, "phase1.pt"))
        log("phase 1 done (%d updates): %s" % (state["updates"], os.path.join(a.out, "phase1.pt")))
        if a.phase2_steps <= 0:
            return
        self.model = R.multi_from_single(self.model.cpu(), a.num_modes, a.decoder,
                                         max(1, int(a.d_model * a.proj_ratio)), seed=a.seed + 2,
                                         adapter_init=a.adapter_init).to(self.device)
        set_trainable(self.model, a)
        self.opt = make_optimizer(self.model, a, 2)
        state.update(phase=2, updates=0, best=None, source="eqhard", per_mode=[0] * a.num_modes)
        ntrain = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log("phase 2: EqHard-EM, %s decoders K=%d, %d trainable parameters, loader batch %d" % (
            a.decoder, a.num_modes, ntrain, a.num_modes * a.eq_batch_size))

    # ---------------- phase 2: EqHard-EM

    def phase2_round(self):
        """One EqHard-EM round: a loader batch of K * --eq-batch-size pairs, every decoder's per-sample
        losses, the equal-size assignment, then one optimizer step per decoder on its samples."""
        a, state, model = self.a, self.state, self.model
        K, bs = model.num_modes, a.eq_batch_size
        b = self.next_batch("eqhard", len(self.train["src"]), K * bs, 3)
        s, sp, di, lb = self.batch_tensors(b)
        if a.assign_eval:
            model.eval()
        L = per_sample_losses(model, s, sp, di, lb)
        model.train()
        assign = R.eqhard_assign(L)
        for i in range(K):
            idx = np.nonzero(assign == i)[0][:bs]
            if len(idx) == 0:
                continue
            ii = torch.as_tensor(idx, device=self.device)
            sub_lb = lb[ii]
            T = int(sub_lb.ne(IGNORE).sum(1).max())
            loss = token_loss(model(s[ii], sp[ii], di[ii][:, :T], i), sub_lb[:, :T])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if a.phase2_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.phase2_clip_norm)
            self.opt.step()
            state["training_steps"] += 1
            state["per_mode"][i] += 1
            self.add("loss_%d" % i, float(loss))
            self.add("n_%d" % i, len(idx))
        self.add("assigned_loss", float(L[np.arange(len(b)), assign].mean()))
        self.add("min_loss", float(L.min(1).values.mean()))
        self.acc_n += 1
        self.ntok += int(lb.ne(IGNORE).sum()) * (K + 1) + int((~sp).sum()) * (K + 1)
        state["updates"] += 1
        state["global_step"] += 1
        u = state["updates"]
        self.progress.update(u, note="assigned_loss %.3f" % (self.acc["assigned_loss"] / self.acc_n))
        if u % a.log_interval == 0 or u == a.phase2_steps:
            n = {i: self.acc.get("n_%d" % i, 0) for i in range(K)}
            means, rate = self.take_log()
            parts = ["loss %s" % ",".join("%.3f" % means.get("loss_%d" % i, 0.0) for i in range(K)),
                     "assigned %s" % ",".join("%d" % n[i] for i in range(K)),
                     "assigned_loss %.4f" % means["assigned_loss"], "min_loss %.4f" % means["min_loss"]]
            log("update %d phase 2 epoch %d | %s | %.0f tok/s" % (u, state["iters"]["eqhard"][0],
                                                                  " | ".join(parts), rate))
            tot = sum(state["per_mode"]) or 1
            log("percent trained: %s" % " ".join("%d:%.1f%%" % (i, 100.0 * c / tot)
                                                 for i, c in enumerate(state["per_mode"])))

    def phase2(self):
        state = self.state
        if self.stopped or state["phase"] != 2:
            return
        self.model.train()
        if state["per_mode"] is None:
            state["per_mode"] = [0] * self.model.num_modes
        self.progress = Progress(self.a.phase2_steps, "phase 2", unit="updates", done=state["updates"])
        while state["updates"] < self.a.phase2_steps:
            self.phase2_round()
            if self.end_update(self.a.phase2_steps):
                break
        self.progress.close()

    def finish(self):
        """The end of the run: a checkpoint if none exists, the demo decode (a finished run) and --export.
        @return 0."""
        a, state = self.a, self.state
        finished = (state["phase"] == 2 and state["updates"] >= a.phase2_steps) or \
                   (state["phase"] == 1 and state["updates"] >= self.phase1_total and a.phase2_steps == 0)
        if not self.stopped and not os.path.exists(self.last):
            save_checkpoint(self.last, a, self.model, self.opt, state)
        self.model.eval()
        if finished and not a.no_final_decode:
            final_decode(self.model, a, self.data, self.tok)
        if a.export:
            conf = R.save_model_dir(self.model.cpu(), a.export, self.spm_path)
            log("exported %s (%s, K=%d)" % (a.export, conf["multidecoder"], conf["num_modes"]))
        log("done: phase %d update %d, %.1f min this run" % (state["phase"], state["updates"],
                                                              (time.time() - self.t_start) / 60))
        return 0


def train(a, signalled):
    """The run of parsed arguments a; signalled: the signals received so far (stop when not empty).
    @return 0 (errors raise SystemExit with a message)."""
    run = Run(a, signalled)
    run.phase1()
    run.to_phase2()
    run.phase2()
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
