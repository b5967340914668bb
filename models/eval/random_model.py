#!/usr/bin/python3
"""Write a random-weight translation model directory (cmlm_transformer with an
AT decoder, the layout of models/README.md) for speed benchmarks at sizes far
beyond the demo model: `nzp pack` it, then `evaluate.py --bench` it.

The tokenizer (spm.model, dict.txt) is copied from an existing model
directory, so the model reads and writes real pieces. Weights are Gaussian
(std 0.02, the usual initialisation scale), rounded to bf16 and stored as
fp32: `--mode raw` is then true fp32 and `--mode bf16` lossless, the same
values. Layer norms are 1 / 0, biases 0.

  random_model.py --like DIR --out OUT [--dim 1024] [--ffn 4096] [--heads 16]
                  [--encoder-layers 2] [--decoder-layers 1] [--at-decoder-layers 6] [--seed 1]

The defaults make a 1024-wide model of ~151 M parameters (fp32 ~600 MB, far
beyond a 32 MiB L3), most of them in the 6-layer AT decoder that batch-1 AT
decoding reads once per token.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
from safetensors_io import f32_to_bf16_bits, write_safetensors  # noqa: E402


def bf16_round(a):
    return (f32_to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", required=True, help="model directory whose config, spm.model and dict.txt to reuse")
    p.add_argument("--out", required=True)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--encoder-layers", type=int, default=2)
    p.add_argument("--decoder-layers", type=int, default=1)
    p.add_argument("--at-decoder-layers", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    o = p.parse_args()
    with open(os.path.join(o.like, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("architecture") != "cmlm_transformer":
        raise SystemExit("random_model.py: --like must be a cmlm_transformer model directory")
    d, F, V = o.dim, o.ffn, cfg["vocab_size"]
    P = cfg["max_source_positions"] + 2
    cfg.update(encoder_embed_dim=d, decoder_embed_dim=d, encoder_ffn_embed_dim=F, decoder_ffn_embed_dim=F,
               encoder_attention_heads=o.heads, decoder_attention_heads=o.heads, encoder_layers=o.encoder_layers,
               decoder_layers=o.decoder_layers, at_decoder_layers=o.at_decoder_layers,
               converted_from={"random_model.py": {"seed": o.seed}})
    cfg.pop("generation", None)
    rng = np.random.default_rng(o.seed)
    T = {}

    def mat(name, rows, cols):
        T[name] = bf16_round(rng.normal(0, 0.02, (rows, cols)))

    def vec(name, n, value=0.0):
        T[name] = np.full(n, value, np.float32)

    def attn(prefix):
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            mat("%s.%s.weight" % (prefix, proj), d, d)
            vec("%s.%s.bias" % (prefix, proj), d)

    def norm(name):
        vec(name + ".weight", d, 1.0)
        vec(name + ".bias", d)

    def layer(prefix, cross):
        attn(prefix + ".self_attn")
        norm(prefix + ".self_attn_layer_norm")
        if cross:
            attn(prefix + ".encoder_attn")
            norm(prefix + ".encoder_attn_layer_norm")
        mat(prefix + ".fc1.weight", F, d)
        vec(prefix + ".fc1.bias", F)
        mat(prefix + ".fc2.weight", d, F)
        vec(prefix + ".fc2.bias", d)
        norm(prefix + ".final_layer_norm")

    mat("encoder.embed_tokens.weight", V, d)
    mat("encoder.embed_positions.weight", P, d)
    for i in range(o.encoder_layers):
        layer("encoder.layers.%d" % i, False)
    mat("decoder.embed_positions.weight", P, d)
    for i in range(o.decoder_layers):
        layer("decoder.layers.%d" % i, True)
    mat("decoder.embed_length.weight", cfg["length_classes"], d)
    mat("at_decoder.embed_positions.weight", P, d)
    for i in range(o.at_decoder_layers):
        layer("at_decoder.layers.%d" % i, True)
    os.makedirs(o.out, exist_ok=True)
    write_safetensors(os.path.join(o.out, "model.safetensors"), [(k, a, "F32") for k, a in T.items()],
                      {"format": "pt"})
    with open(os.path.join(o.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in (cfg["spm_model"], cfg["dictionary"]):
        shutil.copy(os.path.join(o.like, name), os.path.join(o.out, name))
    n = sum(a.size for a in T.values())
    print("wrote %s: %.1f M parameters, fp32 %.0f MB" % (o.out, n / 1e6, 4 * n / 1e6))


if __name__ == "__main__":
    main()
