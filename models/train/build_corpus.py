#!/usr/bin/python3
"""Build an English->German parallel corpus from text shipped in Debian packages.

Sources (nothing else is used):

* gettext ``.mo`` catalogs for German (``de``, falling back to ``de_DE``)
  - installed on this machine (``/usr/share/locale/de/LC_MESSAGES`` ...), and
  - shipped in the packages ``libreoffice-l10n-de``, ``gcc-12-locales``,
    ``gimp-data``, ``libvirt-l10n`` and ``cinnamon-l10n``, which are fetched
    with ``apt-get download`` into a cache directory and unpacked with
    ``dpkg-deb -x`` into a temporary directory (never installed);
* the Debian package-description translations: apt's ``Translation-en`` and
  ``Translation-de`` indexes, matched by ``Description-md5``.

apt is run against an *isolated* state directory inside the cache
(``-o Dir::State::Lists=... -o Dir::Cache=...``), so the system's package
lists and configuration are never modified.  Only the system's apt sources
(the Debian mirror) are used.

The pairs are cleaned (accelerators, markup, placeholders-only strings,
untranslated strings, length limits, ...), deduplicated, and split
deterministically into train/valid/test by hashing a normalised form of the
English source, so one source sentence never lands in two splits.

Usage::

    /usr/bin/python3 models/train/build_corpus.py --out /var/tmp/nzserve-corpus
        [--cache /var/tmp/nzserve-debs] [--no-fetch] [--no-installed]

Re-running reuses the cached ``.deb`` files and translation indexes
(``--refresh`` forces ``apt-get update`` again).  Standard library only.
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import hashlib
import html
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from progress import clear_line, track  # noqa: E402

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

PACKAGES = [
    "libreoffice-l10n-de",
    "gcc-12-locales",
    "gimp-data",
    "libvirt-l10n",
    "cinnamon-l10n",
]
DEFAULT_CACHE = "/var/tmp/nzserve-debs"
INSTALLED_LOCALE_DIRS = [
    "/usr/share/locale",
    "/usr/share/locale-langpack",
    "/usr/lib/libreoffice/program/resource",
]
# German locale directories, in order of preference.  de_AT / de_CH only hold
# regional differences and are not used.
DE_LOCALES = ["de", "de_DE"]

MIN_CHARS = 2
MAX_CHARS = 250
MAX_RATIO = 3.0
RATIO_SMOOTHING = 3  # chars added to both lengths so "Up"->"Nach oben" survives
MAX_TARGETS_PER_SOURCE = 3
TEST_PAIRS = 1000
VALID_PAIRS = 1000

ORIGIN_DESCRIPTIONS = "debian-descriptions"
ORIGIN_INSTALLED = "installed"


def log(msg: str) -> None:
    """Print a progress message to stderr."""
    clear_line()  # not on the row of a progress line
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# apt: isolated update and download
# --------------------------------------------------------------------------


class Apt:
    """Runs apt-get against an isolated lists/cache directory under *cache*."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.lists = cache / "apt" / "lists"
        self.apt_cache = cache / "apt" / "cache"
        self.debs = cache / "debs"

    def options(self) -> list[str]:
        """apt-get options that redirect all state into the cache dir."""
        return [
            "-o", f"Dir::State::Lists={self.lists}",
            "-o", f"Dir::Cache={self.apt_cache}",
            "-o", "Acquire::Languages=en,de",
            "-o", "Acquire::GzipIndexes=false",
            "-o", "APT::Sandbox::User=root",
        ]

    def prepare(self) -> None:
        """Create the directory layout apt expects."""
        for d in (self.lists / "partial", self.apt_cache / "archives" / "partial", self.debs):
            d.mkdir(parents=True, exist_ok=True)

    def have_indexes(self) -> bool:
        """True when Packages and both Translation indexes are present."""
        names = [p.name for p in self.lists.glob("*")] if self.lists.is_dir() else []
        return (any("_Packages" in n for n in names)
                and any("Translation-en" in n for n in names)
                and any("Translation-de" in n for n in names))

    def update(self) -> dict:
        """Run ``apt-get update`` into the isolated lists dir; return timing info."""
        self.prepare()
        t0 = time.monotonic()
        proc = subprocess.run(["apt-get", "update", *self.options()],
                              capture_output=True, text=True)
        info = {"seconds": round(time.monotonic() - t0, 2), "rc": proc.returncode}
        fetched = re.search(r"Fetched (.*?) in", proc.stdout)
        if fetched:
            info["fetched"] = fetched.group(1)
        if proc.returncode != 0:
            log(f"warning: apt-get update exited {proc.returncode}:\n{proc.stderr.strip()}")
        return info

    def cached_deb(self, pkg: str) -> Path | None:
        """Most recently downloaded .deb for *pkg* in the cache, if any."""
        debs = sorted(self.debs.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
        return debs[-1] if debs else None

    def download(self, pkg: str) -> tuple[Path | None, dict]:
        """``apt-get download`` *pkg* into the cache; reuse a cached copy."""
        cached = self.cached_deb(pkg)
        if cached:
            return cached, {"cached": True, "seconds": 0.0}
        self.prepare()
        t0 = time.monotonic()
        proc = subprocess.run(["apt-get", "download", *self.options(), pkg],
                              cwd=self.debs, capture_output=True, text=True)
        secs = round(time.monotonic() - t0, 2)
        if proc.returncode != 0:
            log(f"warning: apt-get download {pkg} failed:\n{proc.stderr.strip()}")
            return None, {"cached": False, "seconds": secs, "error": proc.stderr.strip()}
        return self.cached_deb(pkg), {"cached": False, "seconds": secs}


def deb_field(deb: Path, name: str) -> str:
    """Read a control field (e.g. Version) from a .deb."""
    return subprocess.run(["dpkg-deb", "-f", str(deb), name],
                          capture_output=True, text=True, check=True).stdout.strip()


# --------------------------------------------------------------------------
# .mo parsing
# --------------------------------------------------------------------------


@dataclass
class Catalog:
    """A parsed gettext catalog."""

    path: str
    charset: str
    accel: str | None  # X-Accelerator-Marker from the header, if any
    pairs: list[tuple[str, str]] = field(default_factory=list)
    entries: int = 0


def _plural_count(header: str) -> int:
    m = re.search(r"nplurals\s*=\s*(\d+)", header)
    return int(m.group(1)) if m else 2


def parse_mo(data: bytes, path: str = "") -> Catalog:
    """Parse a GNU gettext .mo file (either byte order) into (msgid, msgstr) pairs.

    * The header entry (empty msgid) gives the charset and is skipped.
    * ``msgctxt\\x04msgid`` contexts are stripped.
    * Plural entries ``msgid\\0msgid_plural`` -> ``msgstr[0]\\0msgstr[1]...``
      give two pairs: singular with msgstr[0], plural with msgstr[1].
    * Entries with an empty translation are skipped.
    """
    if len(data) < 28:
        raise ValueError("too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0x950412DE:
        endian = "<"
    elif magic == 0xDE120495:
        endian = ">"
    else:
        raise ValueError(f"bad .mo magic {magic:#x}")
    _rev, count, orig_off, trans_off = struct.unpack(endian + "4I", data[4:20])

    def table(off: int) -> list[bytes]:
        out = []
        for i in range(count):
            length, start = struct.unpack(endian + "2I", data[off + 8 * i: off + 8 * i + 8])
            out.append(data[start:start + length])
        return out

    originals, translations = table(orig_off), table(trans_off)

    header = ""
    for o, t in zip(originals, translations):
        if o == b"":
            header = t.decode("utf-8", "replace")
            break
    m = re.search(r"charset=([-\w.]+)", header, re.I)
    charset = m.group(1) if m else "utf-8"
    if charset.upper() == "CHARSET":
        charset = "utf-8"
    try:
        "".encode(charset)
    except LookupError:
        charset = "utf-8"
    m = re.search(r"^X-Accelerator-Marker:\s*(\S)", header, re.M)
    cat = Catalog(path=path, charset=charset, accel=m.group(1) if m else None)
    nplurals = _plural_count(header)

    for o, t in zip(originals, translations):
        if o == b"" or t == b"":
            continue
        cat.entries += 1
        src = o.decode(charset, "replace")
        tgt = t.decode(charset, "replace")
        if "\x04" in src:  # msgctxt\x04msgid
            src = src.split("\x04", 1)[1]
        srcs = src.split("\x00")
        tgts = tgt.split("\x00")
        if len(srcs) == 1:
            cat.pairs.append((srcs[0], tgts[0]))
        else:
            cat.pairs.append((srcs[0], tgts[0]))
            if nplurals >= 2 and len(tgts) >= 2:
                cat.pairs.append((srcs[1], tgts[1]))
    return cat


def find_de_catalogs(root: Path) -> list[Path]:
    """Every ``<locale>/LC_MESSAGES/*.mo`` under *root* for German.

    For a given catalog (same directory and file name apart from the locale
    component) plain ``de`` is preferred over ``de_DE``.
    """
    best: dict[tuple[str, str], tuple[int, Path]] = {}
    for mo in root.rglob("LC_MESSAGES/*.mo"):
        loc = mo.parent.parent.name
        base = loc.split(".")[0].split("@")[0]
        if base not in DE_LOCALES or "@" in loc:
            continue
        key = (str(mo.parent.parent.parent), mo.name)
        rank = DE_LOCALES.index(base)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, mo)
    return sorted(p for _, p in best.values())


# --------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------

PLACEHOLDER_RE = re.compile(
    r"""
      %(?:\d+\$)?[-+ #0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?
          (?:hh|h|ll|l|L|q|j|z|t|w|I|Z)*[diouxXeEfFgGaAcCsSpnmDTHKV%<>]  # printf, gcc
    | %\([\w.-]+\)[-+ #0]*\d*(?:\.\d+)?[sdifrx]        # python %(name)s
    | %[A-Z_][A-Z0-9_]*%                               # %OBJECT_NAME%
    | %\d+                                             # %1
    | \$\d+ | \$\{?\w+\}? | \$\(\w+\)                  # $1 $VAR ${VAR} $(var)
    | \{\{?[\w.:-]*\}?\}                               # {0} {name} {{x}}
    """,
    re.X,
)
TAG_RE = re.compile(r"</?[A-Za-z][\w:-]*(?:\s[^<>]*)?/?>")
ENTITY_RE = re.compile(r"&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")
URL_RE = re.compile(r"(?:https?|ftp)://|www\.|@[\w-]+\.\w")
SENT_END = ".:!?)"
GNUPG_PREFIX_RE = re.compile(r"^\|[\w-]+\|")  # gnupg's "|pinentry-label|" hints


def _marker_word(s: str, i: int) -> str:
    """The whitespace-delimited word of *s* around index *i*."""
    a = i
    while a > 0 and not s[a - 1].isspace():
        a -= 1
    b = i
    while b < len(s) and not s[b].isspace():
        b += 1
    return s[a:b]


def _marker_index(s: str, m: str) -> int | None:
    """Index of the single accelerator candidate *m* in *s*, or None.

    The marker must occur exactly once (ignoring HTML entities for ``&``) and
    be followed by a non-space character (``DDE_-Befehl`` is fine).
    """
    probe = ENTITY_RE.sub(lambda e: "#" * len(e.group()), s) if m == "&" else s
    if probe.count(m) != 1:
        return None
    i = probe.index(m)
    if i + 1 >= len(s) or s[i + 1].isspace() or (m == "~" and s[i + 1] == "/"):
        return None
    return i


def _inner(s: str, i: int) -> bool:
    """True if s[i] sits between two letters/digits (``new_name``, ``E_xit``)."""
    return 0 < i < len(s) - 1 and s[i - 1].isalnum() and s[i + 1].isalnum()


def _is_identifier(src: str, i: int, tgt: str) -> bool:
    """True if the marker at src[i] is part of an identifier such as
    ``wal_level`` or ``B&B``: it sits inside a word that reappears in the
    target (case-insensitively: ``krb5_data`` -> ``Krb5_data-Struktur``)."""
    if not _inner(src, i):
        return False
    word = _marker_word(src, i).strip(".,;:!?()[]{}'\"`«»“”„")
    return word.casefold() in tgt.casefold()


def detect_accelerators(pairs: list[tuple[str, str]], header_marker: str | None) -> set[str]:
    """Accelerator markers used by a catalog.

    The header's ``X-Accelerator-Marker`` (LibreOffice: ``~``) is always
    used.  ``_`` (GTK) and ``&`` (Qt/KDE) are used when at least 1% of the
    catalog's entries (and at least 3) carry a single such marker before a
    letter on both sides, not inside an identifier (see _is_identifier) and
    not inside a word on both sides (translated placeholders such as
    ``new_name`` -> ``neuer_Name`` or ``HOME_DIR`` -> ``HOME_VERZ``).
    Catalogs such as gcc's, where ``_`` only appears in identifiers, are left
    alone.
    """
    found = {header_marker} if header_marker else set()
    for m in "_&":
        hits = 0
        for src, tgt in pairs:
            i, j = _marker_index(src, m), _marker_index(tgt, m)
            if i is None or j is None or not (src[i + 1].isalnum() and tgt[j + 1].isalnum()):
                continue
            if _is_identifier(src, i, tgt) or (_inner(src, i) and _inner(tgt, j)):
                continue
            hits += 1
        if hits >= max(3, 0.01 * len(pairs)):
            found.add(m)
    return found


def strip_accelerators(src: str, tgt: str, markers: set[str]) -> tuple[str, str]:
    """Remove keyboard-accelerator markers (``_File``, ``&File``, ``~File``).

    Only the catalog's markers (see detect_accelerators) are considered.  A
    marker is removed from a side where it occurs exactly once before a
    non-space character, unless it is part of an identifier (``wal_level``,
    ``B&B``) that the target repeats.
    """
    for m in sorted(markers):
        i, j = _marker_index(src, m), _marker_index(tgt, m)
        if i is None and j is None:
            continue
        if m in "_&" and i is not None and _is_identifier(src, i, tgt):
            continue
        if i is not None:
            src = src[:i] + src[i + 1:]
        if j is not None:
            tgt = tgt[:j] + tgt[j + 1:]
    if markers:  # CJK-style "(_F)" accelerator suffixes copied into en/de
        src = re.sub(r"\s*\([_&~]?[A-Z]\)$", "", src)
        tgt = re.sub(r"\s*\([_&~]?[A-Z]\)$", "", tgt)
    return src, tgt


def normalise(s: str) -> str:
    """Unicode NFC, collapse whitespace, strip."""
    s = unicodedata.normalize("NFC", s)
    s = s.replace("\u00a0", " ").replace("\u200b", "")
    return " ".join(s.split())


def letters(s: str) -> int:
    return sum(ch.isalpha() for ch in s)


def non_latin(s: str) -> bool:
    """True if *s* has letters outside the Latin script."""
    for ch in s:
        if ch.isalpha() and ord(ch) > 0x24F and "LATIN" not in unicodedata.name(ch, ""):
            return True
    return False


def drop_reason(src: str, tgt: str) -> str | None:
    """Why the (normalised) pair should be dropped, or None to keep it."""
    if not src or not tgt:
        return "empty"
    if len(src) < MIN_CHARS or len(tgt) < MIN_CHARS:
        return "too_short"
    if len(src) > MAX_CHARS or len(tgt) > MAX_CHARS:
        return "too_long"
    if src == tgt or src.casefold() == tgt.casefold():
        return "untranslated"
    if len(src) >= 8 and src.casefold() in tgt.casefold():
        return "untranslated"  # e.g. gcc's "Interner Fehler: <English text>"
    if letters(PLACEHOLDER_RE.sub("", src)) < 2 or letters(PLACEHOLDER_RE.sub("", tgt)) < 2:
        return "placeholders_only"
    la, lb = len(src) + RATIO_SMOOTHING, len(tgt) + RATIO_SMOOTHING
    if max(la, lb) / min(la, lb) > MAX_RATIO:
        return "length_ratio"
    if non_latin(src) or non_latin(tgt):
        return "non_latin"
    if " " not in src and re.search(r"[_/\\=]|\w\.\w|^-", src):
        return "identifier"
    if URL_RE.search(src) and " " not in src:
        return "identifier"
    if any(ch in src + tgt for ch in "\ufffd\x00\x04"):
        return "encoding"
    return None


def split_lines(src: str, tgt: str) -> list[tuple[str, str]] | None:
    """Handle multi-line entries.

    If both sides have the same number of non-empty lines and every line but
    the last ends like a complete unit (sentence/heading/list item), pair them
    line by line.  Otherwise the text is re-flowed into one line per side
    (the length limits drop it later if it is too long).  Returns None to drop.
    """
    sl = [l for l in (x.strip() for x in src.split("\n")) if l]
    tl = [l for l in (x.strip() for x in tgt.split("\n")) if l]
    if not sl or not tl:
        return None
    if len(sl) == len(tl):
        if len(sl) == 1:
            return [(sl[0], tl[0])]
        units = all(s[-1] in SENT_END or len(s) < 40 for s in sl[:-1]) and \
            all(t[-1] in SENT_END or len(t) < 40 for t in tl[:-1])
        if units:
            return list(zip(sl, tl))
    return [(" ".join(sl), " ".join(tl))]


def clean_pair(src: str, tgt: str, accels: set[str],
               reasons: collections.Counter) -> list[tuple[str, str]]:
    """Clean one raw pair into zero or more (source, target) pairs."""
    src, tgt = GNUPG_PREFIX_RE.sub("", src), GNUPG_PREFIX_RE.sub("", tgt)
    src, tgt = strip_accelerators(src, tgt, accels)
    if TAG_RE.search(src) or TAG_RE.search(tgt):
        src, tgt = TAG_RE.sub("", src), TAG_RE.sub("", tgt)
    if ENTITY_RE.search(src) or ENTITY_RE.search(tgt):
        src, tgt = html.unescape(src), html.unescape(tgt)
    src = src.replace("\r", "").replace("\t", " ")
    tgt = tgt.replace("\r", "").replace("\t", " ")
    pieces = split_lines(src, tgt) if ("\n" in src or "\n" in tgt) else [(src, tgt)]
    if pieces is None:
        reasons["multiline_mismatch"] += 1
        return []
    out = []
    for s, t in pieces:
        s, t = normalise(s), normalise(t)
        why = drop_reason(s, t)
        if why:
            reasons[why] += 1
        else:
            out.append((s, t))
    return out


# --------------------------------------------------------------------------
# Debian package descriptions
# --------------------------------------------------------------------------


def read_index(path: Path) -> str:
    """Read an apt index file that may be stored compressed."""
    suffix = path.suffix
    if suffix == ".gz":
        data = gzip.decompress(path.read_bytes())
    elif suffix == ".xz" or suffix == ".lzma":
        data = lzma.decompress(path.read_bytes())
    elif suffix == ".bz2":
        data = bz2.decompress(path.read_bytes())
    elif suffix in (".lz4", ".zst"):
        tool = "lz4" if suffix == ".lz4" else "zstd"
        data = subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True).stdout
    else:
        data = path.read_bytes()
    return data.decode("utf-8", "replace")


