"""PyTorch parity of the engine's layers (engine/nz_layer.h, engine/nz_ops.h).

For every case of parity_ref.all_cases() (embeddings and positions, T5
position bias, norms, self/causal/incremental/cross attention, FFNs, adapter,
fairseq encoder/decoder layers, T5 encoder/decoder blocks, output projection
with log-softmax/argmax/top-k) the test writes a model directory with random
bf16-representable weights, packs it with $NZP in each weight mode, runs
$PARITY_RUNNER (tests/parity_runner.c) on it with several tile-cache budgets
and thread counts, and compares every output with PyTorch's:

  weight modes (all with --raw-below 0 --tile-rows 16, so that every 2-D
  tensor goes through the codec in several tiles; 1-D tensors are always
  stored raw by nzp):
    raw-f32        fp32 safetensors, --mode raw (uncompressed)
    lossless-f32   fp32 safetensors, --mode lossless (fp32 exponent+mantissa planes)
    lossless-bf16  bf16 safetensors, --mode lossless (the weights are bf16-representable)
    bf16-f32       fp32 safetensors, --mode bf16 (rounding to bf16 is exact here)
    lossy-3        fp32 safetensors, --mode lossy-3: the expected outputs are
                   recomputed in PyTorch from the lossy weights, taken from
                   `nzp unpack` and checked bit for bit against
                   parity_ref.round_mantissa (the rounding nz_codec.h documents)
  runs: --cache 0 (decode on every use), --cache 64 MiB --threads 2 (every
  tile decoded once, matmuls split across 2 threads), --cache 12 KiB (a few
  tiles, evictions).

Tolerances: fp32 outputs max |engine - torch| <= 1e-4 (ATOL), everywhere: the
values compared are at most ~15 in magnitude (logits, log-probabilities; block
outputs ~6) and sums run over at most 128 terms, so fp32 rounding differences
stay near 1e-6 (observed max 1.8e-6) and no relative tolerance is needed. Integer outputs (positions, buckets) must be equal.
Indices (argmax, top-k) must equal torch's except where torch's scores at the
two indices tie within TIE (1e-6).

NZ_TEST_QUICK=1 (or NZP_REAL set, i.e. `make valgrind`, where nzp runs under
valgrind) reduces the modes to lossless-bf16 and the runs to the first two.
PARITY_REPORT=path writes the max error per case/mode/run as JSON.
"""

import json
import os
import subprocess

import numpy as np
import pytest

from st_util import bf16_bits_to_f32, read_arrays

try:
    import torch

    import parity_ref as P
except ImportError as e:  # pragma: no cover - CI installs python3-torch
    torch = None
    P = None
    TORCH_ERROR = str(e)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

ATOL = 1e-4
TIE = 1e-6

MODES = {
    "raw-f32": ("F32", ["--mode", "raw"]),
    "lossless-f32": ("F32", ["--mode", "lossless"]),
    "lossless-bf16": ("BF16", ["--mode", "lossless"]),
    "bf16-f32": ("F32", ["--mode", "bf16"]),
    "lossy-3": ("F32", ["--mode", "lossy-3"]),
}
PACK_ARGS = ["--raw-below", "0", "--tile-rows", "16"]
RUNS = [
    ("cache0", ["--cache", "0"]),
    ("cachefull-t2", ["--cache", str(64 << 20), "--threads", "2"]),
    ("cache12k", ["--cache", str(12 << 10)]),
]


def quick():
    q = os.environ.get("NZ_TEST_QUICK", "")
    return (q not in ("", "0")) or bool(os.environ.get("NZP_REAL"))


ACTIVE_MODES = ["lossless-bf16"] if quick() else list(MODES)
ACTIVE_RUNS = RUNS[:2] if quick() else RUNS

CASE_NAMES = [c.name for c in P.all_cases()] if P else ["torch-missing"]

REPORT = []


def require_torch():
    if torch is None:
        pytest.fail(f"PyTorch is required for the parity tests ({TORCH_ERROR}); "
                    "install it (Debian: apt-get install python3-torch, see .ci/deps.sh)")


@pytest.fixture(scope="session")
def runner():
    path = os.environ.get("PARITY_RUNNER", os.path.join(REPO, "build", "parity_runner"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"parity runner not found at {path}: run `make build/parity_runner` first")
    return path


@pytest.fixture(scope="session")
def cases():
    require_torch()
    return {c.name: c for c in P.all_cases()}


@pytest.fixture(scope="session", autouse=True)
def report():
    yield
    path = os.environ.get("PARITY_REPORT")
    if path and REPORT:
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=1)


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def to_torch(dtype, arr):
    if dtype == "BF16":
        return torch.from_numpy(bf16_bits_to_f32(arr).copy())
    return torch.from_numpy(np.array(arr))


