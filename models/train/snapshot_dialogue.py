#!/usr/bin/python3
"""Snapshot a dialogue training checkpoint (phase 1 or 2) as one small .nzp that a
later session (or machine) continues from.

    /usr/bin/python3 models/train/snapshot_dialogue.py OUT/checkpoint_last.pt SNAP.nzp [--nzp build/nzp]

    # continue later, anywhere:
    build/nzp unpack --model-dir SNAP.nzp /var/tmp/snap
    /usr/bin/python3 models/train/train_dialogue.py ... --out NEW_OUT --init-model /var/tmp/snap

The snapshot is the model directory models/convert/eqhard_t5.py writes (phase 1:
K = 1 with zero adapters; phase 2: the K decoders), so `nzp chat SNAP.nzp` answers
with it, packed `--mode bf16` (lossless for bf16 weights: the fp32 training
weights rounded once), with the training state in config.json's "training"
object: phase, updates (phase 2: EqHard rounds), global_step, the data position
(`iters`: epoch and batch per source, so the batch stream goes on where it
stopped), phase 2's per-decoder step counts (`per_mode`), wall seconds and the
arguments of the run. The optimizer's moments are not kept (they would triple the
size): `--init-model` starts AdamW afresh (phase 1 ramps the learning rate up
over `--rewarm-updates`; phase 2's rate is constant).
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
    p.add_argument("checkpoint", help="train_dialogue.py's OUT/checkpoint_last.pt (phase 1 or 2)")
    p.add_argument("out", help="the snapshot .nzp to write")
    p.add_argument("--nzp", default=os.path.join(ROOT, "build", "nzp"), help="the nzp tool (make all)")
    a = p.parse_args(argv)
    ck = torch.load(a.checkpoint, map_location="cpu")
    ns = ck.get("nzserve")
    if not isinstance(ns, dict) or ns.get("phase") not in (1, 2):
        raise SystemExit("%s: not a train_dialogue.py checkpoint of phase 1 or 2 (phase %r)" % (
            a.checkpoint, ns.get("phase") if isinstance(ns, dict) else None))
    training = {"phase": ns["phase"], "updates": int(ns["updates"]), "global_step": int(ck["global_step"]),
                "training_steps": int(ck["training_steps"]),
                "iters": ns["iters"], "wall_seconds": round(float(ns["wall_seconds"]), 1),
                "train_args": {k: v for k, v in ns["train_args"].items()
                               if k not in ("resume", "init_model", "max_minutes", "interrupt_at")}}
    if ns["phase"] == 2:
        training["per_mode"] = [int(x) for x in ns["steps_trained_per_mode"]]
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
    print("%s: phase %d update %d, %.1f MB" % (a.out, training["phase"], training["updates"],
                                                os.path.getsize(a.out) / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