def parse_translations(text: str, lang: str) -> dict[str, str]:
    """Map Description-md5 -> full ``Description-<lang>`` value from deb822 text."""
    out = {}
    field_name = f"Description-{lang}:"
    for stanza in text.split("\n\n"):
        md5 = desc = None
        lines = stanza.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("Description-md5:"):
                md5 = line.split(":", 1)[1].strip()
            elif line.startswith(field_name):
                body = [line[len(field_name):].strip()]
                for cont in lines[i + 1:]:
                    if not cont.startswith((" ", "\t")):
                        break
                    body.append(cont)
                desc = "\n".join(body)
        if md5 and desc:
            out[md5] = desc
    return out


BULLET_RE = re.compile(r"^(?:[*+o-]|\d+[.)])\s+")
ABBREV = {
    "e.g", "i.e", "etc", "vs", "cf", "approx", "ca", "dr", "mr", "mrs", "inc", "ltd",
    "no", "nr", "vol", "z", "b", "d", "h", "u", "a", "bzw", "usw", "evtl", "ggf",
    "inkl", "bspw", "vgl", "sog", "s", "v", "o", "ä", "zb", "jh", "st", "max", "min",
}
SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'„“(]?[A-ZÄÖÜ0-9])")


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences, not splitting after abbreviations."""
    out, start = [], 0
    for m in SENT_SPLIT_RE.finditer(text):
        before = text[start:m.start()]
        word = before.rsplit(None, 1)[-1] if before.split() else ""
        w = word.rstrip(".!?").lower().lstrip("(\"'")
        if word.endswith(".") and (w in ABBREV or len(w) == 1 or "." in w):
            continue
        out.append(text[start:m.start()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def description_segments(desc: str) -> tuple[str, list[list[str]]]:
    """Split a description into its short line and per-paragraph segments.

    Each paragraph becomes a list of segments: a bullet item (with its
    continuation lines), a verbatim line (extra indentation) or a run of
    ordinary text.
    """
    lines = desc.split("\n")
    short = lines[0].strip()
    paras: list[list[str]] = []
    cur: list[tuple[str, list[str]]] = []  # (kind, lines)

    def flush() -> None:
        if cur:
            paras.append([" ".join(words) for _, words in cur])
        cur.clear()

    for raw in lines[1:]:
        line = raw[1:] if raw.startswith(" ") else raw.lstrip("\t")
        text = line.strip()
        if text == ".":
            flush()
            continue
        if not text:
            continue
        kind = cur[-1][0] if cur else None
        if BULLET_RE.match(text):
            cur.append(("item", [BULLET_RE.sub("", text)]))
        elif kind == "item":
            cur[-1][1].append(text)
        elif line[:1] in (" ", "\t"):
            cur.append(("verbatim", [text]))
        elif kind == "text":
            cur[-1][1].append(text)
        else:
            cur.append(("text", [text]))
    flush()
    return short, paras


NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")


def plausible_alignment(en: str, de: str) -> bool:
    """Sanity check for an inferred (not catalog-given) alignment.

    German is typically 0.9-1.4x as long as English; a shifted alignment
    usually breaks the length ratio or the numbers that must carry over.
    """
    ratio = (len(de) + 10) / (len(en) + 10)
    if not 0.5 <= ratio <= 2.2:
        return False
    return sorted(NUMBER_RE.findall(en)) == sorted(NUMBER_RE.findall(de))


def description_pairs(en: str, de: str) -> list[tuple[str, str]]:
    """Aligned (en, de) raw pairs from two descriptions with the same md5.

    The short descriptions always pair.  Long descriptions pair paragraph by
    paragraph when both have the same number of paragraphs, segment by
    segment (running text / bullet item / verbatim line) when a paragraph has
    the same number of segments, and sentence by sentence when a segment
    splits into the same number of sentences and every sentence pair passes
    plausible_alignment(); otherwise the whole segment is paired (the length
    limit usually drops it).
    """
    s_en, p_en = description_segments(en)
    s_de, p_de = description_segments(de)
    pairs = [(s_en, s_de)]
    if len(p_en) != len(p_de):
        return pairs
    for pe, pd in zip(p_en, p_de):
        if len(pe) != len(pd):
            continue
        for se, sd in zip(pe, pd):
            ee, dd = split_sentences(se), split_sentences(sd)
            if len(ee) == len(dd) and all(plausible_alignment(e, d) for e, d in zip(ee, dd)):
                pairs.extend(zip(ee, dd))
            elif plausible_alignment(se, sd):
                pairs.append((se, sd))
    return pairs


# --------------------------------------------------------------------------
# Corpus assembly
# --------------------------------------------------------------------------


class Corpus:
    """Collects cleaned pairs, deduplicates and records per-origin stats."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.targets: dict[str, int] = collections.Counter()
        self.pairs: list[tuple[str, str, str]] = []  # (src, tgt, origin)
        self.origins: dict[str, dict] = {}
        self.accelerators: dict[str, str] = {}  # catalog -> markers stripped

    def origin(self, name: str) -> dict:
        return self.origins.setdefault(name, {
            "catalogs": 0, "raw_entries": 0, "raw_pairs": 0, "clean_pairs": 0,
            "kept": 0, "duplicates": 0, "too_many_targets": 0,
            "dropped": collections.Counter(), "per_catalog": {},
        })

    def add(self, origin: str, src_tgt: list[tuple[str, str]], accels: set[str],
            catalog: str | None = None) -> None:
        st = self.origin(origin)
        kept = 0
        for raw_s, raw_t in src_tgt:
            st["raw_pairs"] += 1
            for s, t in clean_pair(raw_s, raw_t, accels, st["dropped"]):
                st["clean_pairs"] += 1
                if (s, t) in self.seen:
                    st["duplicates"] += 1
                    continue
                if self.targets[s] >= MAX_TARGETS_PER_SOURCE:
                    st["too_many_targets"] += 1
                    continue
                self.seen.add((s, t))
                self.targets[s] += 1
                self.pairs.append((s, t, origin))
                st["kept"] += 1
                kept += 1
        if catalog is not None:
            st["catalogs"] += 1
            st["per_catalog"][catalog] = kept

    def add_catalog(self, origin: str, path: Path, label: str) -> None:
        try:
            cat = parse_mo(path.read_bytes(), str(path))
        except (ValueError, struct.error) as exc:
            log(f"warning: cannot parse {path}: {exc}")
            return
        self.origin(origin)["raw_entries"] += cat.entries
        accels = detect_accelerators(cat.pairs, cat.accel)
        self.accelerators[label] = "".join(sorted(accels))
        self.add(origin, cat.pairs, accels, catalog=label)


