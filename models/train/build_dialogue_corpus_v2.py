#!/usr/bin/python3
"""Dialogue corpus v2: the licence-clean conversation pairs of a shared directory merged with the
packaged-text corpus of build_dialogue_corpus.py, split by contiguous blocks, repeated responses
capped, sources balanced.

    /usr/bin/python3 models/train/build_dialogue_corpus_v2.py \\
        --dialogue-dir ../shared/data/dialogue \\
        [--v1 /var/tmp/nzserve-dialogue-corpus] [--out /var/tmp/nzserve-dialogue-corpus-v2]

Inputs:
* ``--dialogue-dir``: ``NAME.jsonl.zst`` files (zstd JSONL, one ``{"context": [turns, oldest
  first], "response": str}`` a line, in conversation order); every file is one source, named by
  its stem (sgd, shakespeare, austen, woz, camrest, chatterbot).
* ``--v1`` (optional): the output directory of build_dialogue_corpus.py (``train/valid/test.jsonl``
  with a ``source`` field: spamassassin, brown, mobydick, fortunes); its splits are kept as they
  are (they are made by hashes so that no turn is in two splits).

Rules (deterministic: the output is a function of the inputs and the options):
1. **Split by contiguous blocks** (``--held-fraction`` f, 0.02): in each shared file the last f
   of the lines is ``test``, the f before it ``valid``, the rest ``train``. Each cut moves forward
   to the next line that starts a conversation (a one-turn context), so no conversation is in two
   splits. Pairs whose context and response are both in a held-out split are dropped from train.
2. **Text**: turns and responses are whitespace-normalised (runs of spaces collapsed, stripped);
   case is kept (EqHard-EM's T5 tokenizer is cased, and a user reads the answers); pairs with an
   empty side are dropped; contexts keep their last ``--max-turns`` turns (4).
3. **Cap repeated responses** (train only): a response (compared lower-cased, punctuation-free)
   is kept at most ``--cap`` times (40) per source; which occurrences stay is decided by a hash
   of the pair, so the kept ones are spread over the file, not its beginning.
4. **Balance sources** (train only): source s with n_s train pairs is repeated
   ``min(--max-repeat, (n_max / n_s) ** (1 - --alpha))`` times (alpha 0.6: sampling
   probability proportional to n_s ** 0.6, the temperature sampling of multilingual MT;
   the fractional part by a hash of the pair), so the booking assistant (86 % of the pairs)
   does not drown Shakespeare and Austen.
5. Each split file is sorted by the SHA-256 of its line (plus the copy number): a fixed shuffle.
6. ``--assistant-sources`` (v3: ``sgd,woz,camrest``): in those task-oriented sources only the pairs whose
   response is the assistant's are kept, in every split (both sides appear as responses in the files; a
   model trained on both answers half the time as the user: "I'd like to find a hotel."). The speaker
   follows from the turn count (conversations open with the user; ``assistant_responses``); pairs whose
   speaker cannot be told are dropped and counted.

Output (``--out``): ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` (``{"context", "response",
"source"}``), ``stats.json`` (pairs per source and split, before and after the cap and balancing,
the options). Standard library + the ``zstd`` command (Debian package zstd).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress import track  # noqa: E402


def norm_text(s: str) -> str:
    return " ".join(str(s).split())


def response_key(s: str) -> str:
    """Responses compared for the cap: lower-case, letters and digits only."""
    return re.sub(r"[^0-9a-z]+", " ", s.lower()).strip()


def h64(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "little")


def read_zst_jsonl(path: Path) -> list[dict]:
    try:
        raw = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    except FileNotFoundError:
        sys.exit("error: the zstd command is missing (apt-get install zstd)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: {path}: zstd failed: {e.stderr.decode(errors='replace').strip()}")
    out = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path}:{i + 1}: {e}")
    return out


def clean(pair: dict, source: str, max_turns: int) -> dict | None:
    ctx = pair.get("context")
    if isinstance(ctx, str):
        ctx = [ctx]
    if not isinstance(ctx, list):
        return None
    ctx = [norm_text(t) for t in ctx if norm_text(t)][-max_turns:]
    resp = norm_text(pair.get("response", ""))
    if not ctx or not resp:
        return None
    return {"context": ctx, "response": resp, "source": source}


def assistant_responses(raw: list[dict]) -> list[bool | None]:
    """Per pair of a task-oriented file (in file order): True when its response is the assistant's, False
    when the user's, None when it cannot be told. Conversations open with the user and turns alternate
    (one speaker's consecutive lines are one turn), so with fewer turns of context than the file's longest
    (the whole conversation so far) the response is the assistant's when they are odd in number; a full
    context takes the opposite of the pair before it when it continues that pair's conversation
    (context == (its context + [its response])[-n:])."""
    full = max((len(p.get("context") or []) for p in raw), default=0)
    out: list[bool | None] = []
    prev, prev_role = None, None
    for p in raw:
        ctx = p.get("context") or []
        if isinstance(ctx, str):
            ctx = [ctx]
        n = len(ctx)
        if n < full:
            role = n % 2 == 1
        elif prev is not None and prev_role is not None and ctx == (prev[0] + [prev[1]])[-n:]:
            role = not prev_role
        else:
            role = None
        out.append(role)
        prev, prev_role = (list(ctx), p.get("response")), role
    return out


def split_blocks(pairs: list[dict], frac: float) -> tuple[list, list, list]:
    """train / valid / test as contiguous blocks, cuts moved to the next conversation start."""
    n = len(pairs)

    def cut(i: int) -> int:
        i = max(0, min(n, i))
        while i < n and len(pairs[i]["context"]) != 1:
            i += 1
        return i

    t_start = cut(round(n * (1 - frac)))
    v_start = min(cut(round(n * (1 - 2 * frac))), t_start)
    return pairs[:v_start], pairs[v_start:t_start], pairs[t_start:]


def pair_line(p: dict) -> str:
    return json.dumps({"context": p["context"], "response": p["response"], "source": p["source"]},
                      ensure_ascii=False)


def cap_responses(pairs: list[dict], cap: int) -> list[dict]:
    groups = collections.defaultdict(list)
    for i, p in enumerate(pairs):
        groups[(p["source"], response_key(p["response"]))].append(i)
    keep = set()
    for idx in groups.values():
        if len(idx) <= cap:
            keep.update(idx)
        else:
            keep.update(sorted(idx, key=lambda i: h64("cap", pair_line(pairs[i])))[:cap])
    return [p for i, p in enumerate(pairs) if i in keep]


def balance(train: dict[str, list], alpha: float, max_repeat: float) -> tuple[list[tuple[dict, int]], dict]:
    n_max = max(len(v) for v in train.values() if v)
    out, factors = [], {}
    for src, pairs in sorted(train.items()):
        if not pairs:
            continue
        f = min(max_repeat, (n_max / len(pairs)) ** (1 - alpha))
        factors[src] = round(f, 4)
        whole, frac = int(f), f - int(f)
        for p in pairs:
            copies = whole + (1 if (h64("bal", pair_line(p)) % 1_000_000) / 1e6 < frac else 0)
            out.extend((p, c) for c in range(copies))
    return out, factors


def write_split(path: Path, items: list[tuple[dict, int]]) -> None:
    lines = sorted(((hashlib.sha256(f"{pair_line(p)}\x1f{c}".encode()).hexdigest(), pair_line(p))
                    for p, c in items))
    with open(path, "w", encoding="utf-8") as f:
        for _, line in lines:
            f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogue-dir", required=True, help="directory of NAME.jsonl.zst files")
    ap.add_argument("--v1", help="build_dialogue_corpus.py output to merge (optional)")
    ap.add_argument("--out", default="/var/tmp/nzserve-dialogue-corpus-v2")
    ap.add_argument("--held-fraction", type=float, default=0.02)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--cap", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--max-repeat", type=float, default=5.0)
    ap.add_argument("--assistant-sources", default="",
                    help="comma-separated task-oriented sources whose pairs are kept only when the assistant "
                         "answers (user turns as responses dropped), e.g. sgd,woz,camrest")
    a = ap.parse_args()
    assistant_sources = {x.strip() for x in a.assistant_sources.split(",") if x.strip()}
    if not 0 < a.held_fraction < 0.5:
        sys.exit("error: --held-fraction must be in (0, 0.5)")

    files = sorted(Path(a.dialogue_dir).glob("*.jsonl.zst"))
    if not files:
        sys.exit(f"error: no *.jsonl.zst in {a.dialogue_dir}")
    splits = {"train": collections.defaultdict(list), "valid": [], "test": []}
    stats = {"sources": {}, "options": {k: v for k, v in vars(a).items() if k not in ("out",)}}
    for path in track(files, "sources", unit="files"):
        src = path.name[: -len(".jsonl.zst")]
        raw = read_zst_jsonl(path)
        cleaned = [clean(p, src, a.max_turns) for p in raw]
        if src in assistant_sources:  # the assistant's side only: a server answers as the assistant
            roles = assistant_responses(raw)
            stats["sources"].setdefault(src, {})["user_responses_dropped"] = sum(r is False for r in roles)
            stats["sources"][src]["unknown_speaker_dropped"] = sum(r is None for r in roles)
            cleaned = [c if r else None for c, r in zip(cleaned, roles)]
        pairs = [c for c in cleaned if c]
        tr, va, te = split_blocks(pairs, a.held_fraction)
        held = {(tuple(p["context"]), p["response"]) for p in va + te}
        tr = [p for p in tr if (tuple(p["context"]), p["response"]) not in held]
        splits["train"][src] = tr
        splits["valid"] += va
        splits["test"] += te
        stats["sources"].setdefault(src, {}).update(file_pairs=len(raw), train=len(tr), valid=len(va), test=len(te))
    if a.v1:
        for split in ("train", "valid", "test"):
            path = Path(a.v1) / f"{split}.jsonl"
            if not path.exists():
                sys.exit(f"error: {path} is missing (run build_dialogue_corpus.py first)")
            for line in track(path.read_text(encoding="utf-8").splitlines(), f"v1 {split}", unit="pairs"):
                p = json.loads(line)
                src = p.get("source", "v1")
                c = clean(p, src, a.max_turns)
                if not c:
                    continue
                stats["sources"].setdefault(src, {"file_pairs": 0, "train": 0, "valid": 0, "test": 0})
                stats["sources"][src]["file_pairs"] += 1
                stats["sources"][src][split] += 1
                if split == "train":
                    splits["train"][src].append(c)
                else:
                    splits[split].append(c)

    for src, pairs in splits["train"].items():
        capped = cap_responses(pairs, a.cap)
        stats["sources"][src]["train_capped"] = len(capped)
        splits["train"][src] = capped
    train, factors = balance(splits["train"], a.alpha, a.max_repeat)
    for src, f in factors.items():
        stats["sources"][src]["repeat"] = f
        stats["sources"][src]["train_balanced"] = sum(1 for p, _ in train if p["source"] == src)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_split(out / "train.jsonl", train)
    write_split(out / "valid.jsonl", [(p, 0) for p in splits["valid"]])
    write_split(out / "test.jsonl", [(p, 0) for p in splits["test"]])
    stats["totals"] = {"train": len(train), "valid": len(splits["valid"]), "test": len(splits["test"])}
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    w = max(len(s) for s in stats["sources"])
    print(f"{'source':<{w}} {'file':>8} {'train':>8} {'capped':>8} {'repeat':>6} {'balanced':>8} {'valid':>6} {'test':>6}")
    for src, s in sorted(stats["sources"].items()):
        print(f"{src:<{w}} {s['file_pairs']:>8} {s['train']:>8} {s.get('train_capped', 0):>8} "
              f"{s.get('repeat', 0):>6} {s.get('train_balanced', 0):>8} {s['valid']:>6} {s['test']:>6}")
    print(f"total: train {len(train)}, valid {len(splits['valid'])}, test {len(splits['test'])} -> {out}")


if __name__ == "__main__":
    main()
