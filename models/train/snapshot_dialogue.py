#!/usr/bin/python3
"""Snapshot a phase-1 dialogue training checkpoint as one small .nzp that a later
session (or machine) continues from.

    /usr/bin/python3 models/train/snapshot_dialogue.py OUT/checkpoint_last.pt SNAP.nzp [--nzp build/nzp]

    # continue later, anywhere:
    build/nzp unpack --model-dir SNAP.nzp /var/tmp/snap
    /usr/bin/python3 models/train/train_dialogue.py ... --out NEW_OUT --init-model /var/tmp/snap

The snapshot is the K = 1 model directory models/convert/eqhard_t5.py writes
(zero adapters, so `nzp chat SNAP.nzp` answers with it), packed `--mode bf16`
(lossless for bf16 weights: the fp32 training weights rounded once), with the
training state in config.json's "training" object: phase (1), updates, the data
position (`iters`: epoch and batch per source, so the batch stream goes on where
it stopped), wall seconds and the arguments of the run. The optimizer's moments
are not kept (they would triple the size): `--init-model` starts AdamW afresh
and ramps the learning rate up over `--rewarm-updates`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="train_dialogue.py's OUT/checkpoint_last.pt (phase 1)")
    p.add_argument("out", help="the snapshot .nzp to write")
    p.add_argument("--nzp", default=os.path.join(ROOT, "build", "nzp"), help="the nzp tool (make all)")
    a = p.parse_args(argv)
    ck = torch.load(a.checkpoint, map_location="cpu")
    ns = ck.get("nzserve")
    if not isinstance(ns, dict) or ns.get("phase") != 1:
        raise SystemExit("%s: not a phase-1 train_dialogue.py checkpoint (phase %r)" % (
            a.checkpoint, ns.get("phase") if isinstance(ns, dict) else None))
    training = {"phase": 1, "updates": int(ns["updates"]), "iters": ns["iters"],
                "wall_seconds": round(float(ns["wall_seconds"]), 1),
                "train_args": {k: v for k, v in ns["train_args"].items()
                               if k not in ("resume", "init_model", "max_minutes", "interrupt_at")}}
    del ck
    spm = os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), "spm.model")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, os.path.join(ROOT, "models", "convert", "eqhard_t5.py"),
                        a.checkpoint, d, "--spm", spm], check=True, stdout=subprocess.DEVNULL)
        cpath = os.path.join(d, "config.json")
        with open(cpath) as f:
            conf = json.load(f)
        conf["training"] = training
        with open(cpath, "w") as f:
            json.dump(conf, f, indent=1, sort_keys=True)
            f.write("\n")
        subprocess.run([a.nzp, "pack", "--mode", "bf16", "--quiet", d, a.out], check=True)
    print("%s: phase 1 update %d, %.1f MB" % (a.out, training["updates"], os.path.getsize(a.out) / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
