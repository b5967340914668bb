"""End-to-end tests of the `nzp` tool: pack/unpack/info/verify/bench on
safetensors files and model directories written with numpy."""

import json
import os
import subprocess

import numpy as np
import pytest

from st_util import bf16_bits_to_f32, f32_to_bf16_bits, read_safetensors, write_safetensors


def run(nzp, *args, ok=True):
    p = subprocess.run([nzp, *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok and p.returncode != 0:
        raise AssertionError(f"nzp {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def info(nzp, path):
    return json.loads(run(nzp, "info", "--json", path).stdout)


SPECIAL_F32 = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -2.5, np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, 1e-45, -1e-45, 3e-39], dtype=np.float32)
NAN_F32_BITS = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF], dtype=np.uint32)


def special_tensors(rng):
    """Tensors of every float dtype with edge values, plus non-float ones."""
    f32 = rng.normal(0, 0.02, (64, 130)).astype(np.float32)
    f32.flat[: SPECIAL_F32.size] = SPECIAL_F32
    f32.view(np.uint32).flat[20:20 + NAN_F32_BITS.size] = NAN_F32_BITS
    bf = f32_to_bf16_bits(rng.normal(0, 0.02, (33, 200)).astype(np.float32))
    bf.flat[:12] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFF81, 0x7F81, 0x0001, 0x807F, 0x7F7F,
                    0x0080, 0xFFFF]
    f16 = rng.normal(0, 0.02, (50, 100)).astype(np.float16)
    f16.view(np.uint16).flat[:10] = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE7F, 0x0001,
                                     0x83FF, 0x7BFF]
    return {
        "enc.w": ("BF16", bf),
        "enc.f": ("F32", f32),
        "enc.h": ("F16", f16),
        "enc.bias": ("F32", rng.normal(size=130).astype(np.float32)),
        "one_row": ("BF16", f32_to_bf16_bits(rng.normal(size=(1, 5000)).astype(np.float32))),
        "one_col": ("F32", rng.normal(size=(5000, 1)).astype(np.float32)),
        "conv": ("BF16", f32_to_bf16_bits(rng.normal(size=(16, 8, 3, 3)).astype(np.float32))),
        "scalar": ("F32", np.array(3.5, dtype=np.float32)),
        "empty": ("F32", np.zeros((0, 4), dtype=np.float32)),
        "step": ("I64", np.array([1, 2, 3], dtype=np.int64)),
        "mask": ("BOOL", np.array([True, False, True])),
    }


