"""Text helpers shared by build_dialogue_corpus.py and its per-source extractors.

Normalisation and clean-text checks (norm_text, text_ok, norm_key), the rough
sentence split and the length fitting of turns (fit_tail, fit_head), pairing
dialogue turns into (context, response) candidates (make_pair,
dialogue_pairs, with the drop-reason counter Counter2), and quoted speech in
prose (Para, quote_runs, straight_quote_para).  The turn limits and BuildError
are here because the extractors (dialogue_sources.py) and the script use them.

Standard library only.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from typing import Iterable, Iterator

MIN_WORDS = 2           # response and most recent context turn
MAX_WORDS = 64          # every turn
MAX_CONTEXT_TURNS = 3


class BuildError(Exception):
    """A fatal, user-facing error (missing tool or package, network failure)."""


# --------------------------------------------------------------------------
# Text utilities
# --------------------------------------------------------------------------

_TYPO = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u00a0": " ", "\u2007": " ", "\u202f": " ", "\u2009": " ",
    "\u200b": "", "\ufeff": "", "\u00ad": "",
})
_WS = re.compile(r"\s+")
URL = re.compile(r"(?:https?://|ftp://|www\.)\S+|\S+@\S+\.\w+", re.I)
_MOJIBAKE = re.compile(r"[\u00c2\u00c3][\u0080-\u00bf]|\u00e2\u20ac|\ufffd|\\u[0-9a-fA-F]{4}")
_CODE_CHARS = set("{}=<>|\\$#`^")

ABBREV = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "mt",
    "capt", "gen", "col", "lt", "sgt", "prof", "rev", "hon", "fig", "inc",
    "ltd", "co", "u.s", "no", "cf", "approx", "dept", "esp", "gov", "sen",
}


def norm_text(s: str) -> str:
    """NFC, typographic quotes/spaces to ASCII, whitespace collapsed."""
    s = unicodedata.normalize("NFC", s).translate(_TYPO)
    s = s.replace("``", '"').replace("''", '"')  # TeX-style quotes
    return _WS.sub(" ", s).strip()


def nwords(s: str) -> int:
    return len(s.split())


def norm_key(s: str) -> str:
    """Lower-case alphanumerics only: the near-duplicate key."""
    return " ".join(re.findall(r"[^\W_]+", s.lower()))


def text_ok(s: str, min_alpha: float = 0.6) -> str | None:
    """None if *s* is clean English-looking text, else a drop reason."""
    if not s:
        return "empty"
    if _MOJIBAKE.search(s):
        return "mojibake"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") for c in s):
        return "control-chars"
    letters = [c for c in s if c.isalpha()]
    if not letters:
        return "no-letters"
    if sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return "non-latin"
    nonspace = sum(not c.isspace() for c in s)
    if len(letters) < min_alpha * nonspace:
        return "symbols"
    code = sum(c in _CODE_CHARS for c in s)
    if code >= 2 and code >= 0.03 * nonspace:
        return "code-like"
    if nwords(URL.sub(" ", s)) < 1:
        return "url-only"
    return None


def sentences(text: str) -> list[str]:
    """Rough English sentence split on whitespace-separated tokens."""
    toks = text.split()
    out, cur = [], []
    for i, t in enumerate(toks):
        cur.append(t)
        core = t.rstrip("\"')]")
        if not core or core[-1] not in ".!?":
            continue
        if i + 1 < len(toks):
            nxt = toks[i + 1].lstrip("\"'([")
            if not nxt or not nxt[0].isalnum():
                continue
            word = core.rstrip(".!?").lower().lstrip("\"'(")
            if core.endswith(".") and (word in ABBREV or re.fullmatch(r"[a-z]", word)):
                continue
            if core.endswith(".") and not core.endswith("..") and nxt[0].islower() \
                    and ("." in word or len(word) <= 1):
                continue  # "a.m. today", "p. 3"
        out.append(" ".join(cur))
        cur = []
    if cur:
        out.append(" ".join(cur))
    return out


def fit_tail(text: str) -> str | None:
    """A context turn: whole if <= MAX_WORDS, else its last 2 (or 1) sentences."""
    if nwords(text) <= MAX_WORDS:
        return text
    sents = sentences(text)
    for k in (2, 1):
        tail = " ".join(sents[-k:])
        if len(sents) > k and nwords(tail) <= MAX_WORDS:
            return tail
    return None


def fit_head(text: str) -> str | None:
    """A response: whole if <= MAX_WORDS, else its first 2 (or 1) sentences."""
    if nwords(text) <= MAX_WORDS:
        return text
    sents = sentences(text)
    for k in (2, 1):
        head = " ".join(sents[:k])
        if len(sents) > k and nwords(head) <= MAX_WORDS:
            return head
    return None


class Counter2(collections.Counter):
    """Counter of drop reasons."""

    def drop(self, reason: str) -> None:
        self[reason] += 1


def make_pair(context: list[str], response: str, drops: Counter2,
              min_alpha: float = 0.6) -> tuple[tuple[str, ...], str] | None:
    """Normalise and length-check a candidate; trim old context turns.

    The response and the most recent context turn must have MIN_WORDS to
    MAX_WORDS words (longer ones are cut at sentence boundaries by
    fit_head/fit_tail) and be clean text; older turns are kept back to the
    first one that fails these checks (1 word is enough for them), at most
    MAX_CONTEXT_TURNS in all.
    """
    resp = fit_head(norm_text(response))
    if resp is None:
        drops.drop("response-too-long")
        return None
    if nwords(resp) < MIN_WORDS:
        drops.drop("response-too-short")
        return None
    bad = text_ok(resp, min_alpha)
    if bad:
        drops.drop("response-" + bad)
        return None
    turns: list[str] = []
    for i, raw in enumerate(reversed(context[-MAX_CONTEXT_TURNS:])):
        t = fit_tail(norm_text(raw))
        ok = (t is not None and nwords(t) >= (MIN_WORDS if i == 0 else 1)
              and text_ok(t, min_alpha) is None)
        if not ok:
            if i == 0:
                if t is None:
                    drops.drop("context-too-long")
                elif nwords(t) < MIN_WORDS:
                    drops.drop("context-too-short")
                else:
                    drops.drop("context-" + text_ok(t, min_alpha))
                return None
            break
        turns.append(t)
    turns.reverse()
    return tuple(turns), resp


def dialogue_pairs(turns: list[str], drops: Counter2,
                   min_alpha: float = 0.6) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every turn after the first of a dialogue run becomes a response."""
    for i in range(1, len(turns)):
        p = make_pair(turns[max(0, i - MAX_CONTEXT_TURNS):i], turns[i], drops, min_alpha)
        if p:
            yield p


