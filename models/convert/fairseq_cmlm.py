#!/usr/bin/python3
"""fairseq CMLM / multi-task-nat checkpoint -> nzserve model directory.

    /usr/bin/python3 models/convert/fairseq_cmlm.py CHECKPOINT.pt SPM.model DICT.txt OUTDIR \
        [--dtype fp32|bf16] [--no-at]

Input: a fairseq ``cmlm_transformer`` checkpoint (state-dict names ``encoder.*``,
``decoder.*``) or a multi-task-nat ``mt_transformer`` one (``at_model.encoder.*``,
``at_model.decoder.*``, ``nat_model.encoder.*``, ``nat_model.decoder.*``; the encoder
must be shared, i.e. --share-encoder). Old (``decoder.embed_out``, no
``output_projection``) and new (``decoder.output_projection.weight``) fairseq
layouts are accepted; ``args`` (Namespace) or ``cfg`` (dict/omegaconf) holds the
hyper-parameters.

Output (the contract of issue 4, see models/train/README_train.md):
  model.safetensors  fairseq names: encoder.*, decoder.* (CMLM, incl. embed_length),
                     at_decoder.* (from at_model.decoder.*); each tied tensor once:
                     with share_all_embeddings only encoder.embed_tokens.weight is
                     stored (decoder/at_decoder embed_tokens and output projections
                     are that matrix); untied output projections are stored as
                     *.output_projection.weight. No version/_float_tensor buffers.
  config.json        "architecture": "cmlm_transformer" + fairseq arg names
  dict.txt, spm.model  copied

Needs only torch (to unpickle the checkpoint) and numpy.
"""

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
from safetensors_io import f32_to_bf16_bits, write_safetensors  # noqa: E402

ARCH_KEYS = [
    "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
    "encoder_normalize_before", "encoder_learned_pos",
    "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
    "decoder_normalize_before", "decoder_learned_pos",
    "max_source_positions", "max_target_positions", "activation_fn",
    "share_all_embeddings", "share_decoder_input_output_embed", "no_scale_embedding",
    "no_token_positional_embeddings", "layernorm_embedding",
    "pred_length_offset", "length_loss_factor", "sg_length_pred", "src_embedding_copy",
]
# fairseq cmlm_base_architecture / mt_transformer base_architecture defaults
DEFAULTS = dict(
    encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_layers=6,
    encoder_attention_heads=8, encoder_normalize_before=False, encoder_learned_pos=False,
    decoder_layers=6, decoder_attention_heads=8, decoder_normalize_before=False,
    decoder_learned_pos=False, max_source_positions=1024, max_target_positions=1024,
    activation_fn="relu", share_decoder_input_output_embed=False,
    no_scale_embedding=False, no_token_positional_embeddings=False, layernorm_embedding=False,
    pred_length_offset=False, length_loss_factor=0.1, sg_length_pred=False,
    src_embedding_copy=False,
)
DROP_SUFFIXES = (".version", "._float_tensor")


def dropped(k):
    """fairseq bookkeeping buffers, not weights."""
    return ("." + k).endswith(DROP_SUFFIXES)


def die(msg):
    sys.exit("fairseq_cmlm.py: error: " + msg)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # torch < 1.13
        return torch.load(path, map_location="cpu")


def checkpoint_args(ck):
    if ck.get("args") is not None:
        return dict(vars(ck["args"]))
    cfg = ck.get("cfg")
    if cfg is None:
        die("checkpoint has neither 'args' nor 'cfg'")
    model = cfg["model"] if "model" in cfg else cfg
    try:
        model = dict(model.items()) if not isinstance(model, dict) else model
    except AttributeError:
        model = vars(model)
    out = dict(model)
    if "task" in cfg and cfg["task"] is not None:
        for k in ("source_lang", "target_lang"):
            try:
                out.setdefault(k, cfg["task"][k])
            except (KeyError, TypeError):
                pass
    return out


