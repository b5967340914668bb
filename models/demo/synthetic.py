#!/usr/bin/env python3
"""Write a small synthetic model directory (config.json, model.safetensors,
dict.txt) with Gaussian bf16 weights in fairseq naming, for `make demo`.

It is a stand-in until the trained demo models land; its weights are random,
so it shows the container and codec, not translation quality.

usage: synthetic.py OUT_DIR [--dim 256] [--layers 2] [--vocab 4000] [--seed 0]
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "python"))
from st_util import f32_to_bf16_bits, write_safetensors  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    d, ffn = a.dim, 4 * a.dim

    def w(rows, cols):
        return ("BF16", f32_to_bf16_bits(rng.normal(0, (2.0 / (rows + cols)) ** 0.5, (rows, cols)).astype(np.float32)))

    def vec(n, value=None):
        v = np.full(n, value, np.float32) if value is not None else rng.normal(0, 0.02, n).astype(np.float32)
        return ("BF16", f32_to_bf16_bits(v))

    t = {"encoder.embed_tokens.weight": w(a.vocab, d)}
    for side in ("encoder", "decoder"):
        for i in range(a.layers):
            p = f"{side}.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                t[p + f"self_attn.{proj}.weight"] = w(d, d)
                t[p + f"self_attn.{proj}.bias"] = vec(d)
            t[p + "fc1.weight"], t[p + "fc1.bias"] = w(ffn, d), vec(ffn)
            t[p + "fc2.weight"], t[p + "fc2.bias"] = w(d, ffn), vec(d)
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                t[p + f"{ln}.weight"], t[p + f"{ln}.bias"] = vec(d, 1.0), vec(d, 0.0)
    t["decoder.embed_length.weight"] = w(256, d)
    os.makedirs(a.out, exist_ok=True)
    write_safetensors(os.path.join(a.out, "model.safetensors"), t, metadata={"format": "pt"})
    cfg = {"architecture": "synthetic", "encoder_layers": a.layers, "decoder_layers": a.layers,
           "encoder_embed_dim": d, "encoder_ffn_embed_dim": ffn, "note": "random weights (demo of the codec)"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(a.out, "dict.txt"), "w") as f:
        f.writelines(f"tok{i} 1\n" for i in range(a.vocab - 4))
    print(f"wrote {len(t)} tensors to {a.out}")


if __name__ == "__main__":
    main()
