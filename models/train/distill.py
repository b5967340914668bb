#!/usr/bin/python3
"""Sequence-level knowledge distillation data (Kim & Rush 2016) with `nzp translate`.

    /usr/bin/python3 models/train/distill.py --corpus /var/tmp/nzserve-corpus \
        --model models/demo/nat-ende.nzp --out /var/tmp/nzserve-distill \
        [--beam 4] [--jobs 2] [--batch 32] [--chunk 5000] [--nzp build/nzp]

Translates CORPUS/train.<src> with the model's autoregressive decoder (beam
search, `nzp translate --at-beam B`, one thread per job, --jobs jobs side by
side) into OUT/train.<tgt>, line by line aligned with the corpus, for
train_nat.py --distill OUT. The work is cut into chunks of --chunk lines;
each finished chunk is kept (OUT/chunks/NNNNN.<tgt>, written atomically), so
an interrupted run resumes where it stopped. A line the teacher cannot
translate stays empty (train_nat.py then keeps the original target for it).
OUT/distill.json records the teacher, the options, the lines, the empty
lines, the lines holding <unk> and the CPU and wall seconds spent.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progress import Progress, clear_line  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [l.rstrip("\n") for l in f]


def count_lines(path):
    """Lines written so far to a chunk's output (0 when it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def sha1_file(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", required=True, help="the teacher .nzp (its AT decoder translates)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--src", default="en")
    ap.add_argument("--tgt", default="de")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--nzp", default=os.path.join(REPO, "build", "nzp"))
    a = ap.parse_args(argv)

    src = read_lines(os.path.join(a.corpus, "train." + a.src))
    chunks_dir = os.path.join(a.out, "chunks")
    os.makedirs(chunks_dir, exist_ok=True)
    teacher = {"model": os.path.abspath(a.model), "sha1": sha1_file(a.model), "beam": a.beam}
    meta_path = os.path.join(a.out, "teacher.json")
    if os.path.exists(meta_path):  # chunks from another teacher or option set must not be mixed in
        with open(meta_path) as f:
            old = json.load(f)
        if (old["sha1"], old["beam"]) != (teacher["sha1"], teacher["beam"]):
            raise SystemExit("distill: %s holds chunks of another teacher/beam (%s); use a new --out" % (
                a.out, meta_path))
    with open(meta_path, "w") as f:
        json.dump(teacher, f, indent=1)

    n = (len(src) + a.chunk - 1) // a.chunk
    todo = []
    for i in range(n):
        part = src[i * a.chunk:(i + 1) * a.chunk]
        out = os.path.join(chunks_dir, "%05d.%s" % (i, a.tgt))
        if os.path.exists(out) and len(read_lines(out)) == len(part):
            continue
        inp = os.path.join(chunks_dir, "%05d.%s" % (i, a.src))
        with open(inp, "w", encoding="utf-8") as f:
            f.write("".join(l + "\n" for l in part))
        todo.append((i, inp, out))
    print("distill: %d lines in %d chunks, %d to translate (%d jobs, beam %d)" % (
        len(src), n, len(todo), a.jobs, a.beam), flush=True)

    t0 = time.time()
    cpu0 = os.times()
    running = []
    done = 0
    # lines translated this run: finished chunks, plus what the running jobs have written so far
    progress = Progress(sum(min(a.chunk, len(src) - i * a.chunk) for i, _, _ in todo), "distill", unit="lines")
    lines_done = 0
    while todo or running:
        while todo and len(running) < a.jobs:
            i, inp, out = todo.pop(0)
            cmd = [a.nzp, "translate", a.model, "--at-beam", str(a.beam), "--batch", str(a.batch),
                   "--threads", "1"]
            fin, fout = open(inp, "rb"), open(out + ".tmp", "wb")
            ferr = open(out + ".stderr", "wb")
            running.append((subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr), i, inp, out,
                            (fin, fout, ferr)))
        time.sleep(0.5)
        for r in list(running):
            p, i, inp, out, files = r
            if p.poll() is None:
                continue
            running.remove(r)
            for f in files:
                f.close()
            want = len(read_lines(inp))
            got = len(read_lines(out + ".tmp"))
            if p.returncode not in (0, 1) or got != want:  # 1: some lines failed (left empty)
                progress.close()
                raise SystemExit("distill: chunk %d failed (exit %d, %d of %d lines), see %s.stderr" % (
                    i, p.returncode, got, want, out))
            os.replace(out + ".tmp", out)
            os.remove(inp)
            done += 1
            lines_done += want
            el = time.time() - t0
            clear_line()
            print("distill: chunk %d done (%d/%d this run, %.0f s, %.1f lines/s)" % (
                i, done, done + len(todo) + len(running), el, done * a.chunk / max(el, 1e-9)), flush=True)
        progress.update(lines_done + sum(count_lines(r[3] + ".tmp") for r in running))
    progress.close()

    hyps = []
    for i in range(n):
        hyps += read_lines(os.path.join(chunks_dir, "%05d.%s" % (i, a.tgt)))
    assert len(hyps) == len(src)
    tmp = os.path.join(a.out, "train.%s.tmp" % a.tgt)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hyps))
    os.replace(tmp, os.path.join(a.out, "train." + a.tgt))
    cpu1 = os.times()
    stats = dict(teacher, lines=len(src), empty=sum(1 for h in hyps if not h.strip()),
                 with_unk=sum(1 for h in hyps if "<unk>" in h), jobs=a.jobs, batch=a.batch,
                 wall_seconds_this_run=round(time.time() - t0, 1),
                 child_cpu_seconds_this_run=round(cpu1.children_user + cpu1.children_system
                                                  - cpu0.children_user - cpu0.children_system, 1))
    with open(os.path.join(a.out, "distill.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print("distill: wrote %s (%d lines, %d empty, %d with <unk>)" % (
        os.path.join(a.out, "train." + a.tgt), len(hyps), stats["empty"], stats["with_unk"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