def split_key(src: str) -> str:
    """Loose form of a source used for splitting, so that case/punctuation
    variants of one sentence stay in the same split."""
    return " ".join(re.sub(r"[\W_]+", " ", src.casefold()).split())


def split_corpus(pairs: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str, str]]]:
    """Deterministic test/valid/train split by sha1 of the loose source key.

    Source groups are ordered by hash; the first groups fill *test* up to
    TEST_PAIRS pairs, the next ones *valid*, the rest is *train*.
    """
    groups: dict[str, list] = collections.defaultdict(list)
    for p in pairs:
        groups[split_key(p[0])].append(p)
    order = sorted(groups, key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    splits: dict[str, list] = {"test": [], "valid": [], "train": []}
    for key in order:
        if len(splits["test"]) < TEST_PAIRS:
            name = "test"
        elif len(splits["valid"]) < VALID_PAIRS:
            name = "valid"
        else:
            name = "train"
        splits[name].extend(groups[key])
    for name, items in splits.items():
        items.sort(key=lambda p: hashlib.sha1(f"{p[0]}\t{p[1]}".encode()).hexdigest())
    return splits


def installed_catalogs() -> list[Path]:
    """German catalogs installed on this machine."""
    found = []
    for d in INSTALLED_LOCALE_DIRS:
        if Path(d).is_dir():
            found += find_de_catalogs(Path(d))
    return sorted(set(found))


def owners(paths: list[Path]) -> dict[str, str]:
    """Map installed file -> 'package version' via dpkg."""
    if not paths:
        return {}
    proc = subprocess.run(["dpkg", "-S", *map(str, paths)], capture_output=True, text=True)
    pkg_of = {}
    for line in proc.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        pkg_of[path.strip()] = pkgs.split(",")[0].strip()
    names = sorted(set(pkg_of.values()))
    vers = {}
    if names:
        q = subprocess.run(["dpkg-query", "-W", "-f", "${binary:Package} ${Version}\n", *names],
                           capture_output=True, text=True)
        for line in q.stdout.splitlines():
            n, _, v = line.partition(" ")
            vers[n.split(":")[0]] = v
    return {p: f"{n} {vers.get(n.split(':')[0], '?')}" for p, n in pkg_of.items()}


def release_dates(lists: Path) -> dict[str, str]:
    """``Date:`` of each cached (In)Release file, to identify the archive state."""
    out = {}
    if lists.is_dir():
        for path in sorted(lists.glob("*Release")):
            m = re.search(r"^Date:\s*(.+)$", path.read_text("utf-8", "replace"), re.M)
            if m:
                out[path.name] = m.group(1).strip()
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--cache", default=Path(DEFAULT_CACHE), type=Path,
                    help=f"cache for .debs and apt indexes (default {DEFAULT_CACHE})")
    ap.add_argument("--no-fetch", action="store_true",
                    help="do not run apt; use only what is already in the cache")
    ap.add_argument("--refresh", action="store_true",
                    help="re-run apt-get update even if the indexes are cached")
    ap.add_argument("--no-installed", action="store_true",
                    help="ignore catalogs installed on this machine (reproducible corpus)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    apt = Apt(args.cache)
    stats: dict = {"packages": {}, "installed_catalogs": {}, "apt_update": None}
    corpus = Corpus()

    # 1. apt indexes (isolated) ------------------------------------------
    if not args.no_fetch and (args.refresh or not apt.have_indexes()):
        log("apt-get update (isolated lists, Acquire::Languages=en,de) ...")
        stats["apt_update"] = apt.update()
    elif not apt.have_indexes():
        log("warning: no cached apt indexes and --no-fetch given")

    # 2. packages ----------------------------------------------------------
    download_bytes = 0
    download_secs = 0.0
    with tempfile.TemporaryDirectory(prefix="nzserve-corpus-") as tmp:
        for pkg in track(PACKAGES, "packages", unit="packages"):
            if args.no_fetch:
                deb, info = apt.cached_deb(pkg), {"cached": True, "seconds": 0.0}
            else:
                log(f"fetching {pkg} ...")
                deb, info = apt.download(pkg)
            if deb is None:
                log(f"warning: {pkg}: no .deb available, skipped")
                stats["packages"][pkg] = {**info, "error": info.get("error", "not available")}
                continue
            size = deb.stat().st_size
            info.update(deb=deb.name, version=deb_field(deb, "Version"), size=size)
            if not info["cached"]:
                download_bytes += size
                download_secs += info["seconds"]
            root = Path(tmp) / pkg
            t0 = time.monotonic()
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            info["extract_seconds"] = round(time.monotonic() - t0, 2)
            mos = find_de_catalogs(root)
            info["de_catalogs"] = [str(m.relative_to(root)) for m in mos]
            if not mos:
                log(f"warning: {pkg} ships no German .mo catalogs")
            for mo in track(mos, pkg, unit="catalogs"):
                corpus.add_catalog(pkg, mo, f"{pkg}:/{mo.relative_to(root)}")
            stats["packages"][pkg] = info
            how = "cached" if info["cached"] else f"downloaded in {info['seconds']:.1f}s"
            log(f"  {pkg} {info['version']}: {human(size)} ({how}), {len(mos)} German "
                f"catalogs, {corpus.origin(pkg)['kept']} pairs kept")
            shutil.rmtree(root, ignore_errors=True)

    # 3. installed catalogs --------------------------------------------------
    if not args.no_installed:
        mos = installed_catalogs()
        own = owners(mos)
        for mo in track(mos, "installed catalogs", unit="catalogs"):
            corpus.add_catalog(ORIGIN_INSTALLED, mo, str(mo))
            stats["installed_catalogs"][str(mo)] = own.get(str(mo), "?")
        log(f"installed: {len(mos)} German catalogs, "
            f"{corpus.origin(ORIGIN_INSTALLED)['kept']} pairs kept")

    # 4. package descriptions ---------------------------------------------
    en_desc: dict[str, str] = {}
    de_desc: dict[str, str] = {}
    index_info = {}
    if apt.lists.is_dir():
        for path in track(sorted(apt.lists.iterdir()), "apt indexes", unit="files"):
            m = re.search(r"_i18n_Translation-(en|de)(?:\.\w+)?$", path.name)
            if not m:
                continue
            parsed = parse_translations(read_index(path), m.group(1))
            (en_desc if m.group(1) == "en" else de_desc).update(parsed)
            index_info[path.name] = {"size": path.stat().st_size, "descriptions": len(parsed)}
    matched = sorted(set(en_desc) & set(de_desc))
    raw = []
    for md5 in track(matched, "descriptions", unit="descriptions"):
        raw += description_pairs(en_desc[md5], de_desc[md5])
    corpus.add(ORIGIN_DESCRIPTIONS, raw, set())
    stats["translation_indexes"] = index_info
    stats["release_dates"] = release_dates(apt.lists)
    stats["descriptions_matched_md5"] = len(matched)
    log(f"descriptions: {len(de_desc)} German, {len(matched)} matched by md5, "
        f"{corpus.origin(ORIGIN_DESCRIPTIONS)['kept']} pairs kept")

    # 5. split and write ------------------------------------------------------
    splits = split_corpus(corpus.pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    split_stats = {}
    for name, items in splits.items():
        for lang, idx in (("en", 0), ("de", 1)):
            tmp_path = args.out / f".{name}.{lang}.tmp"
            with open(tmp_path, "w", encoding="utf-8", newline="\n") as fh:
                for p in items:
                    fh.write(p[idx] + "\n")
            tmp_path.replace(args.out / f"{name}.{lang}")
        split_stats[name] = {
            "pairs": len(items),
            "sources": len({p[0] for p in items}),
            "en_chars": sum(len(p[0]) for p in items),
            "de_chars": sum(len(p[1]) for p in items),
            "en_words": sum(len(p[0].split()) for p in items),
            "de_words": sum(len(p[1].split()) for p in items),
            "per_origin": dict(collections.Counter(p[2] for p in items)),
        }

    for st in corpus.origins.values():
        st["dropped"] = dict(st["dropped"].most_common())
    stats.update({
        "total_pairs": len(corpus.pairs),
        "splits": split_stats,
        "origins": corpus.origins,
        "accelerator_markers": {k: v for k, v in corpus.accelerators.items() if v},
        "download": {"bytes": download_bytes, "seconds": round(download_secs, 2)},
        "settings": {
            "min_chars": MIN_CHARS, "max_chars": MAX_CHARS, "max_ratio": MAX_RATIO,
            "ratio_smoothing": RATIO_SMOOTHING,
            "max_targets_per_source": MAX_TARGETS_PER_SOURCE,
            "test_pairs": TEST_PAIRS, "valid_pairs": VALID_PAIRS,
            "installed_catalogs_used": not args.no_installed,
        },
        "wall_seconds": round(time.monotonic() - t_start, 2),
    })
    with open(args.out / "stats.json", "w", encoding="utf-8") as fh:
        json.dump(stats, fh, indent=2, ensure_ascii=False, sort_keys=False)
        fh.write("\n")

    # 6. summary ----------------------------------------------------------------
    print(f"corpus written to {args.out}")
    print(f"{'origin':<22}{'raw':>9}{'clean':>9}{'kept':>9}")
    for name, st in corpus.origins.items():
        print(f"{name:<22}{st['raw_pairs']:>9}{st['clean_pairs']:>9}{st['kept']:>9}")
    print(f"{'total':<22}{'':>9}{'':>9}{len(corpus.pairs):>9}")
    for name in ("train", "valid", "test"):
        print(f"{name:<6} {split_stats[name]['pairs']:>8} pairs")
    if stats["apt_update"]:
        upd = stats["apt_update"]
        print(f"apt-get update: {upd.get('fetched', '?')} in {upd['seconds']:.1f}s")
    print(f"downloaded {human(download_bytes)} of .debs in {download_secs:.1f}s; "
          f"wall time {stats['wall_seconds']:.1f}s")
    sample = random.Random(0).sample(splits["train"], min(10, len(splits["train"])))
    print("examples (train):")
    for s, t, o in sample:
        print(f"  [{o}] {s}\n      -> {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
