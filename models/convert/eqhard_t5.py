#!/usr/bin/python3
"""EqHard-EM multi-decoder T5 checkpoint -> nzserve model directory.

    /usr/bin/python3 models/convert/eqhard_t5.py CHECKPOINT OUTDIR [--spm SPM.model] \
        [--config CONFIG.json] [--num-modes K] [--decoder adapter|transformer] \
        [--dtype fp32|bf16] [--turn-separator S] [--max-context-turns N] \
        [--max-source-length N] [--max-target-length N]

CHECKPOINT may be
  * EqHard-EM's BaseTrainer checkpoint (last_checkpoint.pt: {"model": state dict, ...}),
    or a checkpoint of models/train/train_dialogue.py (same layout + "config");
  * a pickled module (torch.save(model): EqHard-EM's epoch_*.pt / best_*.pt of
    MultiAdapterT5 or MultiDecoderT5, or a T5ForConditionalGeneration = phase 1).
    transformers and EqHard-EM's classes are not needed: unknown classes are
    unpickled as stand-ins (nn.Module / plain objects), enough to read the state
    dict and the T5Config attributes;
  * a bare state dict.

Name mapping (state dict -> model.safetensors; the model directory keeps HF /
EqHard-EM names, see models/train/README_dialogue.md):
  shared.weight, encoder.*, decoder.* (incl. decoder.block.{i}.layer.{j}.adapters.{k}.{o2i,i2o}.*),
  decoders.{k}.* (MultiDecoderT5), lm_head.weight     -> same names
  encoder.embed_tokens.weight, decoder.embed_tokens.weight   dropped (aliases of shared.weight;
                                                      checked equal)
  lm_head.weight with tie_word_embeddings                  dropped (alias of shared.weight; checked)
  *.EncDecAttention.relative_attention_bias.weight          dropped (HF never uses it)
  decoders.{k}.embed_tokens.weight                          kept, rows cut to vocab_size
                                                      (MultiDecoderT5 deep-copies the decoder, so each
                                                      copy has its own input embedding; after
                                                      resize_token_embeddings decoder 0's is shared.weight)
  plain T5 (no adapters, no decoders.*)                     adapter model with K = 1 and zero adapters
                                                      (the same function)

config.json: T5Config attributes (from the pickled module, --config, or the
checkpoint's "config"), shapes where missing, then "architecture":
"t5_multidecoder", "num_modes", "multidecoder", "adapter_hidden_size" and the
dialogue input keys (EqHard-EM defaults: turns joined with a space, no
truncation, as its generate()). The tensors are loaded into
models/train/t5md_ref.T5MultiDecoder (strict) before writing, so a directory
that converts is one the reference loads.
"""

import argparse
import io
import json
import os
import pickle
import re
import sys
import types

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import t5md_ref as R  # noqa: E402

T5_KEYS = ["vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
           "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
           "feed_forward_proj", "tie_word_embeddings", "pad_token_id", "eos_token_id",
           "decoder_start_token_id", "num_modes", "adapter_hidden_size"]
DIALOGUE_KEYS = ["turn_separator", "max_context_turns", "max_source_length", "max_target_length"]
EQHARD_DIALOGUE = dict(turn_separator="", max_context_turns=0, max_source_length=0, max_target_length=64)


