"""The data side of train_dialogue.py: the corpus (JSONL {"context": [turns], "response": str}), the
SentencePiece model and the encoded pairs (OUT/spm.model, OUT/data.pt), the epoch's batches
(--length-buckets) and their tensors, and the denoising noise of the pre-training updates.
"""

import json
import os
import time

import numpy as np
import torch

import t5md_ref as R
from progress import log
from t5md_ref import EOS, PAD

IGNORE = -100  # label of a padding position (torch cross_entropy's ignore_index)


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
