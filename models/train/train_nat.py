#!/usr/bin/python3
"""Train the multi-task NAT (shared encoder, CMLM decoder + AT decoder) en->de.

    /usr/bin/python3 models/train/train_nat.py --corpus /var/tmp/nzserve-corpus \
        --out /var/tmp/nzserve-nat [--steps N] [--resume] [--device cpu|cuda] \
        [--seed S] [--threads T] [model size / optimisation options]

Steps: (1) SentencePiece (joint, on train.en + train.de) -> OUT/spm.model,
(2) fairseq dictionary -> OUT/dict.txt, (3) corpus -> ids (OUT/data.pt),
(4) training with checkpoints OUT/checkpoint_last.pt / checkpoint_best.pt in
fairseq's checkpoint layout (multi-task-nat ``mt_transformer`` state-dict names,
or fairseq ``cmlm_transformer`` ones with --at-decoder-layers 0),
(5) a short greedy-AT / mask-predict decode of some valid sentences.

Sequence-level distillation (multi-task-nat's recipe): --distill DIR trains the
CMLM decoder and the length predictor on DIR/train.<tgt> (the AT teacher's
translations of train.<src>, line by line, see distill.sh) while the AT decoder
keeps the original targets; --init-from MODELDIR starts from a converted model
directory (its spm.model and dict.txt, its weights, and its update count for the
schedules) instead of a fresh initialisation.

Needs only Debian's python3-torch, python3-sentencepiece, python3-numpy.
See README_train.md.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nat_ref  # noqa: E402
from nat_ref import BOS, EOS, PAD, UNK  # noqa: E402
from progress import Progress, log  # noqa: E402
from torch_setup import setup_torch  # noqa: E402

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


# ------------------------------------------------------------------ arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="dir with {train,valid}.{en,de}")
    p.add_argument("--out", required=True)
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--steps", type=int, default=30000,
                   help="max updates (fairseq --max-update; also the AT/NAT weight schedule length)")
    p.add_argument("--interrupt-at", type=int, default=0,
                   help="stop (with a checkpoint) after this many updates without changing the schedule")
    p.add_argument("--max-minutes", type=float, default=0, help="stop after this wall time (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N train pairs")
    p.add_argument("--valid-limit", type=int, default=0, help="use only the first N valid pairs")
    # sentencepiece / dictionary
    p.add_argument("--distill", default=None,
                   help="dir with train.<tgt>: distilled targets for the CMLM decoder and length predictor")
    p.add_argument("--init-from", default=None,
                   help="converted model dir (config.json, model.safetensors, spm.model, dict.txt) to start from")
    p.add_argument("--rewarm-updates", type=int, default=100,
                   help="with --init-from: linear lr warm-up over this many updates for the fresh optimiser")
    p.add_argument("--spm-vocab", type=int, default=8000)
    p.add_argument("--spm-type", default="unigram", choices=["unigram", "bpe"])
    # architecture (fairseq names)
    p.add_argument("--encoder-embed-dim", type=int, default=256)
    p.add_argument("--encoder-ffn-embed-dim", type=int, default=1024)
    p.add_argument("--encoder-layers", type=int, default=5)
    p.add_argument("--encoder-attention-heads", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=3, help="CMLM decoder layers")
    p.add_argument("--at-decoder-layers", type=int, default=None,
                   help="AT decoder layers (default = --decoder-layers, as mt_transformer; 0 = plain CMLM)")
    p.add_argument("--decoder-attention-heads", type=int, default=None)
    p.add_argument("--decoder-ffn-embed-dim", type=int, default=None)
    p.add_argument("--max-positions", type=int, default=256,
                   help="max_source_positions = max_target_positions")
    p.add_argument("--sinusoidal-pos", action="store_true",
                   help="sinusoidal positions (default: learned, as multi-task-nat's run/train.sh)")
    p.add_argument("--normalize-before", action="store_true", help="pre-norm encoder and decoders")
    p.add_argument("--activation-fn", default="relu", choices=["relu", "gelu"])
    p.add_argument("--pred-length-offset", action="store_true")
    p.add_argument("--length-loss-factor", type=float, default=0.1)
    p.add_argument("--no-bert-init", action="store_true",
                   help="fairseq default init instead of --apply-bert-init (multi-task-nat's setting)")
    # optimisation
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--activation-dropout", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup-updates", type=int, default=1000)
    p.add_argument("--warmup-init-lr", type=float, default=1e-7)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--weight-schedule", default="linear", choices=["linear", "fixed"],
                   help="linear: at_weight = 1 - u/max_update, nat_weight = u/max_update "
                        "(what multi-task-nat's mt_loss does); fixed: --at-weight/--nat-weight")
    p.add_argument("--at-weight", type=float, default=0.5)
    p.add_argument("--nat-weight", type=float, default=0.5)
    # bookkeeping
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--save-interval-updates", type=int, default=1000)
    p.add_argument("--save-interval-minutes", type=float, default=15)
    p.add_argument("--validate-interval-updates", type=int, default=1000)
    p.add_argument("--decode-n", type=int, default=8, help="valid sentences decoded at the end")
    p.add_argument("--no-final-decode", action="store_true")
    a = p.parse_args(argv)
    if a.at_decoder_layers is None:
        a.at_decoder_layers = a.decoder_layers
    return a


def fairseq_args(a, vocab_size):
    """argparse.Namespace with fairseq's argument names (what checkpoint['args'] holds)."""
    mt = a.at_decoder_layers > 0
    d = a.encoder_embed_dim
    ns = argparse.Namespace(
        arch="mt_transformer" if mt else "cmlm_transformer",
        task="translation_mt" if mt else "translation_lev",
        criterion="mt_loss" if mt else "nat_loss",
        noise="random_mask", source_lang=a.src, target_lang=a.tgt,
        data=os.path.abspath(a.out),
        encoder_embed_dim=d, encoder_ffn_embed_dim=a.encoder_ffn_embed_dim,
        encoder_layers=a.encoder_layers, encoder_attention_heads=a.encoder_attention_heads,
        encoder_normalize_before=a.normalize_before, encoder_learned_pos=not a.sinusoidal_pos,
        decoder_embed_dim=d,
        decoder_ffn_embed_dim=a.decoder_ffn_embed_dim or a.encoder_ffn_embed_dim,
        decoder_layers=a.decoder_layers,
        decoder_attention_heads=a.decoder_attention_heads or a.encoder_attention_heads,
        decoder_normalize_before=a.normalize_before, decoder_learned_pos=not a.sinusoidal_pos,
        decoder_output_dim=d, decoder_input_dim=d,
        at_decoder_layers=a.at_decoder_layers,
        max_source_positions=a.max_positions, max_target_positions=a.max_positions,
        activation_fn=a.activation_fn, dropout=a.dropout,
        attention_dropout=a.attention_dropout, activation_dropout=a.activation_dropout,
        share_all_embeddings=True, share_decoder_input_output_embed=True,
        share_encoder=True, share_decoder=False,
        no_scale_embedding=False, no_token_positional_embeddings=False,
        layernorm_embedding=False, adaptive_input=False, adaptive_softmax_cutoff=None,
        apply_bert_init=not a.no_bert_init,
        pred_length_offset=a.pred_length_offset, length_loss_factor=a.length_loss_factor,
        sg_length_pred=False, src_embedding_copy=False, ngram_predictor=1,
        label_smoothing=a.label_smoothing,
        optimizer="adam", adam_betas="(0.9, 0.98)", adam_eps=1e-8, weight_decay=a.weight_decay,
        lr=[a.lr], lr_scheduler="inverse_sqrt", warmup_updates=a.warmup_updates,
        warmup_init_lr=a.warmup_init_lr, clip_norm=a.clip_norm,
        max_tokens=a.max_tokens, max_update=a.steps, seed=a.seed,
        at_weight=a.at_weight, nat_weight=a.nat_weight, at_drop_rate=0.0, nat_drop_rate=0.0,
        selection_criterion="nat", weight_schedule=a.weight_schedule,
        left_pad_source=False, left_pad_target=False,
        tgt_prepend_bos=True, src_prepend_bos=True, at_prepend_bos=False,
        bpe="sentencepiece", sentencepiece_model="spm.model",
        vocab_size=vocab_size,
    )
    return ns


