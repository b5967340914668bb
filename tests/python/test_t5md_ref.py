"""Self-consistency tests of the EqHard-EM multi-decoder T5 reference
(models/train/t5md_ref.py), its training script and its converter.

Tiny models only (d_model 16-32); the whole file runs in well under a minute on
one CPU thread. What is pinned: incremental decoding with a KV cache (and beam
reorders) == the full forward; K decoders batched == each decoder alone;
beam 1 == greedy; the sampling contract (seeded, reproducible, temperature 0 ==
greedy, the Python sampler == engine/nz_ops.c's nz_sample bit for bit); zero
adapters == a plain T5; the T5 blocks == tests/python/parity_ref.py (what the
engine's parity tests use); model directory round trips; train -> checkpoint
-> converter == --export; exact --resume; the EqHard equal-size assignment.
"""

import copy
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "train"))
sys.path.insert(0, os.path.join(REPO, "models", "convert"))

import t5md_ref as R  # noqa: E402

torch.set_num_threads(1)


def tiny_config(**kw):
    c = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, num_modes=3,
             adapter_hidden_size=6, dropout_rate=0.0, multidecoder="adapter")
    c.update(kw)
    return R.make_config(c)


def tiny_model(seed=0, scramble_adapters=True, **kw):
    m = R.T5MultiDecoder(tiny_config(**kw))
    R.init_weights(m, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        # T5 init gives logits of a few units: sharpen the lm so decodes are not all ties
        m.shared.weight.mul_(2.0)
        if scramble_adapters:
            for n, p in m.named_parameters():
                if ".adapters." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if m.kind == "transformer":  # make the copies differ
            for n, p in m.named_parameters():
                if n.startswith("decoders."):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


SOURCES = [[5, 9, 13, 7, 21, 1], [30, 4, 1], [11, 12, 13, 14, 15, 16, 17, 18, 19, 1]]

VARIANTS = [dict(multidecoder="adapter"), dict(multidecoder="transformer"),
            dict(multidecoder="adapter", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            dict(multidecoder="none")]


# ------------------------------------------------------------------ incremental == full


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_incremental_kv_cache_equals_full_forward(variant):
    m = tiny_model(1, **variant)
    K = m.num_modes
    B = len(SOURCES)
    src, pad = R.pad_batch(SOURCES)
    enc = m.encode(src, pad)
    decs = list(range(K))[::-1]  # groups in a non-trivial order
    N = B * len(decs)
    row_src = torch.arange(B).repeat(len(decs))
    groups = [(k, j * B, (j + 1) * B) for j, k in enumerate(decs)]
    g = torch.Generator().manual_seed(5)
    T = 7
    toks = torch.randint(3, 40, (N, T), generator=g)
    toks[:, 0] = R.DECODER_START
    with torch.no_grad():
        full = m.decode(toks, m.init_state(enc, pad, row_src, groups, use_cache=False))
        # one token at a time
        st = m.init_state(enc, pad, row_src, groups)
        steps = torch.cat([m.decode(toks[:, t:t + 1], st) for t in range(T)], dim=1)
        # chunks of 3, 1, 3
        st = m.init_state(enc, pad, row_src, groups)
        chunks = torch.cat([m.decode(toks[:, a:b], st) for a, b in ((0, 3), (3, 4), (4, 7))], dim=1)
        # each row alone (its own decoder, its own source, no padding)
        alone = []
        for j, k in enumerate(decs):
            for b in range(B):
                s1, p1 = R.pad_batch([SOURCES[b]])
                st1 = m.init_state(m.encode(s1, p1), p1, [0], [(k, 0, 1)], use_cache=False)
                alone.append(m.decode(toks[j * B + b:j * B + b + 1], st1))
        alone = torch.cat(alone)
    assert torch.allclose(steps, full, atol=2e-5, rtol=1e-5)
    assert torch.allclose(chunks, full, atol=2e-5, rtol=1e-5)
    assert torch.allclose(alone, full, atol=2e-5, rtol=1e-5)
    if K > 1:  # the decoders really differ
        assert (full[:B] - full[B:2 * B]).abs().max() > 1e-3


def test_beam_reorder_of_the_cache_equals_full_forward():
    m = tiny_model(2)
    B, K = 2, 3
    src, pad = R.pad_batch(SOURCES[:B])
    enc = m.encode(src, pad)
    R_ = 2  # rows per (decoder, source), like beams
    N = K * B * R_
    row_src = torch.arange(B).repeat_interleave(R_).repeat(K)
    groups = [(k, k * B * R_, (k + 1) * B * R_) for k in range(K)]
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(3, 40, (N, 6), generator=g)
    toks[:, 0] = R.DECODER_START
    # after 3 tokens every row continues from its sibling beam's prefix
    perm = torch.arange(N).view(-1, R_).flip(1).reshape(-1)
    with torch.no_grad():
        st = m.init_state(enc, pad, row_src, groups)
        m.decode(toks[:, :3], st)
        st.reorder(perm)
        tail = m.decode(toks[:, 3:], st)
        seq = torch.cat([toks[perm, :3], toks[:, 3:]], dim=1)
        full = m.decode(seq, m.init_state(enc, pad, row_src, groups, use_cache=False))[:, 3:]
    assert torch.allclose(tail, full, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ batched == alone


def _tokens(res):
    return [[r["tokens"] for r in row] for row in res]


@pytest.mark.parametrize("kind", ["adapter", "transformer"])
def test_decoders_batched_equal_each_alone(kind):
    m = tiny_model(3, multidecoder=kind)
    K = m.num_modes
    decs = [2, 0, 1]
    g = R.greedy(m, SOURCES, decs, max_new_tokens=12)
    bm = R.beam(m, SOURCES, decs, beam_size=3, max_new_tokens=12, num_return=2)
    sm = R.sample(m, SOURCES, decs, temperature=1.0, top_k=10, top_p=0.9, seed=7, max_new_tokens=12)
    for b, s in enumerate(SOURCES):
        for j, k in enumerate(decs):
            g1 = R.greedy(m, [s], [k], max_new_tokens=12)[0][0]
            assert g[b][j]["decoder"] == k and g[b][j]["tokens"] == g1["tokens"]
            assert np.allclose(g[b][j]["token_logprobs"], g1["token_logprobs"], atol=1e-5)
            b1 = R.beam(m, [s], [k], beam_size=3, max_new_tokens=12, num_return=2)[0][0]
            assert [h["tokens"] for h in bm[b][j]] == [h["tokens"] for h in b1]
            assert np.allclose([h["beam_score"] for h in bm[b][j]], [h["beam_score"] for h in b1], atol=1e-5)
            s1 = R.sample(m, [s], [k], temperature=1.0, top_k=10, top_p=0.9, seed=7, max_new_tokens=12)[0][0]
            assert sm[b][j]["tokens"] == s1["tokens"]
    # the decoders do not all say the same thing (the test would be vacuous otherwise)
    assert len({tuple(r["tokens"]) for row in g for r in row}) > K
    # greedy's token log-probs are those of a teacher-forced pass
    r0 = g[0][0]
    sc = R.score_responses(m, SOURCES[0], [r0["tokens"]], [r0["decoder"]])[0][0]
    assert np.allclose(sc["token_logprobs"], r0["token_logprobs"], atol=1e-5)


def test_greedy_contract_details():
    m = tiny_model(4)
    out = R.greedy(m, SOURCES, None, max_new_tokens=9)
    for row in out:
        for r in row:
            assert 1 <= len(r["tokens"]) <= 9
            assert R.UNK not in r["tokens"]  # bad_words_ids=[[unk]]
            assert r["finished"] == (r["tokens"][-1] == R.EOS)
            assert R.EOS not in r["tokens"][:-1]
            assert r["mean_logprob"] == pytest.approx(sum(r["token_logprobs"]) / len(r["tokens"]))
    # with unk allowed the unk-masked argmax is what changed, nothing else
    m2 = tiny_model(4)
    bump = torch.zeros(40)
    bump[R.UNK] = 50.0  # make unk the argmax everywhere
    m2.lm_logits = lambda h, f=m2.lm_logits: f(h) + bump
    assert any(R.UNK in r["tokens"] for row in R.greedy(m2, SOURCES, None, 9, ban_unk=False) for r in row)
    assert not any(R.UNK in r["tokens"] for row in R.greedy(m2, SOURCES, None, 9) for r in row)


# ------------------------------------------------------------------ beam


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam1_equals_greedy(seed):
    m = tiny_model(10 + seed, multidecoder="adapter" if seed != 1 else "transformer")
    g = R.greedy(m, SOURCES, None, max_new_tokens=15)
    b = R.beam(m, SOURCES, None, beam_size=1, max_new_tokens=15)
    for gr, br in zip(g, b):
        for x, y in zip(gr, br):
            assert x["tokens"] == y[0]["tokens"]
            # greedy scores renormalise without unk (EqHard generate()), beam sums HF's
            # log_softmax-then-mask values: the same tokens, greedy's sum is a bit higher
            assert x["sum_logprob"] >= y[0]["sum_logprob"] - 1e-5
            n = len(y[0]["tokens"]) + (0 if y[0]["finished"] else 1)
            assert y[0]["beam_score"] == pytest.approx(y[0]["sum_logprob"] / n, abs=1e-4)


def test_beam_scores_follow_hf_length_convention():
    m = tiny_model(5)
    res = R.beam(m, SOURCES, None, beam_size=4, max_new_tokens=6, num_return=4, length_penalty=1.3)
    for row in res:
        for hyps in row:
            scores = [h["beam_score"] for h in hyps]
            assert scores == sorted(scores, reverse=True)
            for h in hyps:
                # HF: sum / len**lp, len = generated tokens before eos + 1 (start token);
                # for beams cut at max_length len = 1 + max_new_tokens
                n = len(h["tokens"]) if h["finished"] else len(h["tokens"]) + 1
                assert h["beam_score"] == pytest.approx(h["sum_logprob"] / n ** 1.3, abs=1e-4)
                assert h["finished"] or len(h["tokens"]) == 6


# ------------------------------------------------------------------ sampling


def test_sampling_seeded_and_temperature_zero_is_greedy():
    m = tiny_model(6)
    kw = dict(top_k=0, top_p=1.0, max_new_tokens=10)
    a = R.sample(m, SOURCES, None, temperature=1.0, seed=11, **kw)
    b = R.sample(m, SOURCES, None, temperature=1.0, seed=11, **kw)
    c = R.sample(m, SOURCES, None, temperature=1.0, seed=12, **kw)
    assert _tokens(a) == _tokens(b)
    assert _tokens(a) != _tokens(c)
    g = _tokens(R.greedy(m, SOURCES, None, max_new_tokens=10))
    assert _tokens(R.sample(m, SOURCES, None, temperature=0.0, seed=11, **kw)) == g
    assert _tokens(R.sample(m, SOURCES, None, temperature=1e-6, seed=11, **kw)) == g
    assert _tokens(R.sample(m, SOURCES, None, temperature=1.0, seed=11, top_k=1, top_p=1.0,
                            max_new_tokens=10)) == g
    # per-source seeds: a list of seeds == each source alone with its seed
    s = R.sample(m, SOURCES, [1], temperature=1.0, seed=[3, 4, 5], **kw)
    for i, src in enumerate(SOURCES):
        assert s[i][0]["tokens"] == R.sample(m, [src], [1], temperature=1.0, seed=3 + i, **kw)[0][0]["tokens"]


def test_rng_stream_known_values():
    # splitmix64-seeded xoshiro256** (Vigna's reference): pinned so a change is caught
    r = R.NzRng(0)
    assert [r.next() for _ in range(3)] == [0x99EC5F36CB75F2B4, 0xBF6E1F784956452A, 0x1A5F849D4933E6E0]
    assert R.row_seed(5, 0) == 5 and R.row_seed(5, 1) == 5 ^ R.GOLDEN64


def _nzops_lib(tmp_path):
    """engine/nz_ops.c built as a shared library (None when no C compiler/BLAS)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    so = str(tmp_path / "nzops.so")
    srcs = [os.path.join(REPO, "engine", f) for f in ("nz_ops.c", "nz_common.c", "nz_guard.c")]
    for blas in ("-lopenblas", "-lblas"):
        r = subprocess.run([cc, "-O2", "-std=c11", "-D_GNU_SOURCE", "-shared", "-fPIC",
                            "-I" + os.path.join(REPO, "engine"), *srcs, "-o", so, blas, "-lm", "-lpthread"],
                           capture_output=True)
        if r.returncode == 0:
            return ctypes.CDLL(so)
    return None


def test_sampler_matches_engine_nz_sample(tmp_path):
    lib = _nzops_lib(tmp_path)
    if lib is None:
        pytest.skip("cannot build engine/nz_ops.c here")

    class Rng(ctypes.Structure):
        _fields_ = [("s", ctypes.c_uint64 * 4)]

    class Smp(ctypes.Structure):
        _fields_ = [("temperature", ctypes.c_float), ("top_k", ctypes.c_uint32), ("top_p", ctypes.c_float)]
    lib.nz_rng_seed.argtypes = [ctypes.POINTER(Rng), ctypes.c_uint64]
    lib.nz_rng_next.restype = ctypes.c_uint64
    lib.nz_rng_next.argtypes = [ctypes.POINTER(Rng)]
    lib.nz_sample.restype = ctypes.c_uint32
    lib.nz_sample.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(Smp), ctypes.POINTER(Rng),
                              ctypes.c_void_p]
    cr = Rng()
    lib.nz_rng_seed(ctypes.byref(cr), 2024)
    pr = R.NzRng(2024)
    assert [lib.nz_rng_next(ctypes.byref(cr)) for _ in range(64)] == [pr.next() for _ in range(64)]
    rs = np.random.RandomState(0)
    n_draws = 0
    for trial in range(120):
        n = int(rs.choice([3, 17, 40, 300, 1200]))
        lg = (rs.randn(n) * rs.choice([0.5, 2.0, 8.0])).astype(np.float32)
        if trial % 3 == 0:
            lg[min(2, n - 1)] = -np.inf  # the banned unk
        if trial % 5 == 0:
            lg[rs.randint(n)] = lg[0]  # ties
        T = float(rs.choice([0.0, 0.3, 1.0, 1.7]))
        k = int(rs.choice([0, 1, 3, 10, 5000]))
        p = float(rs.choice([1.0, 0.95, 0.5, 0.05, 0.0]))
        seed = int(rs.randint(1 << 31))
        c_rng = Rng()
        lib.nz_rng_seed(ctypes.byref(c_rng), seed)
        py_rng = R.NzRng(seed)
        s = Smp(T, k, p)
        work = ctypes.create_string_buffer(n * 8)
        for _ in range(4):
            want = lib.nz_sample(lg.ctypes.data, n, ctypes.byref(s), ctypes.byref(c_rng), work)
            assert R.nz_sample(lg, T, k, p, py_rng) == want, (trial, n, T, k, p)
            n_draws += 1
        # the streams stayed in step (same number of draws)
        assert lib.nz_rng_next(ctypes.byref(c_rng)) == py_rng.next()
    assert n_draws == 480


# ------------------------------------------------------------------ adapters


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_zero_i2o_adapters_make_all_decoders_identical(ff):
    m = tiny_model(7, feed_forward_proj=ff)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".i2o." in n:
                p.zero_()
    src, pad = R.pad_batch(SOURCES)
    dec = torch.tensor([[0, 5, 6, 7, 8]] * len(SOURCES))
    with torch.no_grad():
        outs = [m(src, pad, dec, k) for k in range(m.num_modes)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    g = R.greedy(m, SOURCES, None, max_new_tokens=10)
    for row in g:
        assert all(r["tokens"] == row[0]["tokens"] for r in row)
    # ... and equal to the plain T5 with the same weights (adapter == identity, exactly)
    plain = R.T5MultiDecoder(dict(m.config, multidecoder="none")).eval()
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(".adapters." in k for k in unexpected)
    with torch.no_grad():
        assert torch.equal(plain(src, pad, dec, 0), outs[0])


def test_multi_from_single_adapter_init():
    """train_dialogue.py --adapter-init: "zero" starts every decoder as the phase-1 decoder exactly (the
    trainable down-projections keep their default init); "default" (EqHard-EM's) perturbs each decoder."""
    single = tiny_model(3, multidecoder="none", num_modes=1)
    src, pad = R.pad_batch(SOURCES)
    dec = torch.tensor([[0, 5, 6, 7, 8]] * len(SOURCES))
    with torch.no_grad():
        want = single(src, pad, dec, 0)
        zero = R.multi_from_single(single, 3, "adapter", 6, seed=4, adapter_init="zero").eval()
        for k in range(3):
            assert torch.equal(zero(src, pad, dec, k), want)
        o2i = [p for n, p in zero.named_parameters() if ".o2i.weight" in n]
        assert o2i and all(float(p.abs().sum()) > 0 for p in o2i)
        default = R.multi_from_single(single, 3, "adapter", 6, seed=4).eval()
        assert not torch.allclose(default(src, pad, dec, 0), want, atol=1e-3)
    with pytest.raises(ValueError, match="adapter_init"):
        R.multi_from_single(single, 3, "adapter", 6, adapter_init="small")


def test_adapter_placement_is_eqhard():
    """a_k is applied to each decoder sublayer output before the residual add (adapter_t5.py)."""
    m = tiny_model(8, num_decoder_layers=1)
    blk = m.decoder.block[0]
    x = torch.randn(2, 3, 16)
    enc = torch.randn(2, 4, 16)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    k = 1
    with torch.no_grad():
        m.shared.weight[10:13] = x[0]  # tokens whose embeddings are x
        m.shared.weight[20:23] = x[1]
        # by hand
        a = blk.layer[0].SelfAttention
        h = blk.layer[0].layer_norm(x)
        sp = lambda t: a.split(t)  # noqa: E731
        bias = a.compute_bias(3, 3, 0, False)
        causal = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
        y = x + blk.layer[0].adapters[k](a.attend(sp(a.q(h)), sp(a.k(h)), sp(a.v(h)), bias, causal))
        c = blk.layer[1].EncDecAttention
        h = blk.layer[1].layer_norm(y)
        y = y + blk.layer[1].adapters[k](c.attend(c.split(c.q(h)), c.split(c.k(enc)), c.split(c.v(enc)), None, None))
        ff = blk.layer[2]
        y = y + ff.adapters[k](ff.DenseReluDense(ff.layer_norm(y)))
        want = m.lm_logits(m.decoder.final_layer_norm(y))
        # through the model
        st = R.DecoderState([(k, 0, 2)], pad, [blk.layer[1].kv(enc)], use_cache=False)
        got = m.decode(torch.tensor([[10, 11, 12], [20, 21, 22]]), st)
    assert torch.allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------ against the engine parity reference


def test_t5_blocks_match_parity_ref():
    import parity_ref as P
    for ff, act in (("relu", "relu"), ("gated-gelu", "gated_gelu")):
        m = tiny_model(9, multidecoder="none", feed_forward_proj=ff)
        W = {k: v.detach() for k, v in m.state_dict().items()}
        x = torch.randn(2, 5, 16)
        pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
        cfg = dict(heads=4, eps=1e-6, num_buckets=8, max_distance=20, act=act)
        with torch.no_grad():
            # encoder block 0 (bidirectional bias, key padding)
            blk = m.encoder.block[0]
            bias = blk.layer[0].SelfAttention.compute_bias(5, 5, 0, True)
            mine, _ = blk.layer[0](x, bias, pad[:, None, None, :])
            mine = blk.layer[1](mine)
            ref = P.t5_block(W, dict(cfg, prefix="encoder.block.0.", has_cross=False), x, pad=pad, causal=False)
            assert torch.allclose(mine, ref, atol=1e-5)
            # decoder block 0 (causal bias, cross-attention)
            enc = torch.randn(2, 4, 16)
            epad = torch.tensor([[False] * 4, [False] * 2 + [True] * 2])
            blk = m.decoder.block[0]
            bias = blk.layer[0].SelfAttention.compute_bias(5, 5, 0, False)
            causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
            mine, _ = blk.layer[0](x, bias, causal)
            mine = blk.layer[1](mine, blk.layer[1].kv(enc), epad[:, None, None, :])
            mine = blk.layer[2](mine)
            ref = P.t5_block(W, dict(cfg, prefix="decoder.block.0.", has_cross=True), x, causal=True,
                             enc=enc, enc_pad=epad)
            assert torch.allclose(mine, ref, atol=1e-5)


# ------------------------------------------------------------------ model directory


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_model_dir_round_trip(tmp_path, variant):
    m = tiny_model(12, **variant)
    conf = R.save_model_dir(m, str(tmp_path / "md"))
    with open(tmp_path / "md" / "config.json") as f:
        assert json.load(f) == conf
    assert conf["architecture"] == "t5_multidecoder"
    assert conf["multidecoder"] in ("adapter", "transformer")
    m2, cfg = R.load_model_dir(str(tmp_path / "md"))
    names = set(R.read_safetensors(str(tmp_path / "md" / "model.safetensors")))
    assert ("lm_head.weight" in names) == (not m.config["tie_word_embeddings"])
    if m.kind == "none":
        assert m2.kind == "adapter" and m2.num_modes == 1
        assert all(float(v.abs().max()) == 0 for k, v in m2.state_dict().items() if ".adapters." in k)
    else:
        sd1, sd2 = m.state_dict(), m2.state_dict()
        assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    src, pad = R.pad_batch(SOURCES)
    dec = torch.tensor([[0, 3, 4, 5]] * len(SOURCES))
    with torch.no_grad():
        for k in range(m.num_modes):
            assert torch.equal(m(src, pad, dec, k), m2(src, pad, dec, k))
    if m.kind != "none":
        assert _tokens(R.greedy(m, SOURCES)) == _tokens(R.greedy(m2, SOURCES))


def test_safetensors_layout_matches_st_util(tmp_path):
    import st_util
    m = tiny_model(13)
    R.save_model_dir(m, str(tmp_path / "md"))
    tensors, meta = st_util.read_safetensors(str(tmp_path / "md" / "model.safetensors"))
    assert meta["format"] == "pt"
    sd = m.state_dict()
    assert list(tensors) == list(sd)  # module order
    for k, (dt, shape, raw) in tensors.items():
        assert dt == "F32" and tuple(shape) == tuple(sd[k].shape)
        assert raw == sd[k].numpy().astype("<f4").tobytes()
    # byte-identical to st_util's writer (the C writer's layout)
    want = st_util.build_safetensors({k: ("F32", v.numpy()) for k, v in sd.items()},
                                     metadata={"format": "pt", "architecture": "t5_multidecoder"})
    with open(tmp_path / "md" / "model.safetensors", "rb") as f:
        assert f.read() == want


# ------------------------------------------------------------------ tokenizer / context


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny multimodal dialogue corpus: the same contexts get yes / no / question answers."""
    d = tmp_path_factory.mktemp("dlg")
    rs = np.random.RandomState(0)
    subj = ["the sky", "my dog", "the coffee", "this movie", "the weather", "your car"]
    resp = [["yes , i think so .", "sure , absolutely ."], ["no , not at all .", "i do n't think so ."],
            ["why do you ask ?", "what do you mean ?"]]
    with open(d / "train.jsonl", "w") as f:
        for i in range(90):
            s = subj[rs.randint(len(subj))]
            ctx = ["hello there .", "is %s nice ?" % s] if i % 2 else "is %s nice ?" % s
            r = resp[rs.randint(3)][rs.randint(2)]
            f.write(json.dumps({"context": ctx, "response": r}) + "\n")
        f.write("\n")
    return d


TRAIN_ARGS = ["--spm-vocab", "60", "--d-model", "16", "--d-kv", "4", "--d-ff", "24", "--num-layers", "1",
              "--num-decoder-layers", "2", "--num-heads", "4", "--batch-size", "8", "--eq-batch-size", "3",
              "--num-modes", "2", "--warmup-updates", "2", "--log-interval", "2", "--validate-interval-updates", "4",
              "--threads", "1", "--no-final-decode", "--valid-fraction", "0.1", "--seed", "3"]


def _train(corpus, out, *extra):
    import train_dialogue
    assert train_dialogue.main(["--corpus", str(corpus), "--out", str(out), *TRAIN_ARGS, *extra]) == 0


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _train(corpus, out, "--phase1-steps", "4", "--phase2-steps", "3", "--export", str(out / "export"))
    return out


def test_tokenizer_and_join_context(trained):
    tok = R.load_tokenizer(str(trained / "export"))
    sp = tok.sp
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    assert sp.id_to_piece(3) == "<sep>" and sp.is_control(3) and sp.id_to_piece(4) == "<mask>"
    a, b, c = "hello there .", " is my dog nice ? ", "no ."
    ids = R.join_context([a, b, c], tok)
    assert ids == tok.encode(a) + [3] + tok.encode(b.strip()) + [3] + tok.encode(c) + [1]
    assert R.join_context("hello there .", tok) == tok.encode("hello there .") + [1]
    assert "<sep>" not in [sp.id_to_piece(i) for i in tok.encode("a <sep> b")]  # control: never from text
    t2 = R.Tokenizer(str(trained / "export" / "spm.model"), "<sep>", max_context_turns=2, max_source_length=6)
    ids = R.join_context([a, b, c], t2)
    full = tok.encode(b.strip()) + [3] + tok.encode(c)
    assert ids == full[-5:] + [1] and len(ids) == 6
    t3 = R.Tokenizer(str(trained / "export" / "spm.model"), "")
    assert R.join_context([a, c], t3) == tok.encode(a + " " + c) + [1]
    assert tok.decode(tok.encode("is my dog nice ?") + [1, 5, 6]) == "is my dog nice ?"
    r = tok.encode_response("no , not at all .")
    assert r[-1] == 1


# ------------------------------------------------------------------ training / converter


def test_training_checkpoint_converts_to_the_export(trained, tmp_path):
    import eqhard_t5
    ck = torch.load(trained / "checkpoint_last.pt", map_location="cpu")
    assert ck["nzserve"]["phase"] == 2 and ck["nzserve"]["updates"] == 3
    assert ck["training_steps"] == 4 + 3 * 2  # phase 1 updates + K optimizer steps per EqHard round
    sd = ck["model"]
    # EqHard-EM MultiAdapterT5 state-dict names (incl. HF's aliases of the shared embedding)
    for k in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
              "decoder.block.1.layer.2.adapters.1.i2o.bias",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"):
        assert k in sd, k
    p1 = torch.load(trained / "phase1.pt", map_location="cpu")["model"]
    assert not any(".adapters." in k for k in p1)
    # frozen base (EqHard --freeze): phase 2 only moved the adapters
    for k, v in p1.items():
        assert torch.equal(v, sd[k]), k
    out = tmp_path / "conv"
    assert eqhard_t5.main([str(trained / "checkpoint_last.pt"), str(out)]) == 0
    for f in ("model.safetensors", "config.json", "spm.model"):
        with open(out / f, "rb") as x, open(trained / "export" / f, "rb") as y:
            assert x.read() == y.read(), f
    m, cfg = R.load_model_dir(str(out))
    assert cfg["num_modes"] == 2 and cfg["multidecoder"] == "adapter"
    tok = R.load_tokenizer(str(out))
    res = R.greedy(m, [tok.encode_context(["hello there .", "is the sky nice ?"])], max_new_tokens=8)[0]
    assert [r["decoder"] for r in R.rank(res)] in ([0, 1], [1, 0])
    # the phase-1 checkpoint (EqHard-EM's --init-ckpt) converts to a K = 1 model
    assert eqhard_t5.main([str(trained / "phase1.pt"), str(tmp_path / "p1"), "--spm",
                           str(trained / "spm.model")]) == 0
    m1, cfg1 = R.load_model_dir(str(tmp_path / "p1"))
    assert cfg1["num_modes"] == 1


@pytest.mark.parametrize("extra", [[], ["--length-buckets"]])
def test_resume_is_exact(corpus, tmp_path, extra):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--phase1-steps", "3", "--phase2-steps", "3", "--dropout", "0.1", *extra]
    _train(corpus, a, *args)
    _train(corpus, b, *args, "--interrupt-at", "4")  # stops one round into phase 2
    ck = torch.load(b / "checkpoint_last.pt", map_location="cpu")
    assert (ck["nzserve"]["phase"], ck["nzserve"]["updates"]) == (2, 1)
    _train(corpus, b, *args, "--resume")
    sa = torch.load(a / "checkpoint_last.pt", map_location="cpu")["model"]
    sb = torch.load(b / "checkpoint_last.pt", map_location="cpu")["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_snapshot_continues_phase_1(corpus, tmp_path, nzp):
    """snapshot_dialogue.py -> .nzp -> nzp unpack --model-dir -> --init-model: the run goes on at the
    snapshot's update and data position, from its weights rounded to bf16, with a fresh AdamW whose
    learning rate ramps up over --rewarm-updates."""
    import snapshot_dialogue
    import train_dialogue as T
    a = tmp_path / "a"
    args = ["--phase1-steps", "6", "--phase2-steps", "0", "--dropout", "0.0"]
    _train(corpus, a, *args, "--interrupt-at", "3")
    ck = torch.load(a / "checkpoint_last.pt", map_location="cpu")
    assert (ck["nzserve"]["phase"], ck["nzserve"]["updates"]) == (1, 3)
    snap = tmp_path / "snap.nzp"
    assert snapshot_dialogue.main([str(a / "checkpoint_last.pt"), str(snap), "--nzp", nzp]) == 0
    d = tmp_path / "unpacked"
    subprocess.run([nzp, "unpack", "--model-dir", str(snap), str(d)], check=True)
    with open(d / "config.json") as f:
        tr = json.load(f)["training"]
    assert tr["phase"] == 1 and tr["updates"] == 3 and tr["iters"] == ck["nzserve"]["iters"]
    # the snapshot is a servable K = 1 model: the engine's own tool answers with it
    out = subprocess.run([nzp, "chat", str(snap), "--max-new-tokens", "4"], input="is the sky nice ?\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    b = tmp_path / "b"
    _train(corpus, b, *args, "--init-model", str(d), "--rewarm-updates", "2", "--phase1-steps", "3")
    cb = torch.load(b / "checkpoint_last.pt", map_location="cpu")
    assert (cb["nzserve"]["phase"], cb["nzserve"]["updates"]) == (1, 3)  # nothing to train: 3 of 3
    assert cb["nzserve"]["iters"] == ck["nzserve"]["iters"] and cb["nzserve"]["rewarm_from"] == 3
    snap_sd = R.read_safetensors(str(d / "model.safetensors"))
    for k, v in T.from_eqhard_state_dict(ck["model"], types.SimpleNamespace(config={"tie_word_embeddings": True})).items():
        assert torch.equal(cb["model"][k], snap_sd[k]), k  # the weights as the engine decodes them
        assert torch.allclose(snap_sd[k], v, rtol=2 ** -8, atol=0), k  # = bf16 rounding (or exact)
    with open(a / "spm.model", "rb") as x, open(b / "spm.model", "rb") as y:
        assert x.read() == y.read()
    assert cb["config"]["dropout_rate"] == 0.0
    _train(corpus, b, *args, "--resume", "--dropout", "0.25")  # --dropout on --resume overrides the run's
    cb = torch.load(b / "checkpoint_last.pt", map_location="cpu")
    assert (cb["nzserve"]["phase"], cb["nzserve"]["updates"]) == (1, 6)
    assert cb["config"]["dropout_rate"] == 0.25
    ns = types.SimpleNamespace(lr=1e-3, warmup_updates=2, rewarm_updates=2)
    assert T.lr_at(ns, 3, 3) == pytest.approx(0.5 * T.lr_at(ns, 3)) and T.lr_at(ns, 5, 3) == T.lr_at(ns, 5)
    # --decay-updates: the last N of the phase-1 total fall linearly to 0 from where they start
    ns.decay_updates = 4
    start = T.lr_at(ns, 6)  # the rate where the decay starts: update 10 - 4
    assert T.lr_at(ns, 5, None, 10) == T.lr_at(ns, 5)
    assert [T.lr_at(ns, u, None, 10) for u in (6, 7, 9)] == pytest.approx([start, 0.75 * start, 0.25 * start])
    assert T.lr_at(ns, 10, None, 10) == T.lr_at(ns, 10)  # past the total (phase 2 has its own rate)
    # a directory without the training state is refused with a message
    with open(d / "config.json") as f:
        conf = json.load(f)
    del conf["training"]
    with open(d / "config.json", "w") as f:
        json.dump(conf, f)
    with pytest.raises(SystemExit, match="training"):
        _train(corpus, tmp_path / "c", *args, "--init-model", str(d))


def test_snapshot_continues_phase_2(corpus, tmp_path, nzp):
    """A phase-2 snapshot keeps the K decoders, the round count, the data position and the per-decoder
    step counts: --init-model goes on with EqHard rounds (no phase 1 again) from its bf16 weights; a
    snapshot of another K is refused with a message."""
    import snapshot_dialogue
    a = tmp_path / "a"
    args = ["--phase1-steps", "2", "--phase2-steps", "4", "--dropout", "0.0"]
    _train(corpus, a, *args, "--interrupt-at", "4")  # 2 phase-1 updates + 2 rounds
    ck = torch.load(a / "checkpoint_last.pt", map_location="cpu")
    ns = ck["nzserve"]
    assert (ns["phase"], ns["updates"], ck["global_step"]) == (2, 2, 4)
    snap = tmp_path / "snap.nzp"
    assert snapshot_dialogue.main([str(a / "checkpoint_last.pt"), str(snap), "--nzp", nzp]) == 0
    d = tmp_path / "unpacked"
    subprocess.run([nzp, "unpack", "--model-dir", str(snap), str(d)], check=True)
    with open(d / "config.json") as f:
        conf = json.load(f)
    tr = conf["training"]
    assert (conf["num_modes"], conf["multidecoder"]) == (2, "adapter")
    assert (tr["phase"], tr["updates"], tr["global_step"]) == (2, 2, 4)
    assert tr["per_mode"] == ns["steps_trained_per_mode"] and tr["iters"] == ns["iters"]
    b = tmp_path / "b"
    _train(corpus, b, *args, "--init-model", str(d))
    cb = torch.load(b / "checkpoint_last.pt", map_location="cpu")
    nb = cb["nzserve"]
    assert (nb["phase"], nb["updates"], cb["global_step"]) == (2, 4, 6)  # two more rounds, not phase 1
    assert nb["iters"]["dialogue"] == ns["iters"]["dialogue"]  # phase 1's data position untouched
    assert nb["iters"]["eqhard"] == [ns["iters"]["eqhard"][0], ns["iters"]["eqhard"][1] + 2]
    assert sum(nb["steps_trained_per_mode"]) > sum(ns["steps_trained_per_mode"])
    snap_sd = R.read_safetensors(str(d / "model.safetensors"))
    frozen = [k for k in snap_sd if ".adapters." not in k and k in cb["model"]]
    assert frozen and all(torch.equal(cb["model"][k], snap_sd[k]) for k in frozen)  # adapters-only training
    assert any(not torch.equal(cb["model"][k], snap_sd[k]) for k in snap_sd if ".adapters." in k)
    with pytest.raises(SystemExit, match="K=2"):
        _train(corpus, tmp_path / "c", *args, "--num-modes", "3", "--init-model", str(d))


def test_sigterm_stops_with_a_checkpoint(corpus, tmp_path):
    """SIGTERM: the run stops after the current update and leaves a checkpoint it resumes from."""
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "models", "train", "train_dialogue.py"), "--corpus", str(corpus),
           "--out", str(out), *TRAIN_ARGS, "--phase1-steps", "1000000", "--phase2-steps", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            if " update 2 phase 1" in line:
                p.send_signal(signal.SIGTERM)
                break
        rest = p.communicate(timeout=120)[0]
    finally:
        p.kill()
    assert p.returncode == 0, rest
    assert "stopping: signal %d reached" % signal.SIGTERM in rest
    ck = torch.load(out / "checkpoint_last.pt", map_location="cpu")
    assert ck["nzserve"]["phase"] == 1 and 2 <= ck["nzserve"]["updates"] < 1000000
    # in-process runs (as the other tests) give the previous handlers back
    before = signal.getsignal(signal.SIGINT)
    _train(corpus, tmp_path / "inproc", "--phase1-steps", "1", "--phase2-steps", "0")
    assert signal.getsignal(signal.SIGINT) is before


def test_converter_reads_a_pickled_eqhard_module(tmp_path):
    """torch.save(model) of EqHard-EM's MultiAdapterT5 needs transformers and their
    classes to unpickle; the converter uses stand-ins. Simulated with classes that
    only exist while pickling."""
    import eqhard_t5
    base = tiny_model(14)
    fake_mods = {}
    for name in ("model", "model.adapter_t5", "transformers", "transformers.models",
                 "transformers.models.t5", "transformers.models.t5.configuration_t5"):
        fake_mods[name] = types.ModuleType(name)
    T5Config = type("T5Config", (object,), {"__module__": "transformers.models.t5.configuration_t5"})
    MultiAdapterT5 = type("MultiAdapterT5", (torch.nn.Module,), {"__module__": "model.adapter_t5"})
    fake_mods["transformers.models.t5.configuration_t5"].T5Config = T5Config
    fake_mods["model.adapter_t5"].MultiAdapterT5 = MultiAdapterT5
    saved = {k: sys.modules.get(k) for k in fake_mods}
    sys.modules.update(fake_mods)
    try:
        obj = MultiAdapterT5()
        c = T5Config()
        for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_num_buckets", "layer_norm_epsilon", "feed_forward_proj",
                  "tie_word_embeddings", "pad_token_id", "eos_token_id", "decoder_start_token_id",
                  "adapter_hidden_size"):
            setattr(c, k, base.config[k])
        c.relative_attention_max_distance = base.config["relative_attention_max_distance"]
        obj.config = c
        obj.num_modes = base.num_modes
        obj.shared = copy.deepcopy(base.shared)
        obj.encoder = copy.deepcopy(base.encoder)
        obj.decoder = copy.deepcopy(base.decoder)
        obj.encoder.embed_tokens = obj.shared  # HF's aliases
        obj.decoder.embed_tokens = obj.shared
        obj.lm_head = torch.nn.Linear(16, 40, bias=False)
        obj.lm_head.weight = obj.shared.weight
        torch.save(obj, tmp_path / "epoch_1.00.pt")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    import sentencepiece as spm
    with open(spm_dir / "t.txt", "w") as f:
        f.write("hello there\nis the sky nice\nyes it is\n" * 5)
    spm.SentencePieceTrainer.train(input=str(spm_dir / "t.txt"), model_prefix=str(spm_dir / "m"), vocab_size=30,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    out = tmp_path / "conv"
    assert eqhard_t5.main([str(tmp_path / "epoch_1.00.pt"), str(out), "--spm", str(spm_dir / "m.model")]) == 0
    m, cfg = R.load_model_dir(str(out))
    assert cfg["turn_separator"] == "" and cfg["max_source_length"] == 0  # EqHard-EM's input convention
    sd, sdb = m.state_dict(), base.state_dict()
    assert sd.keys() == sdb.keys() and all(torch.equal(sd[k], sdb[k]) for k in sd)


# ------------------------------------------------------------------ EqHard assignment


def test_agreement_and_consensus_hand_examples():
    """t5md_ref.agreement / consensus (= nz_t5md_agreement / nz_t5md_consensus; the engine's values are
    compared bit for bit in test_t5md_parity): token BLEU+1 with the brevity penalty of the hypothesis."""
    import math
    assert R.agreement([5, 6, 7, 8], [5, 6, 7, 8]) == 1.0
    assert R.agreement([], [5]) == 0.0 and R.agreement([3], [4]) == 0.0
    # p1 3/5, p2 (2+1)/(4+1), p3 (1+1)/(3+1), p4 (0+1)/(2+1); the reference is shorter: no penalty
    want = math.exp((math.log(3 / 5) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert abs(R.agreement([5, 6, 7, 8, 9], [5, 6, 7]) - want) < 1e-15
    # every precision 1 (smoothed), the reference twice as long: exp(1 - 4/2)
    assert abs(R.agreement([5, 6], [5, 6, 7, 8]) - math.exp(-1)) < 1e-15
    # clipping: a repeated token counts as often as the reference has it
    # (p1 1/4, p2 (0+1)/(3+1), p3 (0+1)/(2+1), p4 (0+1)/(1+1))
    want = math.exp((math.log(1 / 4) + math.log(1 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4)
    assert abs(R.agreement([5, 5, 5, 5], [5, 6, 7, 8]) - want) < 1e-15
    c = R.consensus([[5, 6, 7, 1], [5, 6, 8, 1], [9, 1]])  # the final eos is left out
    x = math.exp((2 * math.log(2 / 3) + math.log(1 / 2) + math.log(1)) / 4)
    assert [round(v, 12) for v in c] == [round(x / 2, 12), round(x / 2, 12), 0.0]
    assert R.consensus([[5, 1]]) == [0.0]
    ranked = R.rank([{"decoder": 0, "tokens": [9, 1], "mean_logprob": -0.1},
                     {"decoder": 1, "tokens": [5, 6, 7, 1], "mean_logprob": -2.0},
                     {"decoder": 2, "tokens": [5, 6, 8, 1], "mean_logprob": -1.0}], key="consensus")
    assert [r["decoder"] for r in ranked] == [2, 1, 0]  # consensus tie between 1 and 2: log-prob decides


def test_consensus_pool_hand_example():
    """t5md_ref.consensus_pool (= nz_t5md_consensus_pool, compared in test_t5md_parity): every return is
    scored against all the others, every decoder's too; a decoder answers with its best-scored return,
    the better beam return on a tie."""
    ret = lambda k, toks: {"decoder": k, "tokens": toks, "mean_logprob": -1.0}
    beams = [[ret(0, [9, 1]), ret(0, [5, 6, 7, 1])], [ret(1, [5, 6, 7, 1]), ret(1, [5, 6, 8, 1])]]
    flat = [r["tokens"] for rs in beams for r in rs]
    cons = R.consensus(flat)  # [9] agrees with nothing; [5 6 7] twice
    got = R.consensus_pool(beams)
    assert [(r["decoder"], r["ret"], r["tokens"]) for r in got] == [(0, 1, [5, 6, 7, 1]), (1, 0, [5, 6, 7, 1])]
    assert [r["consensus"] for r in got] == [cons[1], cons[2]] and cons[0] == 0.0 and cons[1] > cons[3]
    assert R.rank(got, key="consensus")[0]["consensus"] == cons[1]  # ranked by the pooled values
    tie = R.consensus_pool([[ret(0, [5, 1]), ret(0, [5, 1])]])
    assert tie[0]["ret"] == 0 and tie[0]["consensus"] == 1.0


def test_eqhard_assignment_hand_example():
    # greedy argmin would put samples 0-2 on decoder 0; with 2 slots each the cheapest
    # fix moves sample 0 (cost +1) rather than 1 (+2) or 2 (+3): total 2 + 1 + 1 + 1 = 5
    L = [[1.0, 2.0], [1.0, 3.0], [1.0, 4.0], [5.0, 1.0]]
    a = R.eqhard_assign(L)
    assert a.tolist() == [1, 0, 0, 1]
    assert np.bincount(a, minlength=2).tolist() == [2, 2]
    # 6 samples, 3 decoders: decoder 2 is the best for everyone but takes only 2
    L = [[3, 2, 0], [3, 2, 0.5], [1, 3, 0.4], [2, 1, 0.1], [0.2, 5, 0.3], [4, 0.5, 0.2]]
    a = R.eqhard_assign(np.array(L))
    assert np.bincount(a, minlength=3).tolist() == [2, 2, 2]
    assert a.tolist() == [2, 2, 0, 1, 0, 1]  # total 0 + 0.5 + 1 + 1 + 0.2 + 0.5 = 3.2


def test_eqhard_assignment_is_optimal_and_equal_size():
    rs = np.random.RandomState(0)
    for trial in range(60):
        K = int(rs.randint(1, 4))
        B = K * int(rs.randint(1, 3)) if trial % 2 else int(rs.randint(1, 8))
        L = rs.rand(B, K) * 5
        cap = -(-B // K)
        a = R.eqhard_assign(torch.tensor(L))
        cnt = np.bincount(a, minlength=K)
        assert cnt.max() <= cap
        if B % K == 0:
            assert (cnt == B // K).all()
        best = min(sum(L[i, x[i]] for i in range(B)) for x in itertools.product(range(K), repeat=B)
                   if np.bincount(x, minlength=K).max() <= cap)
        assert L[np.arange(B), a].sum() == pytest.approx(best, abs=1e-9)


def test_length_buckets():
    """--length-buckets: every sample once per epoch, deterministic, batches of similar lengths."""
    import dialogue_data as T
    import numpy as np
    rs = np.random.RandomState(0)
    n, size = 1000, 8
    src, tgt = rs.randint(2, 65, n), rs.randint(2, 65, n)
    plain = T.make_batches(n, size, 1, 0, 2)
    buck = T.make_batches(n, size, 1, 0, 2, (src, tgt), pool=16)
    assert buck == T.make_batches(n, size, 1, 0, 2, (src, tgt), pool=16)
    assert buck != T.make_batches(n, size, 1, 1, 2, (src, tgt), pool=16)  # a new order every epoch
    assert sorted(i for b in buck for i in b) == list(range(n)) and max(len(b) for b in buck) == size

    def padded(batches):  # padded tokens per real token
        return sum(len(b) * (src[b].max() + tgt[b].max()) for b in batches) / (src.sum() + tgt.sum())
    assert padded(buck) < 0.8 * padded(plain), (padded(buck), padded(plain))