def check_index(name, got, want, scores):
    """got/want [... x k] (or [...]) indices; scores [... x V] torch's scores."""
    g = got.reshape(-1, got.shape[-1] if got.dim() > scores.dim() - 1 else 1)
    w = want.reshape(g.shape)
    s = scores.reshape(g.shape[0], -1)
    for row in range(g.shape[0]):
        assert len(set(g[row].tolist())) == g.shape[1], f"{name} row {row}: repeated indices {g[row].tolist()}"
        for j in range(g.shape[1]):
            a, b = int(g[row, j]), int(w[row, j])
            if a != b:
                gap = abs(float(s[row, a]) - float(s[row, b]))
                assert gap <= TIE, (f"{name} row {row} position {j}: engine {a} (torch score {float(s[row, a]):.8g}) "
                                    f"vs torch {b} ({float(s[row, b]):.8g}), not a tie (gap {gap:.3g})")


def compare(case, got, want, label):
    """Every expected output present with the right shape and within tolerance;
    returns {output: max abs error}."""
    assert set(got) == set(want), f"{label}: outputs {sorted(got)} != expected {sorted(want)}"
    errs = {}
    for name, w in want.items():
        dtype, arr = got[name]
        g = to_torch(dtype, arr)
        assert tuple(g.shape) == tuple(w.shape), f"{label} {name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if name in case.tie:
            check_index(f"{label} {name}", g.long(), w.long(), want[case.tie[name]])
        elif not w.is_floating_point():
            bad = (g.long() != w.long()).nonzero()
            assert bad.numel() == 0, (f"{label} {name}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: "
                                      f"engine {int(g.long()[tuple(bad[0])])} torch {int(w[tuple(bad[0])])}")
        else:
            assert torch.isfinite(g).all(), f"{label} {name}: non-finite values"
            err = (g.float() - w).abs()
            m = float(err.max()) if err.numel() else 0.0
            errs[name] = m
            if m > ATOL:
                at = tuple(int(i) for i in (err == err.max()).nonzero()[0])
                raise AssertionError(f"{label} {name}: max abs error {m:.3g} > {ATOL} at {at}: engine "
                                     f"{float(g[at]):.8g} torch {float(w[at]):.8g}")
    return errs


def pack(nzp, case, mode, workdir):
    dtype, args = MODES[mode]
    mdir = workdir / "model"
    P.write_model_dir(case, mdir, dtype)
    out = workdir / f"{mode}.nzp"
    run([nzp, "pack", *args, *PACK_ARGS, mdir, out])
    return out