def die(msg):
    print("eqhard_t5: " + msg, file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------ loading without transformers

class _StubObject:
    """Stand-in for a pickled non-module object (T5Config, GenerationConfig, ...)."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class _StubModule(nn.Module):
    """Stand-in for a pickled nn.Module subclass whose class is not importable."""

    def forward(self, *a, **k):
        raise RuntimeError("stand-in module of an unpickled class")


_STUBS = {}


def _stub(module, name):
    key = (module, name)
    if key not in _STUBS:
        objectish = name.endswith("Config") or "configuration" in module or name.endswith("Output")
        base = _StubObject if objectish else _StubModule
        _STUBS[key] = type(name, (base,), {"__module__": "eqhard_stub." + module})
    return _STUBS[key]


class StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError, ModuleNotFoundError):
            return _stub(module, name)


def _stub_pickle_module():
    m = types.ModuleType("eqhard_stub_pickle")
    m.__dict__.update({k: v for k, v in pickle.__dict__.items() if not k.startswith("__")})
    m.Unpickler = StubUnpickler
    m.load = lambda f, **kw: StubUnpickler(f, **kw).load()
    m.loads = lambda b, **kw: StubUnpickler(io.BytesIO(b), **kw).load()
    m.__name__ = "eqhard_stub_pickle"
    return m


def load_checkpoint(path):
    pm = _stub_pickle_module()
    # Debian's torch 1.13 load() ignores pickle_module (it re-binds it to the module
    # global `pickle`): swap that global for the duration of the call.
    import torch.serialization as ts
    saved = ts.pickle
    ts.pickle = pm
    try:
        return torch.load(path, map_location="cpu", pickle_module=pm)
    finally:
        ts.pickle = saved


def _config_dict(obj):
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict") and not isinstance(obj, _StubObject):
        try:
            return dict(obj.to_dict())
        except Exception:  # noqa: BLE001
            pass
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def extract(obj):
    """(state dict, config dict) from whatever the checkpoint holds."""
    cfg = {}
    if isinstance(obj, dict) and "model" in obj:
        cfg.update(_config_dict(obj.get("config")))
        obj = obj["model"]
    if isinstance(obj, nn.Module):
        cfg = {**_config_dict(getattr(obj, "config", None)), **cfg}
        if getattr(obj, "num_modes", None) is not None:
            cfg.setdefault("num_modes", int(obj.num_modes))
        sd = obj.state_dict()
    elif isinstance(obj, dict):
        sd = obj
    else:
        die("cannot read a state dict from a %s" % type(obj).__name__)
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    return sd, cfg


# ------------------------------------------------------------------ mapping

def infer_config(sd):
    """What the shapes say (used for every key the configs leave out)."""
    c = {}
    if "shared.weight" not in sd:
        die("no shared.weight: not a T5 state dict")
    V, d = sd["shared.weight"].shape
    c.update(vocab_size=int(V), d_model=int(d))
    enc = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.block\.(\d+)\.", k)] if m}
    c["num_layers"] = max(enc) + 1 if enc else 0
    dec = {int(m.group(1)) for k in sd for m in [re.match(r"(?:decoder|decoders\.\d+)\.block\.(\d+)\.", k)] if m}
    c["num_decoder_layers"] = max(dec) + 1 if dec else 0
    rb = sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if rb is not None:
        c["relative_attention_num_buckets"], c["num_heads"] = int(rb.shape[0]), int(rb.shape[1])
        c["d_kv"] = int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // c["num_heads"]
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd:
        c["feed_forward_proj"] = "gated-gelu"
        c["d_ff"] = int(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0])
    elif "encoder.block.0.layer.1.DenseReluDense.wi.weight" in sd:
        c["feed_forward_proj"] = "relu"
        c["d_ff"] = int(sd["encoder.block.0.layer.1.DenseReluDense.wi.weight"].shape[0])
    if any(k.startswith("decoders.") for k in sd):
        c["multidecoder"] = "transformer"
        c["num_modes"] = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoders."))
    else:
        ad = [k for k in sd if ".adapters." in k]
        if ad:
            c["multidecoder"] = "adapter"
            c["num_modes"] = 1 + max(int(re.search(r"\.adapters\.(\d+)\.", k).group(1)) for k in ad)
            c["adapter_hidden_size"] = int(sd[next(k for k in ad if k.endswith("o2i.weight"))].shape[0])
        else:
            c["multidecoder"] = "none"
            c["num_modes"] = 1
    if "lm_head.weight" in sd:
        lm = sd["lm_head.weight"]
        c["tie_word_embeddings"] = bool(lm.shape == sd["shared.weight"].shape and torch.equal(lm, sd["shared.weight"]))
    return c


def map_state(sd, cfg):
    """Model-directory tensors for t5md_ref.T5MultiDecoder(cfg) (see the module docstring)."""
    shared = sd["shared.weight"]
    V = shared.shape[0]
    out = {}
    for k, v in sd.items():
        if k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if not torch.equal(v[:V], shared):
                die("%s differs from shared.weight (an untied input embedding is not representable)" % k)
            continue
        if k == "lm_head.weight" and cfg["tie_word_embeddings"]:
            if not torch.equal(v[:V], shared):
                die("lm_head.weight differs from shared.weight but tie_word_embeddings is true")
            continue
        if k.endswith("EncDecAttention.relative_attention_bias.weight"):
            continue
        if re.fullmatch(r"decoders\.\d+\.embed_tokens\.weight", k) or k == "lm_head.weight":
            v = v[:V]
        out[k] = v.float()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("outdir")
    p.add_argument("--spm", help="SentencePiece model with T5 ids (default: spm.model beside the checkpoint)")
    p.add_argument("--config", help="HF config.json (T5Config) to use for missing hyper-parameters")
    p.add_argument("--num-modes", type=int)
    p.add_argument("--decoder", choices=["adapter", "transformer"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--turn-separator")
    p.add_argument("--max-context-turns", type=int)
    p.add_argument("--max-source-length", type=int)
    p.add_argument("--max-target-length", type=int)
    a = p.parse_args(argv)

    sd, ck_cfg = extract(load_checkpoint(a.checkpoint))
    cfg = infer_config(sd)
    shape_kind = cfg["multidecoder"]
    if a.config:
        with open(a.config) as f:
            cfg.update({k: v for k, v in json.load(f).items() if k in T5_KEYS + DIALOGUE_KEYS})
    cfg.update({k: v for k, v in ck_cfg.items() if k in T5_KEYS + DIALOGUE_KEYS and v is not None})
    ours = "turn_separator" in ck_cfg
    for k, v in EQHARD_DIALOGUE.items():
        cfg.setdefault(k, v)
    for k in DIALOGUE_KEYS:
        v = getattr(a, k)
        if v is not None:
            cfg[k] = v
    cfg["vocab_size"] = int(sd["shared.weight"].shape[0])
    cfg["multidecoder"] = shape_kind
    if a.decoder and shape_kind != "none" and a.decoder != shape_kind:
        die("--decoder %s but the state dict is a %s model" % (a.decoder, shape_kind))
    if shape_kind != "none":
        cfg["num_modes"] = infer_config(sd)["num_modes"]
        if a.num_modes and a.num_modes != cfg["num_modes"]:
            die("--num-modes %d but the state dict has %d decoders" % (a.num_modes, cfg["num_modes"]))
    if cfg.get("relative_attention_max_distance") is None:
        cfg["relative_attention_max_distance"] = 128  # transformers before 4.13 hard-coded it
    cfg = R.make_config(cfg, dropout_rate=0.0)

    tensors = map_state(sd, cfg)
    model = R.T5MultiDecoder(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        die("state dict does not match the configuration: %s" % e)
    model.eval()

    spm = a.spm
    if spm is None:
        cand = os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), "spm.model")
        spm = cand if os.path.exists(cand) else None
    if spm is None:
        die("no SentencePiece model: pass --spm")
    tok = R.Tokenizer.from_config(spm, cfg)  # checks T5 ids and the separator piece
    if len(tok) > cfg["vocab_size"]:
        die("spm has %d pieces, the model only %d rows" % (len(tok), cfg["vocab_size"]))
    conf = R.save_model_dir(model, a.outdir, spm, dtype="F32" if a.dtype == "fp32" else "BF16")
    print("eqhard_t5: %s -> %s: %s, K=%d, d_model %d, %d+%d layers, vocab %d (%s checkpoint)" % (
        a.checkpoint, a.outdir, conf["multidecoder"], conf["num_modes"], conf["d_model"], conf["num_layers"],
        conf["num_decoder_layers"], conf["vocab_size"], "nzserve" if ours else "EqHard-EM"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