def test_lossless_round_trip_is_byte_identical(nzp, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "m.safetensors"
    tensors = special_tensors(rng)
    write_safetensors(src, tensors, metadata={"format": "pt", "note": "x"})
    for coder in ("esc", "rans", "zstd"):
        for tile_rows in ("", "7"):
            out = tmp_path / f"m-{coder}{tile_rows}.nzp"
            args = ["pack", "--coder", coder, "--raw-below", "64"]
            if tile_rows:
                args += ["--tile-rows", tile_rows]
            run(nzp, *args, src, out)
            run(nzp, "verify", out)
            back = tmp_path / "back.safetensors"
            run(nzp, "unpack", out, back)
            a, ma = read_safetensors(src)
            b, mb = read_safetensors(back)
            assert ma == mb == {"format": "pt", "note": "x"}
            assert list(a) == list(b)  # same tensors, same order
            for name in a:
                assert a[name] == b[name], f"{name} differs after {coder} tile_rows={tile_rows}"


def test_info_reports_ratio_and_entropy_bound(nzp, tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "g.safetensors"
    w = f32_to_bf16_bits(rng.normal(0, 0.02, (1024, 1024)).astype(np.float32))
    write_safetensors(src, {"w": ("BF16", w), "b": ("F32", np.zeros(1024, np.float32))})
    out = tmp_path / "g.nzp"
    run(nzp, "pack", src, out)
    rep = info(nzp, out)
    t = {x["name"]: x for x in rep["tensors"]}
    assert t["w"]["mode"] == "lossless" and t["w"]["coder"] == "esc"  # the default
    assert t["b"]["mode"] == "raw"  # 1-D stays raw
    # entropy bound = 8 + H0(exponent); computed here independently
    exps = (w >> 7) & 0xFF
    p = np.bincount(exps.ravel(), minlength=256) / exps.size
    h0 = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert abs(t["w"]["entropy_bound_bits"] - (8 + h0)) < 1e-6
    gap = t["w"]["bits_per_weight"] - (8 + h0)
    assert 0 <= gap <= 0.15, f"esc: {gap:.4f} bits/weight above the order-0 bound"
    assert 0.64 < t["w"]["ratio"] < 0.69  # ~67% of bf16 for Gaussian weights
    # rANS: at the bound
    run(nzp, "pack", "--coder", "rans", src, tmp_path / "r.nzp")
    tr = {x["name"]: x for x in info(nzp, tmp_path / "r.nzp")["tensors"]}["w"]
    assert tr["coder"] == "rans" and 0 <= tr["bits_per_weight"] - (8 + h0) <= 0.02
    text = run(nzp, "info", out).stdout
    assert "lossless" in text and "total:" in text
    # --memory: the engine's report; the mapped file is accounted, RSS read from the OS
    mem = json.loads(run(nzp, "info", "--json", "--memory", out).stdout)["memory"]
    assert mem["categories"]["mapped"]["current_bytes"] == rep["total"]["file_bytes"]
    assert mem["rss_bytes"] > 0 and mem["rss_peak_bytes"] >= mem["rss_bytes"]
    assert 0 < mem["mapped_resident_bytes"] <= rep["total"]["file_bytes"]  # mincore over the map
    assert mem["weights_decoded_equivalent_bytes"] == 4 * (1024 * 1024 + 1024)
    assert mem["weights_compressed_bytes"] == rep["total"]["stored_bytes"]
    assert "RSS" in run(nzp, "info", "--memory", out).stdout


def test_model_directory_embeds_config_and_tokenizer(nzp, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    rng = np.random.default_rng(3)
    write_safetensors(d / "model.safetensors",
                      {"encoder.embed_tokens.weight": ("F32", rng.normal(size=(100, 64)).astype(np.float32))})
    cfg = {"architecture": "cmlm_transformer", "encoder_layers": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "spm.model").write_bytes(b"\x00\x01spm-bytes")
    (d / "dict.txt").write_text("hello 5\nworld 3\n")
    (d / ".hidden").write_text("skip me")
    out = tmp_path / "model.nzp"
    run(nzp, "pack", "--mode", "bf16", d, out)
    rep = info(nzp, out)
    assert rep["config"] == cfg
    assert rep["blobs"] == ["dict.txt", "spm.model"]
    assert rep["tensors"][0]["mode"] == "bf16"
    run(nzp, "verify", out)
    # mode bf16 unpacks as BF16 equal to round-to-nearest-even of the source
    back = tmp_path / "b.safetensors"
    run(nzp, "unpack", out, back)
    tens, _ = read_safetensors(back)
    dtype, shape, raw = tens["encoder.embed_tokens.weight"]
    src, _ = read_safetensors(d / "model.safetensors")
    want = f32_to_bf16_bits(np.frombuffer(src["encoder.embed_tokens.weight"][2], np.float32))
    assert dtype == "BF16" and tuple(shape) == (100, 64)
    assert np.array_equal(np.frombuffer(raw, np.uint16), want)
    # a broken config is refused with the file named
    (d / "config.json").write_text("{not json")
    p = run(nzp, "pack", d, tmp_path / "x.nzp", ok=False)
    assert p.returncode == 1 and "config.json" in p.stderr
    assert not (tmp_path / "x.nzp").exists()


@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("norm", [0, 64])
def test_lossy_error_bound(nzp, tmp_path, k, norm):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.02, (256, 96)).astype(np.float32)
    src = tmp_path / "l.safetensors"
    write_safetensors(src, {"w": ("F32", x)})
    out = tmp_path / "l.nzp"
    args = ["pack", "--mode", f"lossy-{k}"] + (["--norm-block", str(norm)] if norm else [])
    run(nzp, *args, src, out)
    run(nzp, "verify", out)
    back = tmp_path / "lb.safetensors"
    run(nzp, "unpack", out, back)
    tens, _ = read_safetensors(back)
    y = np.frombuffer(tens["w"][2], np.float32).reshape(x.shape)
    # half an ulp at k mantissa bits (relative 2^-(k+1)); normalisation adds a factor <= 1 + 2^-8
    rel = np.abs(y - x) / np.abs(x)
    bound = 2.0 ** -(k + 1) * (1 + 2.0 ** -8 + 1e-6)
    assert rel.max() <= bound, f"max relative error {rel.max():.3g} > {bound:.3g}"
    rep = info(nzp, out)
    assert rep["tensors"][0]["mode"] == f"lossy-{k}" and rep["tensors"][0]["norm_block"] == norm
    bits = rep["total"]["bits_per_weight"]
    assert bits < 1 + k + 3.2 + (8 / norm if norm else 0)


def test_exclude_and_zstd(nzp, tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "e.safetensors"
    write_safetensors(src, {
        "decoder.embed_tokens.weight": ("BF16", f32_to_bf16_bits(rng.normal(size=(300, 64)).astype(np.float32))),
        "decoder.layers.0.fc1.weight": ("BF16", f32_to_bf16_bits(rng.normal(size=(300, 64)).astype(np.float32))),
    })
    out = tmp_path / "e.nzp"
    run(nzp, "pack", "--exclude", "embed_tokens", "--coder", "zstd", src, out)
    t = {x["name"]: x for x in info(nzp, out)["tensors"]}
    assert t["decoder.embed_tokens.weight"]["mode"] == "raw"
    assert t["decoder.layers.0.fc1.weight"]["coder"] == "zstd"
    p = run(nzp, "pack", "--exclude", "([", src, out, ok=False)
    assert p.returncode == 1 and "--exclude" in p.stderr


def test_damaged_files_are_refused_with_a_clear_message(nzp, tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "d.safetensors"
    write_safetensors(src, {"layer.w": ("BF16", f32_to_bf16_bits(rng.normal(size=(200, 512)).astype(np.float32)))})
    good = tmp_path / "d.nzp"
    run(nzp, "pack", src, good)
    data = bytearray(good.read_bytes())
    # a flipped bit in the last tile: verify names tensor and tile, exit 1
    bad = tmp_path / "bad.nzp"
    data2 = bytearray(data)
    data2[-100] ^= 0x04
    bad.write_bytes(data2)
    p = run(nzp, "verify", bad, ok=False)
    assert p.returncode == 1
    assert "tensor 'layer.w' tile" in p.stderr and "checksum mismatch" in p.stderr
    assert "DAMAGED" in p.stdout
    # truncated file
    trunc = tmp_path / "t.nzp"
    trunc.write_bytes(bytes(data[: len(data) // 2]))
    for cmd in ("info", "verify", "unpack"):
        args = [cmd, trunc] + ([tmp_path / "o.safetensors"] if cmd == "unpack" else [])
        p = run(nzp, *args, ok=False)
        assert p.returncode == 1 and "truncated" in p.stderr, p.stderr
    # empty file, not an nzp file, missing file
    (tmp_path / "empty.nzp").write_bytes(b"")
    p = run(nzp, "info", tmp_path / "empty.nzp", ok=False)
    assert p.returncode == 1 and "empty file" in p.stderr
    p = run(nzp, "info", src, ok=False)
    assert p.returncode == 1 and "safetensors" in p.stderr
    p = run(nzp, "info", tmp_path / "missing.nzp", ok=False)
    assert p.returncode == 1 and "No such file" in p.stderr
    # a damaged safetensors source is refused, nothing written
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 40)
    p = run(nzp, "pack", tmp_path / "junk.safetensors", tmp_path / "j.nzp", ok=False)
    assert p.returncode == 1 and not (tmp_path / "j.nzp").exists()


def test_usage_errors(nzp, tmp_path):
    for args in ([], ["frobnicate"], ["pack"], ["pack", "--mode", "lossy-9", "a", "b"],
                 ["pack", "--tile-rows", "0", "a", "b"], ["pack", "--norm-block", "8", "a", "b"],
                 ["info"], ["unpack", "x"]):
        p = run(nzp, *args, ok=False)
        assert p.returncode == 2, args
        assert "usage" in p.stderr
    assert run(nzp, "--help").returncode == 0


def test_bench_reports_each_coder(nzp, tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "b.safetensors"
    write_safetensors(src, {"w": ("BF16", f32_to_bf16_bits(rng.normal(0, 0.02, (256, 256)).astype(np.float32)))})
    out = tmp_path / "b.nzp"
    run(nzp, "pack", src, out)
    text = run(nzp, "bench", "--seconds", "0.05", out).stdout
    for coder in ("as stored", "esc avx2", "esc scalar", "rans avx512", "rans avx2", "rans scalar", "zstd"):
        assert coder in text
    assert "/ zstd: to fp32" in text and "/ rans" in text


# ---------------------------------------------------------------- progress (pack, verify, bench)


def run_on_tty(nzp, *args, timeout=120):
    """Run nzp with stdout and stderr on one pseudo-terminal. @return (exit status, everything it wrote)."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([nzp, *map(str, args)], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
    return p.returncode, out.decode("utf-8", "replace")


def progress_model(tmp_path):
    """A model directory with several tensors (a few MiB). @return its path."""
    rng = np.random.default_rng(8)
    d = tmp_path / "prog"
    d.mkdir()
    tensors = {f"layers.{i}.w": ("BF16", f32_to_bf16_bits(rng.normal(0, 0.02, (512, 512)).astype(np.float32)))
               for i in range(12)}
    tensors["bias"] = ("F32", rng.normal(size=512).astype(np.float32))
    write_safetensors(d / "model.safetensors", tensors)
    return d


def test_progress_stays_quiet_off_a_terminal(nzp, tmp_path):
    src, out = progress_model(tmp_path), tmp_path / "p.nzp"
    for args in (["pack", src, out], ["verify", out], ["bench", "--seconds", "0.05", out]):
        p = run(nzp, *args)
        # on a pipe: nothing for a job under 2 s (here, unless under valgrind), else a line per 10 %
        assert "\r" not in p.stderr and "\x1b" not in p.stderr, args
        lines = p.stderr.splitlines()
        assert len(lines) <= 10 and all(l.startswith(f"nzp {args[0]}: ") and "%" in l for l in lines), p.stderr
    assert run(nzp, "pack", src, out).stdout.startswith("packed 13 tensors:")
    assert ": OK: 13 tensors" in run(nzp, "verify", out).stdout


def test_progress_line_on_a_terminal(nzp, tmp_path):
    src, out = progress_model(tmp_path), tmp_path / "p.nzp"
    rc, text = run_on_tty(nzp, "pack", src, out)
    assert rc == 0, text
    # one line redrawn with \r: tensors and bytes done of the total, rate, ETA; erased before the summary
    assert "\rnzp pack:" in text and "/13 tensors" in text and "MiB/s" in text and "ETA" in text, text
    assert "\rnzp pack: 100%  13/13 tensors" in text, text
    before, sep, summary = text.rpartition("\r\x1b[K")
    assert sep and summary.startswith("packed 13 tensors:") and summary.count("\n") == 1, repr(text)
    assert "\n" not in before, "the progress must stay on one line"
    rc, text = run_on_tty(nzp, "verify", out)
    assert rc == 0 and "\rnzp verify:" in text and "tiles" in text, text
    assert text.rpartition("\r\x1b[K")[2].startswith(f"{out}: OK: 13 tensors"), repr(text)
    rc, text = run_on_tty(nzp, "bench", "--seconds", "0.05", out)
    assert rc == 0 and "\rnzp bench:" in text and "/12 tensors" in text, text
    assert text.rpartition("\r\x1b[K")[2].startswith("decode throughput"), repr(text)
    # --quiet: the summary alone
    for args in (["pack", "--quiet", src, out], ["verify", "--quiet", out], ["bench", "--quiet", "--seconds", "0.05", out]):
        rc, text = run_on_tty(nzp, *args)
        assert rc == 0 and "\r" not in text.replace("\r\n", "\n") and f"nzp {args[0]}:" not in text, (args, text)


def test_progress_leaves_errors_on_their_own_line(nzp, tmp_path):
    src, good = progress_model(tmp_path), tmp_path / "p.nzp"
    run(nzp, "pack", src, good)
    data = bytearray(good.read_bytes())
    data[-100] ^= 0x04  # a flipped bit in the last tile
    bad = tmp_path / "bad.nzp"
    bad.write_bytes(data)
    rc, text = run_on_tty(nzp, "verify", bad)
    assert rc == 1, text
    assert "\r\x1b[Knzp: verify: tensor 'bias' tile 0: checksum mismatch\r\n" in text, repr(text)
    assert text.rpartition("\r\x1b[K")[2].startswith(f"{bad}: DAMAGED: 1 of"), repr(text)


def test_progress_options_in_usage(nzp):
    for cmd in ("pack", "verify", "bench"):
        assert "--quiet" in run(nzp, cmd, "--help").stdout, cmd
    assert "progress" in run(nzp, "pack", "--help").stdout
    for args in (["verify", "--quiet"], ["verify", "--loud", "x.nzp"], ["verify", "a.nzp", "b.nzp"]):
        p = run(nzp, *args, ok=False)
        assert p.returncode == 2 and "usage" in p.stderr, args