# ------------------------------------------------------------------ data

def read_lines(path, limit=0):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f]
    return lines[:limit] if limit else lines


def train_spm(a, spm_prefix):
    import sentencepiece as spm
    files = [os.path.join(a.corpus, "train." + a.src), os.path.join(a.corpus, "train." + a.tgt)]
    if a.train_limit:
        # train on the same slice the model trains on
        tmp = spm_prefix + ".input.txt"
        with open(tmp, "w", encoding="utf-8") as f:
            for fn in files:
                for l in read_lines(fn, a.train_limit):
                    f.write(l + "\n")
        files = [tmp]
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=spm_prefix, vocab_size=a.spm_vocab,
        model_type=a.spm_type, character_coverage=1.0, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=1, hard_vocab_limit=False,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)


def build_dict(piece_lists, path):
    """fairseq-preprocess --joined-dictionary: counts, sorted by (-count, piece),
    padded with madeupwordNNNN (count 0) to a multiple of 8 including the 4 specials."""
    counts = {}
    for pieces in piece_lists:
        for p in pieces:
            counts[p] = counts.get(p, 0) + 1
    for s in SPECIALS:
        counts.pop(s, None)
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    i = 0
    while (len(items) + len(SPECIALS)) % 8:
        items.append(("madeupword%04d" % i, 0))
        i += 1
    with open(path, "w", encoding="utf-8") as f:
        for k, v in items:
            f.write("%s %d\n" % (k, v))
    return SPECIALS + [k for k, _ in items]