# --------------------------------------------------------------------------
# Quoted-speech turns in prose (Brown, Moby-Dick, fortunes)
# --------------------------------------------------------------------------


class Para:
    """A paragraph split into narrative and quoted segments."""

    def __init__(self, segments: list[tuple[bool, str]], open_at_start: bool,
                 open_at_end: bool, starts_quoted: bool):
        self.segments = segments          # (is_quote, text)
        self.open_at_start = open_at_start  # continues a quote of the previous paragraph
        self.open_at_end = open_at_end      # quote still open at its end
        self.starts_quoted = starts_quoted

    def speech(self) -> str:
        """The quoted segments joined: '"Yes," he said. "Go."' -> 'Yes. Go.'"""
        out = ""
        for q, t in self.segments:
            t = t.strip()
            if not q or not t:
                continue
            if out.endswith(",") and t[0].isupper() and not re.match(r"I\b", t):
                out = out[:-1] + "."
            out = (out + " " + t).strip()
        out = re.sub(r",+$", ".", out)
        return re.sub(r",\s*,", ",", out)

    def is_turn(self) -> bool:
        """A speech paragraph: it opens with a quote, or is mostly quoted
        words, or ends with a quoted utterance of >= 2 words (speech after a
        narrative lead-in), or holds a quoted segment of >= 6 words.  Short
        scare quotes inside narrative do not make a turn."""
        quoted = [nwords(t) for is_q, t in self.segments if is_q]
        q = sum(quoted)
        n = sum(nwords(t) for _, t in self.segments)
        if q == 0:
            return False
        sp = self.speech()
        if not sp or sp[0].islower():
            return False  # a quoted phrase, not an utterance
        last_q, last_t = self.segments[-1]
        return (self.starts_quoted or q >= 0.5 * n or max(quoted) >= 6
                or (last_q and nwords(last_t) >= 2))

    def words(self) -> int:
        return sum(nwords(t) for _, t in self.segments)


GAP_WORDS = 20  # a narrative paragraph this short between two turns is skipped


def quote_runs(paras: list[Para], breaks: Iterable[int] = ()) -> Iterator[list[str]]:
    """Group consecutive speech paragraphs into dialogue runs of turns.

    A paragraph continuing a still-open quote of the previous one (the
    novel convention for a multi-paragraph speech) is merged into the same
    turn.  One short (<= GAP_WORDS words) narrative paragraph without any
    quote between two turns is skipped; any other non-speech paragraph, two
    in a row, or an index in *breaks* ends the run.
    """
    breaks = set(breaks)
    run: list[str] = []
    prev_open = False
    gap = 0
    for i, p in enumerate(paras):
        if i in breaks:
            if len(run) >= 2:
                yield run
            run, prev_open, gap = [], False, 0
        if not p.is_turn():
            if (run and gap == 0 and p.words() <= GAP_WORDS
                    and not any(q for q, _ in p.segments)):
                gap = 1
                prev_open = False
                continue
            if len(run) >= 2:
                yield run
            run, prev_open, gap = [], False, 0
            continue
        gap = 0
        sp = p.speech()
        if prev_open and p.starts_quoted and run:
            run[-1] = run[-1] + " " + sp
        else:
            run.append(sp)
        prev_open = p.open_at_end
    if len(run) >= 2:
        yield run


def straight_quote_para(text: str) -> Para:
    """Split a paragraph on straight double quotes (after norm_text)."""
    pieces = text.split('"')
    segs = [(i % 2 == 1, piece) for i, piece in enumerate(pieces)]
    segs = [(q, t) for q, t in segs if t.strip() or q]
    starts = text.lstrip().startswith('"')
    return Para([(q, t) for q, t in segs], False, text.count('"') % 2 == 1, starts)