@pytest.mark.parametrize("mode", ACTIVE_MODES)
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_parity(nzp, runner, cases, tmp_path, case_name, mode):
    case = cases[case_name]
    model = pack(nzp, case, mode, tmp_path)
    if not quick():  # every 2-D tensor went through the codec in the requested mode, in tiles of 16 rows
        info = json.loads(run([nzp, "info", "--json", model]).stdout)
        want_mode = MODES[mode][1][1]
        for t in info["tensors"]:
            w = case.weights[t["name"]]
            if w.dim() >= 2:
                assert t["mode"] == want_mode, f"{t['name']} stored {t['mode']}"
                assert t["tiles"] == -(-w.shape[0] // 16)
            else:
                assert t["mode"] == "raw"
    W = None
    if mode.startswith("lossy-"):
        k = int(mode.split("-")[1])
        back = tmp_path / "unpacked.safetensors"
        run([nzp, "unpack", model, back])
        tensors, _ = read_arrays(back)
        W = {n: to_torch(d, a).float() for n, (d, a) in tensors.items()}
        mine = P.lossy_weights(case.weights, k)
        assert set(W) == set(mine)
        for n in W:
            same = torch.equal(W[n].view(torch.int32), mine[n].view(torch.int32))
            assert same, f"{n}: unpacked lossy-{k} weights differ from round_mantissa(., {k})"
            if W[n].dim() >= 2:
                assert not torch.equal(W[n], case.weights[n]) or W[n].numel() < 8, f"{n}: lossy-{k} changed nothing"
    want = case.expected(W)
    inputs = tmp_path / "inputs.safetensors"
    P.write_inputs(case, inputs, want)
    for run_name, args in ACTIVE_RUNS:
        out = tmp_path / f"out-{run_name}.safetensors"
        p = run([runner, model, inputs, out, *args])
        stats = json.loads(p.stdout.strip().splitlines()[-1])
        if run_name == "cache0":
            assert stats["peak_bytes"] == 0, stats
        if run_name == "cachefull-t2":
            assert stats["uncached"] == 0 and stats["evictions"] == 0, stats
        got, _ = read_arrays(out)
        errs = compare(case, got, want, f"{case_name} [{mode}, {run_name}]")
        REPORT.append({"case": case_name, "mode": mode, "run": run_name, "max_abs": errs, "cache": stats})


def test_runner_reports_errors(nzp, runner, cases, tmp_path):
    """Bad inputs are refused with a message and exit status 1."""
    case = cases["ffn_relu"]
    model = pack(nzp, case, "raw-f32", tmp_path)
    inputs = tmp_path / "inputs.safetensors"
    P.write_inputs(case, inputs)
    p = subprocess.run([runner, model, tmp_path / "missing.safetensors", tmp_path / "o.safetensors"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "missing.safetensors" in p.stderr
    bad = P.Case("bad", case.config, case.weights, {"x": torch.zeros(2, 3, 7)}, case.compute)
    P.write_inputs(bad, inputs, {})
    p = subprocess.run([runner, model, inputs, tmp_path / "o.safetensors"], capture_output=True, text=True)
    assert p.returncode == 1 and "x is not 32 wide" in p.stderr
    p = subprocess.run([runner, model], capture_output=True, text=True)
    assert p.returncode == 1 and "usage" in p.stderr
    # an engine error (token id outside the vocabulary) comes back as a message
    case = cases["embed_learned"]
    model = pack(nzp, case, "lossless-bf16", tmp_path)
    tok = case.inputs["tokens"].clone()
    tok[1, 4] = 150  # V = 150
    bad = P.Case("bad", case.config, case.weights, dict(case.inputs, tokens=tok), case.compute)
    P.write_inputs(bad, inputs, {})
    p = subprocess.run([runner, model, inputs, tmp_path / "o.safetensors"], capture_output=True, text=True)
    assert p.returncode == 1 and "150" in p.stderr, p.stderr


# ------------------------------------------------------------- the references themselves


def test_reference_matches_torch_builtins():
    """The hand-written references agree with PyTorch's own modules where
    those implement the same definition."""
    require_torch()
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 32, generator=g)
    ln = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_(generator=g)
        ln.bias.normal_(generator=g)
        assert torch.allclose(P.layer_norm(x, ln.weight, ln.bias, 1e-5), ln(x), atol=1e-5)
        assert torch.allclose(P.gelu(x), F.gelu(x), atol=1e-6)
        assert torch.allclose(P.gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-6)
    # lossy-7 is bf16 rounding; ties and carries included
    v = torch.randn(10000, generator=g)
    v[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(2.0 - 2**-9), 3.0])
    assert torch.equal(P.round_mantissa(v, 7), v.bfloat16().float())
    assert P.round_mantissa(torch.tensor([3.0, 6.0, 5.0, 1.75]), 0).tolist() == [2.0, 8.0, 4.0, 2.0]
    assert P.round_mantissa(torch.tensor([1.0625, 1.1875, 1.09375]), 3).tolist() == [1.0, 1.25, 1.125]
    # T5 buckets, by hand from the definition (32 buckets, max distance 128)
    # (16: log(16/8)/log(128/8)*8 is exactly 2 and stays 2.0 in fp32)
    rel = torch.tensor([0, 1, -1, 7, 8, -8, 200, -200, 15, 16])
    assert P.t5_bucket(rel, True, 32, 128).tolist() == [0, 17, 1, 23, 24, 8, 31, 15, 25, 26]
    assert P.t5_bucket(-rel, False, 32, 128).tolist()[:4] == [0, 1, 0, 7]  # only keys before the query
    # fairseq positions: pads keep padding_idx, others count from padding_idx + 1
    tok = torch.tensor([[1, 1, 5, 6], [7, 8, 1, 1]])
    assert P.make_positions(tok, 1).tolist() == [[1, 1, 2, 3], [2, 3, 1, 1]]


@pytest.mark.parametrize("pre_norm", [False, True])
def test_reference_layer_matches_torch_transformer_layer(cases, pre_norm):
    """parity_ref.fairseq_layer == torch.nn.TransformerEncoderLayer (same
    post-/pre-norm definition; fairseq's q scaling after the bias is what
    torch's multi_head_attention_forward does too)."""
    case = cases["fairseq_enc_prenorm_adapter" if pre_norm else "fairseq_enc_postnorm"]
    W, cfg, I = case.weights, dict(case.config, adapter=False), case.inputs
    p, D = cfg["prefix"], cfg["d_model"]
    F_ = W[p + "fc1.weight"].shape[0]
    layer = torch.nn.TransformerEncoderLayer(D, cfg["heads"], F_, dropout=0.0, activation=cfg["act"],
                                             layer_norm_eps=cfg["eps"], batch_first=True, norm_first=pre_norm)
    sa = p + "self_attn."
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(torch.cat([W[sa + n + ".weight"] for n in ("q_proj", "k_proj", "v_proj")]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([W[sa + n + ".bias"] for n in ("q_proj", "k_proj", "v_proj")]))
        layer.self_attn.out_proj.weight.copy_(W[sa + "out_proj.weight"])
        layer.self_attn.out_proj.bias.copy_(W[sa + "out_proj.bias"])
        for mod, n in ((layer.linear1, "fc1"), (layer.linear2, "fc2"), (layer.norm1, "self_attn_layer_norm"),
                       (layer.norm2, "final_layer_norm")):
            mod.weight.copy_(W[p + n + ".weight"])
            mod.bias.copy_(W[p + n + ".bias"])
        layer.train()  # the plain (non fast-path) implementation; dropout is 0
        want = layer(I["x"], src_key_padding_mask=I["pad"].bool())
        got = P.fairseq_layer(W, cfg, I["x"], I["pad"])
    assert float((got - want).abs().max()) < 1e-5