def arch_config(a):
    c = {}
    for k in ARCH_KEYS:
        v = a.get(k)
        if v is None:
            v = DEFAULTS.get(k)
        c[k] = v
    if c["decoder_embed_dim"] is None:
        c["decoder_embed_dim"] = c["encoder_embed_dim"]
    if c["decoder_ffn_embed_dim"] is None:
        c["decoder_ffn_embed_dim"] = c["encoder_ffn_embed_dim"]
    if c["share_all_embeddings"] is None:  # cmlm default True, mt_transformer default False
        c["share_all_embeddings"] = a.get("arch", "cmlm_transformer") != "mt_transformer"
    if c["share_all_embeddings"]:
        c["share_decoder_input_output_embed"] = True
    return c


def split_state(sd, arch):
    """-> (encoder dict, nat decoder dict, at decoder dict or None), names without prefix."""
    def sub(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith("nat_model.") for k in sd):
        enc = sub("nat_model.encoder.")
        at_enc = sub("at_model.encoder.")
        for k, v in at_enc.items():
            if dropped(k):
                continue
            if k not in enc or not torch.equal(enc[k], v):
                die("at_model.encoder and nat_model.encoder differ (%s): only checkpoints "
                    "trained with --share-encoder are supported" % k)
        at = sub("at_model.decoder.")
        return enc, sub("nat_model.decoder."), (at or None)
    if not any(k.startswith("encoder.") for k in sd):
        die("unrecognised state dict (no encoder.* / nat_model.* keys)")
    at = sub("at_decoder.")
    return sub("encoder."), sub("decoder."), (at or None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("spm_model")
    p.add_argument("dict_txt")
    p.add_argument("outdir")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-at", action="store_true", help="drop the AT decoder")
    return p.parse_args(argv)


def check_supported(a, c):
    """die() on checkpoint options the engine does not implement (a: checkpoint args, c: arch_config)."""
    for k in ("src_embedding_copy", "no_token_positional_embeddings"):
        if c[k]:
            die("%s is not supported" % k)
    if a.get("adaptive_softmax_cutoff") or a.get("adaptive_input"):
        die("adaptive softmax/input is not supported")
    if c["encoder_embed_dim"] != c["decoder_embed_dim"]:
        die("encoder_embed_dim != decoder_embed_dim is not supported")
    if a.get("share_decoder", False):
        die("mt_transformer --share-decoder is not supported")


def part_tensors(prefix, part, is_decoder, c, emb, dec):
    """The (name, float32 array) pairs of one state-dict part (encoder / decoder / AT decoder) under
    the model directory's names: tied embeddings and output projections are checked and left out,
    fairseq's embed_out becomes output_projection.weight."""
    out = []
    for k, v in part.items():
        if dropped(k):
            continue
        if is_decoder and k == "embed_tokens.weight":
            if c["share_all_embeddings"]:
                if not torch.equal(v, emb):
                    die("share_all_embeddings but %sembed_tokens differs from the encoder's" % prefix)
                continue
            if prefix == "at_decoder." and torch.equal(v, dec["embed_tokens.weight"]):
                continue  # mt_transformer: AT and NAT decoders share decoder_embed_tokens
        if is_decoder and k in ("output_projection.weight", "embed_out"):
            if c["share_decoder_input_output_embed"]:
                ref = dec.get("embed_tokens.weight", emb) if prefix == "at_decoder." else \
                    part.get("embed_tokens.weight", emb)
                if not torch.equal(v, ref):
                    die("%s%s is not tied to the embeddings" % (prefix, k))
                continue
            k = "output_projection.weight"
        if k.startswith(("project_in_dim", "project_out_dim", "adaptive_softmax")):
            die("%s%s is not supported" % (prefix, k))
        if v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            die("%s: unexpected dtype %s" % (prefix + k, v.dtype))
        out.append((prefix + k, v.detach().float().cpu().numpy()))
    return out


def n_layers(part):
    return len({k.split(".")[1] for k in part if k.startswith("layers.")})


def check_layers(c, enc, dec, tensors):
    """die() when the state dict's layers or position embeddings disagree with the args."""
    if n_layers(enc) != c["encoder_layers"] or n_layers(dec) != c["decoder_layers"]:
        die("layer counts in the state dict (%d/%d) differ from args (%d/%d)" % (
            n_layers(enc), n_layers(dec), c["encoder_layers"], c["decoder_layers"]))
    for side in ("encoder", "decoder"):
        learned = any(n.startswith(side + ".embed_positions.") for n, _ in tensors)
        if learned != bool(c[side + "_learned_pos"]):
            die("%s_learned_pos=%s but embed_positions weights %s" % (
                side, c[side + "_learned_pos"], "present" if learned else "absent"))


def model_config(o, a, c, arch, ck, V, dec, n_at, dt):
    """config.json of the model directory."""
    hist = ck.get("optimizer_history") or [{}]
    cfg = {"architecture": "cmlm_transformer"}
    cfg.update(c)
    if n_at:
        cfg["at_decoder_layers"] = n_at
        # multi-task-nat trains the AT decoder on [bos, y.., eos] given [eos, bos, y..];
        # our trainer (and fairseq's rerank) use [y.., eos] given [eos, y..].
        cfg["at_prepend_bos"] = bool(a.get("at_prepend_bos", arch == "mt_transformer"))
    cfg.update({
        "vocab_size": int(V),
        "source_lang": a.get("source_lang"), "target_lang": a.get("target_lang"),
        "bos_index": 0, "pad_index": 1, "eos_index": 2, "unk_index": 3, "mask_index": 3,
        "src_prepend_bos": bool(a.get("src_prepend_bos", True)),
        "tgt_prepend_bos": True,
        "length_classes": int(dec["embed_length.weight"].shape[0]),
        "layer_norm_eps": 1e-5,
        "dictionary": "dict.txt", "spm_model": "spm.model",
        "torch_dtype": "float32" if dt == "F32" else "bfloat16",
        "converted_from": {"arch": arch, "checkpoint": os.path.basename(o.checkpoint),
                           "num_updates": hist[-1].get("num_updates")},
    })
    return cfg


def main(argv=None):
    o = parse_args(argv)
    ck = load_checkpoint(o.checkpoint)
    a = checkpoint_args(ck)
    arch = a.get("arch", "cmlm_transformer")
    c = arch_config(a)
    check_supported(a, c)
    enc, dec, at = split_state(ck["model"], arch)
    if o.no_at:
        at = None
    emb = enc["embed_tokens.weight"]
    V = emb.shape[0]
    tensors = part_tensors("encoder.", enc, False, c, emb, dec) + part_tensors("decoder.", dec, True, c, emb, dec)
    if "embed_length.weight" not in dec:
        die("decoder.embed_length.weight missing: not a CMLM/NAT checkpoint")
    n_at = 0
    if at is not None:
        tensors += part_tensors("at_decoder.", at, True, c, emb, dec)
        n_at = n_layers(at)
    check_layers(c, enc, dec, tensors)
    with open(o.dict_txt, encoding="utf-8") as f:
        ndict = sum(1 for l in f if l.strip())
    if ndict + 4 != V:
        die("dict.txt has %d entries + 4 specials != embedding rows %d" % (ndict, V))

    os.makedirs(o.outdir, exist_ok=True)
    dt = "F32" if o.dtype == "fp32" else "BF16"
    out = [(n, t if dt == "F32" else f32_to_bf16_bits(t), dt) for n, t in tensors]
    write_safetensors(os.path.join(o.outdir, "model.safetensors"), out, {"format": "pt"})
    with open(os.path.join(o.outdir, "config.json"), "w") as f:
        json.dump(model_config(o, a, c, arch, ck, V, dec, n_at, dt), f, indent=2)
        f.write("\n")
    shutil.copyfile(o.dict_txt, os.path.join(o.outdir, "dict.txt"))
    shutil.copyfile(o.spm_model, os.path.join(o.outdir, "spm.model"))
    n = sum(t.size for _, t in tensors)
    print("wrote %s: %d tensors, %d parameters (%.2fM), %s, arch %s, AT decoder layers %d" % (
        o.outdir, len(tensors), n, n / 1e6, o.dtype, arch, n_at))


if __name__ == "__main__":
    main()