def encode_distilled(a, sp, index, tgt_fallback):
    """Distilled CMLM targets: DIR/train.<tgt> line i is the teacher's translation of train.<src>
    line i. An empty line or one with <unk> (the teacher failed or emitted unknown pieces) keeps
    the original target. @return list of id lists, aligned with the train pairs."""
    lines = read_lines(os.path.join(a.distill, "train." + a.tgt), a.train_limit)
    if len(lines) != len(tgt_fallback):
        raise SystemExit("--distill: %d lines in train.%s, the corpus has %d" % (
            len(lines), a.tgt, len(tgt_fallback)))
    out, kept = [], 0
    for line, orig in zip(lines, tgt_fallback):
        ids = [index.get(p, UNK) for p in sp.encode(line, out_type=str)] if line.strip() else []
        if not ids or UNK in ids or "<unk>" in line:
            out.append(orig)
        else:
            out.append([BOS] + ids + [EOS])
            kept += 1
    log("distilled targets: %d of %d used (the rest keep the original target)" % (kept, len(lines)))
    return out


def prepare(a):
    os.makedirs(a.out, exist_ok=True)
    spm_prefix = os.path.join(a.out, "spm")
    dict_path = os.path.join(a.out, "dict.txt")
    data_path = os.path.join(a.out, "data_distill.pt" if a.distill else "data.pt")
    if a.init_from:  # the model's tokenizer and dictionary, not new ones
        import shutil
        for fn, dst in (("spm.model", spm_prefix + ".model"), ("dict.txt", dict_path)):
            if not os.path.exists(dst):
                shutil.copyfile(os.path.join(a.init_from, fn), dst)
    if not os.path.exists(spm_prefix + ".model"):
        t = time.time()
        train_spm(a, spm_prefix)
        log("sentencepiece %s vocab %d trained in %.0fs" % (a.spm_type, a.spm_vocab, time.time() - t))
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=spm_prefix + ".model")
    if os.path.exists(data_path) and os.path.exists(dict_path):
        return torch.load(data_path), nat_ref.load_dict(dict_path)
    t = time.time()
    raw = {}
    for split, lim in (("train", a.train_limit), ("valid", a.valid_limit)):
        for lang in (a.src, a.tgt):
            lines = read_lines(os.path.join(a.corpus, "%s.%s" % (split, lang)), lim)
            raw[split, lang] = sp.encode(lines, out_type=str)
    if os.path.exists(dict_path):  # given (--init-from or copied): keep it
        symbols = nat_ref.load_dict(dict_path)
    else:
        symbols = build_dict(raw["train", a.src] + raw["train", a.tgt], dict_path)
    index = {s: i for i, s in enumerate(symbols)}
    data = {}
    for split in ("train", "valid"):
        src = [[BOS] + [index.get(p, UNK) for p in ps] + [EOS] for ps in raw[split, a.src]]
        tgt = [[BOS] + [index.get(p, UNK) for p in ps] + [EOS] for ps in raw[split, a.tgt]]
        nat = encode_distilled(a, sp, index, tgt) if a.distill and split == "train" else tgt
        ok = lambda t: 3 <= len(t) <= min(a.max_positions, 255)  # noqa: E731
        keep = [i for i in range(len(src)) if len(src[i]) <= a.max_positions and ok(tgt[i]) and ok(nat[i])]
        data[split] = {"src": [np.array(src[i], np.int32) for i in keep],
                       "tgt": [np.array(tgt[i], np.int32) for i in keep]}
        if nat is not tgt:
            data[split]["nat_tgt"] = [np.array(nat[i], np.int32) for i in keep]
        log("%s: %d pairs (%d dropped by length), %d src / %d tgt tokens" % (
            split, len(keep), len(src) - len(keep),
            sum(len(x) for x in data[split]["src"]), sum(len(x) for x in data[split]["tgt"])))
    torch.save(data, data_path)
    log("dictionary %d symbols, corpus encoded in %.0fs" % (len(symbols), time.time() - t))
    return data, symbols


