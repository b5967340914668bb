"""Python port of the engine's sampling contract (engine/nz_ops.h / nz_ops.c): the nz_rng generator
(xoshiro256** seeded by splitmix64), the per-decoder stream seeds, nz_topk's order and nz_sample's
temperature / top-k / nucleus draw, with the same float32 / double arithmetic, so a PyTorch reference
(t5md_ref.sample) draws the very tokens the engine draws for the same seed.
"""

import ctypes
import ctypes.util
import math

import numpy as np

_M64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15


class NzRng:
    """engine/nz_ops.h nz_rng: xoshiro256** 1.0 seeded with four splitmix64 outputs."""

    def __init__(self, seed):
        x = int(seed) & _M64
        s = []
        for _ in range(4):
            x = (x + GOLDEN64) & _M64
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            s.append(z ^ (z >> 31))
        self.s = s

    def next(self):
        s = self.s

        def rotl(v, k):
            return ((v << k) | (v >> (64 - k))) & _M64
        result = (rotl((s[1] * 5) & _M64, 7) * 9) & _M64
        t = (s[1] << 17) & _M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def float(self):
        """nz_rng_float: the top 24 bits times 2^-24 (exact in float32)."""
        return (self.next() >> 40) * (1.0 / (1 << 24))


def row_seed(seed, k):
    """The sampling stream of decoder k for a request seeded with `seed`:
    nz_rng_seed(seed ^ (k * 0x9E3779B97F4A7C15 mod 2^64))."""
    return (int(seed) ^ ((int(k) * GOLDEN64) & _M64)) & _M64


def _load_expf():
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name or "libm.so.6")
        f = lib.expf
        f.argtypes = [ctypes.c_float]
        f.restype = ctypes.c_float
        return f
    except (OSError, AttributeError):
        return None


_EXPF = _load_expf()


def expf32(x):
    """C expf of a float32 (libm through ctypes, what the engine calls)."""
    if _EXPF is not None:
        return np.float32(_EXPF(float(x)))
    return np.float32(math.exp(float(x))) if x > -200 else np.float32(0.0)


def _before(lg, a, b):
    """nz_topk order: a before b when lg[a] is larger, or equal with the lower index; NaN last."""
    xa, xb = lg[a], lg[b]
    na, nb = xa != xa, xb != xb
    if na != nb:
        return nb
    if not na and xa != xb:
        return xa > xb
    return a < b


def nz_rank(lg):
    """Indices of lg in nz_topk order."""
    n = len(lg)
    isn = np.isnan(lg)
    key = np.where(isn, np.float32(0), -lg.astype(np.float64))
    return np.lexsort((np.arange(n), key, isn))


def _nucleus_select(lg, p, idx, cnt, want):
    """Literal port of nz_ops.c nucleus_select (the permutation it leaves matters:
    the draw walks the candidates in that order)."""
    if not (want > 0):
        want = 1e-300
    lo, hi, acc = 0, cnt, 0.0

    def swap(i, j):
        p[i], p[j] = p[j], p[i]
        idx[i], idx[j] = idx[j], idx[i]
    while hi - lo > 16:
        mid = lo + (hi - lo) // 2
        if _before(lg, idx[mid], idx[lo]):
            swap(mid, lo)
        if _before(lg, idx[hi - 1], idx[lo]):
            swap(hi - 1, lo)
        if _before(lg, idx[mid], idx[hi - 1]):
            swap(mid, hi - 1)
        piv = idx[hi - 1]
        store = lo
        before = 0.0
        for j in range(lo, hi - 1):
            if _before(lg, idx[j], piv):
                before += float(p[j])
                swap(j, store)
                store += 1
        swap(store, hi - 1)
        if acc + before >= want:
            hi = store
        elif acc + before + float(p[store]) >= want:
            return store + 1
        else:
            acc += before + float(p[store])
            lo = store + 1
    for i in range(lo + 1, hi):
        j = i
        while j > lo and _before(lg, idx[j], idx[j - 1]):
            swap(j, j - 1)
            j -= 1
    for j in range(lo, hi):
        acc += float(p[j])
        if acc >= want:
            return j + 1
    return hi if hi > 0 else 1


def nz_sample(logits, temperature, top_k, top_p, rng):
    """engine/nz_ops.c nz_sample on float32 logits [n] (a port, same arithmetic):
    greedy (first argmax, no draw) when temperature <= 0 or top_k == 1; else
    candidates = the top_k by logit (nz_topk order) or all n in index order,
    weights w = expf(l / T - max / T) in float32, z = their sum in double, the
    nucleus (top_p < 1: the shortest rank-ordered prefix with mass >= top_p * z,
    found by nz_ops.c's quickselect, which also fixes the walk order), then one
    nz_rng_float u: the first candidate (walk order) whose cumulative mass
    exceeds u * z."""
    lg = np.ascontiguousarray(logits, dtype=np.float32)
    n = lg.shape[0]
    T = np.float32(temperature)
    k = int(top_k) if top_k else n
    k = min(k, n)
    best = _nz_argmax(lg)
    if not (T > 0) or k <= 1 or not np.isfinite(lg[best]):
        return best
    mx = np.float32(lg[best] / T)
    if k < n:
        idx = [int(i) for i in nz_rank(lg)[:k]]
    else:
        idx = list(range(n))
    cnt = len(idx)
    p = [np.float32(0.0) if lg[i] != lg[i] else expf32(np.float32(lg[i] / T) - mx) for i in idx]
    z = 0.0
    for w in p:
        z += float(w)
    if np.float32(top_p) < np.float32(1.0):
        cnt = _nucleus_select(lg, p, idx, cnt, float(np.float32(top_p)) * z)
        z = 0.0
        for j in range(cnt):
            z += float(p[j])
    u = rng.float() * z
    cum = 0.0
    last = 0
    for j in range(cnt):
        if not (p[j] > 0):
            continue
        cum += float(p[j])
        last = j
        if u < cum:
            return idx[j]
    return idx[last]


def _nz_argmax(x):
    """nz_argmax: the index of the first largest non-NaN value (0 when all are NaN)."""
    x = np.asarray(x, dtype=np.float32)
    nan = np.isnan(x)
    if not nan.any():
        return int(np.argmax(x))
    if nan.all():
        return 0
    pos = np.nonzero(~nan)[0]
    return int(pos[np.argmax(x[pos])])
