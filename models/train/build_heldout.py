#!/usr/bin/python3
"""Held-out EN->DE test sets from software catalogs that are in no part of the corpus.

    /usr/bin/python3 models/train/build_heldout.py --corpus /var/tmp/nzserve-corpus \
        --out /var/tmp/nzserve-heldout [--packages p1,p2,...] [--max-pairs 1000] [--cache DIR]

A generalisation check beside the corpus's random test split: the German .mo
catalogs of Debian packages that build_corpus.py does not fetch and that are not
installed here, cleaned exactly as the corpus is (build_corpus.Corpus: the same
accelerator stripping, filters, deduplication), minus every pair whose source
(in build_corpus.split_key's loose form) occurs anywhere in the corpus
(train, valid or test). Writes OUT/heldout.{en,de} (at most --max-pairs, a
deterministic sha1-ordered sample, spread evenly over the packages) and
OUT/stats.json (per package: version, catalogs, pairs kept, pairs dropped
as seen in the corpus). Only the standard library, apt-get and dpkg-deb.
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_corpus as C  # noqa: E402
from progress import track  # noqa: E402

# UI catalogs of programs unrelated to the corpus's packages (chat, FTP,
# IRC, media player, spreadsheet): none is fetched by build_corpus.py nor installed by `make deps`
DEFAULT_PACKAGES = ["pidgin-data", "filezilla-common", "hexchat-common", "vlc-l10n", "gnumeric-common"]


def corpus_keys(corpus: Path) -> set[str]:
    keys = set()
    for split in ("train", "valid", "test"):
        with open(corpus / f"{split}.en", encoding="utf-8") as f:
            keys.update(C.split_key(line.rstrip("\n")) for line in f)
    return keys


def installed(pkg: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return p.returncode == 0 and "installed" in p.stdout.split()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, type=Path, help="build_corpus.py output (train/valid/test.en)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--packages", default=",".join(DEFAULT_PACKAGES))
    ap.add_argument("--max-pairs", type=int, default=1000)
    ap.add_argument("--cache", default=Path(C.DEFAULT_CACHE), type=Path)
    a = ap.parse_args(argv)
    packages = [p for p in a.packages.split(",") if p]
    clash = [p for p in packages if p in C.PACKAGES or installed(p)]
    if clash:
        raise SystemExit(f"build_heldout: {', '.join(clash)} feed the corpus (fetched or installed): not held out")
    seen = corpus_keys(a.corpus)
    apt = C.Apt(a.cache)
    if not apt.have_indexes():
        apt.update()
    stats, per_pkg = {"packages": {}, "corpus_sources": len(seen)}, {}
    with tempfile.TemporaryDirectory(prefix="nzserve-heldout-") as tmp:
        for pkg in track(packages, "packages", unit="packages"):
            deb, info = apt.download(pkg)
            if deb is None:
                raise SystemExit(f"build_heldout: cannot download {pkg}: {info.get('error', '?')}")
            root = Path(tmp) / pkg
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            corpus = C.Corpus()
            mos = C.find_de_catalogs(root)
            for mo in track(mos, pkg, unit="catalogs"):
                corpus.add_catalog(pkg, mo, f"{pkg}:/{mo.relative_to(root)}")
            fresh = [(s, t) for s, t, _ in corpus.pairs if C.split_key(s) not in seen]
            # one target per source (the first), so a source is never counted twice
            firsts = {}
            for s, t in fresh:
                firsts.setdefault(s, t)
            per_pkg[pkg] = sorted(firsts.items(), key=lambda st: hashlib.sha1(f"{st[0]}\t{pkg}".encode()).hexdigest())
            stats["packages"][pkg] = {"version": C.deb_field(deb, "Version"), "catalogs": len(mos),
                                      "pairs": len(corpus.pairs), "in_corpus": len(corpus.pairs) - len(fresh),
                                      "held_out_sources": len(firsts)}
            C.log(f"{pkg}: {len(mos)} catalogs, {len(corpus.pairs)} pairs, {len(firsts)} sources not in the corpus")
    # an even share per package (round robin over the sha1-ordered lists), then drop cross-package repeats
    out, keys = [], set()
    it = {p: iter(v) for p, v in per_pkg.items()}
    while len(out) < a.max_pairs and it:
        for p in list(it):
            st = next(it[p], None)
            if st is None:
                del it[p]
                continue
            k = C.split_key(st[0])
            if k not in keys and len(out) < a.max_pairs:
                keys.add(k)
                out.append((st[0], st[1], p))
    a.out.mkdir(parents=True, exist_ok=True)
    for lang, i in (("en", 0), ("de", 1)):
        (a.out / f"heldout.{lang}").write_text("".join(x[i] + "\n" for x in out), encoding="utf-8")
    stats["pairs"] = len(out)
    stats["per_package"] = {p: sum(1 for x in out if x[2] == p) for p in per_pkg}
    (a.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    print(f"held-out set: {len(out)} pairs from {len(per_pkg)} packages -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