def make_batches(src, tgt, max_tokens, seed, epoch, shuffle=True, nat_tgt=None):
    """fairseq LanguagePairDataset.ordered_indices + batch_by_size (+ batch shuffle); with
    distilled targets a pair's target length is the longer of its two targets."""
    n = len(src)
    sl = np.array([len(x) for x in src])
    tl = np.array([len(x) for x in tgt])
    if nat_tgt is not None:
        tl = np.maximum(tl, np.array([len(x) for x in nat_tgt]))
    if shuffle:
        idx = np.random.RandomState(seed + epoch).permutation(n)
    else:
        idx = np.arange(n)
    idx = idx[np.argsort(tl[idx], kind="mergesort")]
    idx = idx[np.argsort(sl[idx], kind="mergesort")]
    batches, cur, mx = [], [], 0
    for i in idx:
        l = max(sl[i], tl[i])
        if cur and max(mx, l) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, mx = [], 0
        cur.append(int(i))
        mx = max(mx, l)
    if cur:
        batches.append(cur)
    if shuffle:
        np.random.RandomState(seed + epoch + 7919).shuffle(batches)
    return batches


def collate(split, batch, device):
    """@return source, AT target and CMLM target batches (the last is the AT one without distillation)."""
    s = nat_ref.pad_batch([split["src"][i].tolist() for i in batch]).to(device)
    t = nat_ref.pad_batch([split["tgt"][i].tolist() for i in batch]).to(device)
    if "nat_tgt" not in split:
        return s, t, t
    n = nat_ref.pad_batch([split["nat_tgt"][i].tolist() for i in batch]).to(device)
    return s, t, n


# ------------------------------------------------------------------ loss

def compute_loss(model, src, tgt, mask_gen, ls, nat_tgt=None):
    """Returns dict of scalar tensors: at (mean/token), at_nll, word_ins, word_nll, length, nat.
    The AT decoder learns tgt; the CMLM decoder and the length predictor nat_tgt (default tgt)."""
    enc = model.encoder(src)
    out = {}
    if model.at_decoder is not None:
        prev, target = nat_ref.at_inputs(tgt)
        logits = model.at_decoder(prev, enc)
        loss, nll, ntok = nat_ref.at_loss(logits, target, ls)
        out["at"], out["at_nll"] = loss / ntok, nll / ntok
    tgt = tgt if nat_tgt is None else nat_tgt
    prev = nat_ref.random_mask(tgt, mask_gen)
    dec = model.decoder
    length_out = dec.forward_length(enc)
    length_tgt = dec.length_target(enc, tgt)
    # only the masked positions enter the loss: project just those (same loss, less work)
    feats = dec(prev, enc, features_only=True)
    m = prev.eq(UNK)
    wl, wn = nat_ref.nat_word_loss(dec.output_projection(feats[m]), tgt[m], None, ls)
    ll = F.nll_loss(F.log_softmax(length_out.float(), -1), length_tgt)
    out["word_ins"], out["word_nll"], out["length"] = wl, wn, ll
    out["nat"] = wl + dec.length_loss_factor * ll
    out["length_acc"] = (length_out.argmax(-1) == length_tgt).float().mean()
    return out


def task_weights(a, num_updates):
    if a.at_decoder_layers == 0:
        return 0.0, 1.0
    if a.weight_schedule == "linear":
        f = num_updates / a.steps
        return 1.0 - f, f
    return a.at_weight, a.nat_weight


def lr_at(a, num_updates, init_updates=0):
    """fairseq inverse_sqrt: linear warmup from warmup_init_lr, then lr*sqrt(warmup/u); after
    --init-from (the schedule goes on from init_updates) a linear re-warm-up of the fresh optimiser."""
    if num_updates < a.warmup_updates:
        lr = a.warmup_init_lr + num_updates * (a.lr - a.warmup_init_lr) / a.warmup_updates
    else:
        lr = a.lr * math.sqrt(a.warmup_updates) / math.sqrt(max(num_updates, 1))
    if init_updates and num_updates - init_updates < a.rewarm_updates:
        lr *= (num_updates - init_updates + 1) / (a.rewarm_updates + 1)
    return lr


@torch.no_grad()
def validate(model, a, valid, device):
    model.eval()
    gen = torch.Generator().manual_seed(a.seed + 1000003)
    sums = {}
    n = 0
    for b in make_batches(valid["src"], valid["tgt"], a.max_tokens, a.seed, 0, shuffle=False):
        s, t, _ = collate(valid, b, device)
        o = compute_loss(model, s, t, gen, a.label_smoothing)
        for k, v in o.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(b)
        n += len(b)
    model.train()
    return {k: v / n for k, v in sums.items()}


# ------------------------------------------------------------------ checkpoints

def to_checkpoint_names(sd, mt):
    """flat (encoder./decoder./at_decoder.) -> multi-task-nat names (or fairseq cmlm)."""
    if not mt:
        return dict(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder."):
            out["at_model." + k] = v
            out["nat_model." + k] = v
        elif k.startswith("decoder."):
            out["nat_model." + k] = v
        elif k.startswith("at_decoder."):
            out["at_model.decoder." + k[len("at_decoder."):]] = v
        else:
            raise KeyError(k)
    return out


def from_checkpoint_names(sd):
    if not any(k.startswith("nat_model.") for k in sd):
        return dict(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("nat_model."):
            out[k[len("nat_model."):]] = v
        elif k.startswith("at_model.decoder."):
            out["at_decoder." + k[len("at_model.decoder."):]] = v
    return out


def save_checkpoint(path, a, fargs, model, opt, state):
    mt = a.at_decoder_layers > 0
    ckpt = {
        "args": fargs,
        "model": to_checkpoint_names(model.state_dict(), mt),
        "optimizer_history": [{
            "criterion_name": "LabelSmoothedMixedCrossEntropyCriterion" if mt
            else "LabelSmoothedDualImitationCriterion",
            "optimizer_name": "FairseqAdam",
            "lr_scheduler_state": {"best": state.get("best")},
            "num_updates": state["num_updates"],
        }],
        "extra_state": {
            "epoch": state["epoch"],
            "train_iterator": {"epoch": state["epoch"], "iterations_in_epoch": state["batch_i"],
                               "shuffle": True},
            "val_loss": state.get("val_loss"),
            "best": state.get("best"),
            "nzserve": {
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "mask_rng": state["mask_gen"].get_state(),
                "wall_seconds": state["wall"],
                "train_args": vars(a),
                "format": "torch AdamW state in last_optimizer_state (fairseq Adam == AdamW)",
            },
        },
        "last_optimizer_state": opt.state_dict(),
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------ decoding demo

def final_decode(model, a, valid, symbols, out_dir):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "spm.model"))
    n = min(a.decode_n, len(valid["src"]))
    if n == 0:
        return
    model.eval()
    model.cpu()

    def detok(ids):
        return sp.decode_pieces([symbols[i] for i in ids if i not in (BOS, EOS, PAD)])
    t0 = time.time()
    for i in range(n):
        s = torch.tensor(valid["src"][i], dtype=torch.long)[None]
        mp = nat_ref.mask_predict(model, s, max_iter=4, length_beam=3)[0]
        print("SRC  %s" % detok(valid["src"][i].tolist()))
        print("REF  %s" % detok(valid["tgt"][i].tolist()))
        if model.at_decoder is not None:
            at = nat_ref.at_greedy(model, s)[0]
            print("AT   %s" % detok(at))
        print("MP   %s   (iter 4, beam 3, steps %d, score %.3f)" % (
            detok(mp["tokens"]), mp["steps"], mp["score"]))
    log("decoded %d sentences in %.1fs" % (n, time.time() - t0))


# ------------------------------------------------------------------ main

def open_model(a, fargs, V, device):
    """The model, its optimizer and the run's state: new (from --seed, or --init-from a model
    directory) or, with --resume, exactly as OUT/checkpoint_last.pt left them.
    @return (model, opt, state, init_updates)."""
    torch.manual_seed(a.seed)
    model = nat_ref.NATModel(fargs, V)
    if fargs.apply_bert_init:
        model.apply_bert_init()
    init_updates = 0
    if a.init_from:
        init, icfg = nat_ref.load_model_dir(a.init_from)
        model.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
        init_updates = int((icfg.get("converted_from") or {}).get("num_updates") or 0)
        log("initialised from %s (update %d)" % (a.init_from, init_updates))
    model.to(device)
    nparam = sum(p.numel() for p in model.parameters())
    log("model: %d parameters (%.2fM); vocab %d; arch %s" % (nparam, nparam / 1e6, V, fargs.arch))
    opt = torch.optim.AdamW(model.parameters(), lr=a.warmup_init_lr, betas=(0.9, 0.98),
                            eps=1e-8, weight_decay=a.weight_decay)
    mask_gen = torch.Generator().manual_seed(a.seed + 1)
    state = {"num_updates": init_updates, "epoch": 1, "batch_i": 0, "best": None, "val_loss": None,
             "mask_gen": mask_gen, "wall": 0.0}
    if a.resume:
        ck = torch.load(os.path.join(a.out, "checkpoint_last.pt"), map_location="cpu")
        model.load_state_dict(from_checkpoint_names(ck["model"]))
        opt.load_state_dict(ck["last_optimizer_state"])
        ex = ck["extra_state"]
        state.update(num_updates=ck["optimizer_history"][-1]["num_updates"],
                     epoch=ex["train_iterator"]["epoch"],
                     batch_i=ex["train_iterator"]["iterations_in_epoch"],
                     best=ex.get("best"), val_loss=ex.get("val_loss"),
                     wall=ex["nzserve"]["wall_seconds"])
        torch.set_rng_state(ex["nzserve"]["torch_rng"])
        if ex["nzserve"]["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ex["nzserve"]["cuda_rng"])
        mask_gen.set_state(ex["nzserve"]["mask_rng"])
        log("resumed at update %d (epoch %d, batch %d)" % (
            state["num_updates"], state["epoch"], state["batch_i"]))
    return model, opt, state, init_updates


def train_update(a, model, opt, state, batch, init_updates):
    """One update on a collated batch (src, tgt, nat_tgt): the multi-task loss (NAT + weighted AT),
    clipped AdamW step. @return (the values to log: nat, at, loss, gnorm, ...; lr; at weight)."""
    s, t, nt = batch
    u = state["num_updates"]
    lr = lr_at(a, u, init_updates)
    for g in opt.param_groups:
        g["lr"] = lr
    at_w, nat_w = task_weights(a, u)
    o = compute_loss(model, s, t, state["mask_gen"], a.label_smoothing, nt)
    loss = nat_w * o["nat"] + (at_w * o["at"] if "at" in o else 0.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_norm if a.clip_norm > 0 else float("inf"))
    opt.step()
    state["num_updates"] += 1
    state["batch_i"] += 1
    o["loss"] = loss.detach()
    o["gnorm"] = gnorm
    return o, lr, at_w


def validate_and_keep_best(a, fargs, model, opt, state, valid, device):
    """Validate; a new best NAT loss is saved as OUT/checkpoint_best.pt."""
    v = validate(model, a, valid, device)
    state["val_loss"] = v["nat"]
    log("valid update %d | %s" % (state["num_updates"], " ".join("%s %.4f" % kv for kv in sorted(v.items()))))
    if state["best"] is None or v["nat"] < state["best"]:
        state["best"] = v["nat"]
        save_checkpoint(os.path.join(a.out, "checkpoint_best.pt"), a, fargs, model, opt, state)


def main(argv=None):
    a = parse_args(argv)
    device = setup_torch(a.threads, a.device)
    data, symbols = prepare(a)
    train, valid = data["train"], data["valid"]
    V = len(symbols)
    fargs = fairseq_args(a, V)
    with open(os.path.join(a.out, "train_args.json"), "w") as f:
        json.dump(vars(a), f, indent=1, sort_keys=True)
    model, opt, state, init_updates = open_model(a, fargs, V, device)
    last = os.path.join(a.out, "checkpoint_last.pt")

    model.train()
    t_start = last_save = time.time()
    wall0 = state["wall"]
    acc, acc_n, tok_src, tok_tgt, t_log = {}, 0, 0, 0, time.time()
    stop = min(a.interrupt_at if a.interrupt_at else a.steps, a.steps)
    log_stop = a.interrupt_at if a.interrupt_at else a.steps  # a log line there even off --log-interval

    def epoch_batches(e):
        bl = make_batches(train["src"], train["tgt"], a.max_tokens, a.seed, e, nat_tgt=train.get("nat_tgt"))
        log("epoch %d: %d batches" % (e, len(bl)))
        return bl
    batches = epoch_batches(state["epoch"])
    progress = Progress(stop, "train", unit="updates", done=state["num_updates"])
    while state["num_updates"] < stop:
        if state["batch_i"] >= len(batches):
            state["epoch"] += 1
            state["batch_i"] = 0
            batches = epoch_batches(state["epoch"])
        batch = collate(train, batches[state["batch_i"]], device)
        o, lr, at_w = train_update(a, model, opt, state, batch, init_updates)
        u = state["num_updates"]
        for k, v in o.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        acc_n += 1
        tok_src += int(batch[0].ne(PAD).sum())
        tok_tgt += int(batch[1].ne(PAD).sum())
        progress.update(u, note="loss %.3f" % (acc["loss"] / acc_n))
        if u % a.log_interval == 0 or u == log_stop:
            dt = time.time() - t_log
            msg = " ".join("%s %.4f" % (k, v / acc_n) for k, v in sorted(acc.items()))
            log("update %d epoch %d lr %.3g at_w %.3f | %s | %.0f tgt tok/s %.0f src+tgt tok/s" % (
                u, state["epoch"], lr, at_w, msg, tok_tgt / dt, (tok_src + tok_tgt) / dt))
            acc, acc_n, tok_src, tok_tgt, t_log = {}, 0, 0, 0, time.time()
        state["wall"] = wall0 + time.time() - t_start
        out_of_time = a.max_minutes and (time.time() - t_start) > a.max_minutes * 60
        finished = u >= stop or out_of_time
        if u % a.validate_interval_updates == 0 or (finished and u >= a.steps):
            validate_and_keep_best(a, fargs, model, opt, state, valid, device)
        if u % a.save_interval_updates == 0 or finished or time.time() - last_save > a.save_interval_minutes * 60:
            save_checkpoint(last, a, fargs, model, opt, state)
            last_save = time.time()
            log("saved %s (update %d)" % (last, u))
        if out_of_time:
            log("stopping: --max-minutes reached")
            break
    progress.close()
    if state["num_updates"] >= a.steps and not a.no_final_decode:
        final_decode(model, a, valid, symbols, a.out)
    log("done: %d updates, %.1f min this run" % (state["num_updates"], (time.time() - t_start) / 60))


if __name__ == "__main__":
    main()
