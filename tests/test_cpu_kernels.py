"""The CPU product kernel (gemma3/cpu_kernels.py): its results against float64 products, when it is used,
its derivatives, and the fallback to XLA's dot where it cannot be built."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3 import cpu_kernels
from gemma3.text import SplitFloat32Embed, accumulating_dot_general

KN = (((1,), (0,)), ((), ()))  # nnx.Linear: x @ w, w is (in, out)
NK = (((1,), (1,)), ((), ()))  # the tied LM head: x @ w.T, w is (out, in)


def test_the_kernel_builds_here():
    assert cpu_kernels.available(), "the CI machine has g++: the kernel must build"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["KN", "NK"])
@pytest.mark.parametrize("k,n", [(37, 13), (261, 35), (641, 1000), (640, 1000)])  # odd tails (261: passes of
# eight weight rows and an odd rest; 35 and 1000: blocks of 32 columns and a rest); a matrix large enough to
# split in two, its odd depth too, and a whole number of AMX tiles deep (AMX takes (N, K) weights only so)
def test_products_match_float64_for_every_row_count(dtype, layout, k, n):
    rng = np.random.default_rng(k * n)
    w = jnp.asarray(rng.standard_normal((k, n) if layout == "KN" else (n, k)), dtype)
    product = jax.jit(lambda x, w: cpu_kernels.rows_matmul(x, w, KN if layout == "KN" else NK))
    for rows in range(1, cpu_kernels.MAX_ROWS + 1):
        x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
        x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
        want = x64 @ (w64 if layout == "KN" else w64.T)
        got = np.asarray(product(x, w), np.float64)
        assert got.dtype == np.float64 and got.shape == want.shape
        # float32 accumulation of k products; a bfloat16 result adds its own rounding (8 bits)
        tol = 1e-5 if dtype == "float32" else 8e-3
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.fixture(params=["pairs", "float32"])
def bf16_gemm(request, monkeypatch):
    """Both ways the kernel multiplies bfloat16 prefill products (GEMMA3_BF16_GEMM), whichever this CPU prefers;
    pairs only where the CPU has them (AVX512-BF16)."""
    if request.param == "pairs" and not cpu_kernels.pair_products():
        pytest.skip("this CPU has no bfloat16 pair products: its GEMM is float32 FMAs alone")
    monkeypatch.setenv("GEMMA3_BF16_GEMM", request.param)
    cpu_kernels.float32_gemm.cache_clear()
    yield request.param
    cpu_kernels.float32_gemm.cache_clear()


@pytest.mark.parametrize("k,n", [(37, 13), (261, 35), (640, 1000), (1031, 96)])
def test_prefill_sized_products_match_float64_in_bfloat16(k, n, bf16_gemm):
    """More than 8 rows: tiles of 6 rows and their rest (1 to 5), panels of 64 columns (16 without AVX-512)
    and their rest, 256 weight rows at a time and an odd last one; past a block of rows (600, 1030: blocks of
    510 rows as pairs, 252 as float32, 128 in AMX tiles) a depth slice of every panel at a time, then the
    blocks over them (in AMX tiles also at 128 rows or fewer, that slice then packed weight row by weight row,
    and narrow products of enough depth, the last two here, cut by depth between the threads and added);
    as pairs, and from FLOAT32_GEMM_ROWS rows on as float32 FMAs when asked (every row count where the CPU has
    no pairs)."""
    rng = np.random.default_rng(k + n)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    product = jax.jit(lambda x, w: cpu_kernels.rows_matmul(x, w, KN))
    for rows in (9, 11, 12, 14, 16, 19, 31, 32, 37, 130, 600, 1030):
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
        assert cpu_kernels.applies(x, w, KN)
        want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        got = np.asarray(product(x, w), np.float64)
        np.testing.assert_allclose(got, want, rtol=8e-3, atol=8e-3 * np.abs(want).max())


def test_the_float32_gemm_takes_prefill_products_of_enough_rows_when_chosen(bf16_gemm):
    w = jnp.zeros((64, 48), jnp.bfloat16)

    def attribute(rows):
        text = jax.jit(lambda x: cpu_kernels.rows_matmul(x, w, KN)).lower(jnp.zeros((rows, 64), jnp.bfloat16)).as_text()
        assert "float32_gemm" in text
        return "float32_gemm = 1" in text

    assert not attribute(cpu_kernels.FLOAT32_GEMM_ROWS - 1)
    assert attribute(cpu_kernels.FLOAT32_GEMM_ROWS) == (bf16_gemm == "float32")


def test_an_unknown_bf16_gemm_is_refused(monkeypatch):
    monkeypatch.setenv("GEMMA3_BF16_GEMM", "int8")
    cpu_kernels.float32_gemm.cache_clear()
    try:
        with pytest.raises(ValueError, match="GEMMA3_BF16_GEMM must be auto, pairs or float32"):
            cpu_kernels.float32_gemm()
    finally:
        cpu_kernels.float32_gemm.cache_clear()


def test_decode_sized_products_use_the_kernel_and_others_xla():
    x8, x9 = jnp.ones((2, 4, 64), jnp.bfloat16), jnp.ones((9, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.bfloat16)
    assert cpu_kernels.applies(x8, w, (((2,), (0,)), ((), ())))  # 8 rows, batch and sequence folded
    # prefill-sized: our bfloat16 GEMM; never float32 or (N, K)
    assert cpu_kernels.applies(x9, w, KN)
    assert not cpu_kernels.applies(x9.astype(jnp.float32), w.astype(jnp.float32), KN)
    assert not cpu_kernels.applies(x9, w.T, NK)
    assert cpu_kernels.applies(x9[:1], w.T, NK)  # bfloat16 LM head
    assert cpu_kernels.applies(x9[:1].astype(jnp.float32), w.T.astype(jnp.float32), NK)
    assert cpu_kernels.applies(x9[:1].astype(jnp.float32), w.astype(jnp.float32), KN)
    assert not cpu_kernels.applies(x9[:1], w.astype(jnp.float32), KN)  # mixed dtypes
    assert not cpu_kernels.applies(jnp.ones((4, 1, 64)), jnp.ones((4, 64, 32)), (((2,), (1,)), ((0,), (0,))))
    hlo = jax.jit(lambda x, w: accumulating_dot_general(x, w, KN)).lower(x9[:1], w).as_text()
    assert cpu_kernels.TARGET in hlo


def test_derivatives_flow_through_xla_dot():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 40)), jnp.float32)

    def loss(x, w, dot):
        return jnp.sum(jnp.tanh(dot(x, w, KN)))

    ours = jax.grad(loss, argnums=(0, 1))(x, w, accumulating_dot_general)
    xla = jax.grad(loss, argnums=(0, 1))(x, w, lambda a, b, dn: jax.lax.dot_general(a, b, dn))
    for a, b in zip(ours, xla):  # the forward products sum 48 terms of about 1 in another order than XLA's
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env", [{"GEMMA3_CPU_KERNELS": "0"}, {"CXX": "false"}])
def test_without_the_kernel_products_fall_back_to_xla(env, tmp_path):
    code = ("import jax, jax.numpy as jnp; from gemma3 import cpu_kernels; "
            "from gemma3.text import SplitFloat32Embed, accumulating_dot_general as d; "
            "x, w = jnp.ones((1, 8)), jnp.ones((8, 4)); "
            "print(cpu_kernels.available(), float(d(x, w, (((1,), (0,)), ((), ())))[0, 0]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GEMMA3_KERNEL_CACHE_DIR": str(tmp_path), **env})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "8.0"]
    if "CXX" in env:
        assert "CPU product kernel unavailable" in done.stderr


def _planes(table: np.ndarray) -> jax.Array:
    return SplitFloat32Embed.split(jnp.asarray(table, jnp.float32))


@pytest.mark.parametrize("k,n", [(37, 13), (261, 1000), (640, 3001)])  # tails of the 8-lane sums, one row per part
def test_split_products_equal_the_float32_kernel_and_the_argmax_is_theirs(k, n):
    rng = np.random.default_rng(k + n)
    table = rng.standard_normal((n, k)).astype(np.float32)
    planes = _planes(table)
    np.testing.assert_array_equal(np.asarray(SplitFloat32Embed.join(planes)), table)
    product = jax.jit(cpu_kernels.split_product)
    argmax = jax.jit(cpu_kernels.split_argmax)
    for rows in (1, 2, 5, 8, 9, 17):  # past eight: eight at a time over blocks of the planes
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        got = np.asarray(product(x, planes))
        exact = np.asarray(x, np.float64) @ table.T.astype(np.float64)
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
        if rows <= cpu_kernels.MAX_ROWS:  # the float32 table's own kernel product, to its rounding
            np.testing.assert_allclose(got, np.asarray(cpu_kernels.rows_matmul(x, jnp.asarray(table), NK)), rtol=1e-6,
                                       atol=1e-6)
        np.testing.assert_array_equal(np.asarray(argmax(x, planes)), np.argmax(exact, axis=-1))


def test_split_argmax_decides_rows_that_differ_only_in_their_bottom_halves():
    """Every row has the same top halves (the top plane alone cannot tell them apart): the argmax is the row
    whose bottom halves make its exact product largest, the first of equal ones, and NaN wins as in jnp.argmax."""
    rng = np.random.default_rng(0)
    n, k = 4096, 640
    top = (rng.standard_normal(k).astype(np.float32).view(np.uint32) & 0xFFFF0000).astype(np.uint32)
    bottom = rng.integers(0, 1 << 16, (n, k), dtype=np.uint32)
    table = (top[None, :] | bottom).view(np.float32)
    x = jnp.asarray(np.abs(rng.standard_normal((3, k))) * np.sign(table[0])[None, :], jnp.float32)
    exact = np.asarray(x, np.float64) @ table.T.astype(np.float64)
    got = np.asarray(cpu_kernels.split_argmax(x, _planes(table)))
    best = np.argmax(exact, axis=-1)
    spread = exact.max(axis=-1) - exact.min(axis=-1)  # what the bottom halves move the rows by
    rounding = 1e-6 * np.abs(exact).max(axis=-1)  # float32 sums of k products
    assert (spread > 100 * rounding).all() and (best != 0).any()  # the bottom halves decide, not the row order
    assert (exact[np.arange(3), got] >= exact.max(axis=-1) - rounding).all()
    tied = np.concatenate([table, table[best[:1]]])  # a later copy of row best[0]: the first one wins
    assert int(cpu_kernels.split_argmax(x[:1], _planes(tied))[0]) == best[0]
    with_nan = table.copy()
    with_nan[7, 3] = np.nan
    nan_logits = np.asarray(cpu_kernels.split_product(x, _planes(with_nan)))
    np.testing.assert_array_equal(np.asarray(cpu_kernels.split_argmax(x, _planes(with_nan))),
                                  np.asarray(jnp.argmax(jnp.asarray(nan_logits), axis=-1)))


def _screened_argmax(x, table) -> np.ndarray:
    """The argmax of the model's bfloat16 logits of x against the table (the kernel's product of one row, as
    the screen sums its candidates: products of more rows may sum in another order on some CPUs, AMX tiles,
    rounded to bfloat16), as jnp.argmax takes it."""
    logits = [cpu_kernels.rows_matmul(x[i:i + 1], table, NK) for i in range(x.shape[0])]
    return np.asarray(jnp.argmax(jnp.concatenate(logits).astype(jnp.float32), axis=-1))


def _screen(table):
    from gemma3.text import HeadScreen

    screen = HeadScreen.of(table)
    return screen.screen[...], screen.rows[...]


@pytest.mark.parametrize("k,n", [(37, 13), (100, 1000), (640, 3001)])  # tails of 64 inputs, one row per part
def test_screen_argmax_is_the_argmax_of_the_bfloat16_logits(k, n):
    if not cpu_kernels.int8_screen():
        pytest.skip("the int8 screen needs AVX512-VNNI or AVX2")
    rng = np.random.default_rng(k + n)
    table = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
    screen, rows = _screen(table)
    argmax = jax.jit(cpu_kernels.screen_argmax)
    for m in (1, 2, 5, 6, 8, 9, 17):  # past eight: a pass over the screen per eight rows
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(argmax(x, table, screen, rows)), _screened_argmax(x, table))
    # the best row again first and last: the first wins, across the threads' parts too
    best = int(_screened_argmax(x[:1], table)[0])
    tied = jnp.concatenate([table[best:best + 1], table, table[best:best + 1]])
    assert int(argmax(x[:1], tied, *_screen(tied))[0]) == 0


def test_screen_argmax_decides_rows_the_screen_cannot_tell_apart():
    """Rows whose int8 screens are equal but whose bfloat16 values differ: the exact sums decide; a row the
    screen ranks below others still wins where its bound says it may; logits that round to the same bfloat16
    tie (the first wins); NaN wins, in the table or from x, as in jnp.argmax."""
    if not cpu_kernels.int8_screen():
        pytest.skip("the int8 screen needs AVX512-VNNI or AVX2")
    rng = np.random.default_rng(1)
    n, k = 4096, 640
    table = rng.integers(-1, 2, (n, k)).astype(np.float32) * 2.0**-9  # a quarter of the screen's step, 2^-7 ...
    table[:, 0] = 127 * 2.0**-7  # ... which every row's largest value sets
    table = jnp.asarray(table, jnp.bfloat16)
    screen, rows = _screen(table)
    assert len(np.unique(np.asarray(screen), axis=0)) == 1  # the screen sees one row
    x = jnp.asarray(rng.standard_normal((4, k)), jnp.bfloat16).at[:, 0].set(0)
    want = _screened_argmax(x, table)
    assert (want != 0).all()  # the noise decides, not the row order
    np.testing.assert_array_equal(np.asarray(cpu_kernels.screen_argmax(x, table, screen, rows)), want)
    with_nan = table.at[7, 3].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.screen_argmax(x, with_nan, *_screen(with_nan))),
                                  _screened_argmax(x, with_nan))
    # a row that rounds down by 7/16 of its coarse step (its first value, against x's zero, sets the step)
    # screens at 0 while its exact sum, 1.75, beats the rest, which screen exactly at 1.625: only the bound
    # keeps it among the rows summed
    coarse = np.full((2, 65), 13 * 2.0**-9, np.float32)
    coarse[1] = 7 * 2.0**-8
    coarse[1, 0] = 127 * 2.0**-4
    coarse = jnp.asarray(np.concatenate([np.repeat(coarse[:1], 500, axis=0), coarse[1:]]), jnp.bfloat16)
    ones = jnp.ones((1, 65), jnp.bfloat16).at[0, 0].set(0)
    assert int(_screened_argmax(ones, coarse)[0]) == 500
    assert int(cpu_kernels.screen_argmax(ones, coarse, *_screen(coarse))[0]) == 500
    infinite = x.at[1, 5].set(jnp.inf)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.screen_argmax(infinite, table, screen, rows)),
                                  _screened_argmax(infinite, table))


# compiler flag: the CPU flag it turns off
VARIANTS = {"-mno-amx-tile": "amx_bf16", "-mno-avx512bf16": "avx512_bf16", "-mno-avx512f": "avx512f"}


def test_the_gemm_takes_amx_tiles_where_the_cpu_has_them(monkeypatch):
    """On a CPU with AMX-BF16 (Intel Sapphire Rapids and later) the GEMM's pair panels go through AMX tiles,
    so the pair cases above run them (the no-AMX build checks the AVX-512 pair tiles); auto then picks pairs."""
    if "amx_bf16" not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip("this CPU has no AMX-BF16")
    assert cpu_kernels.amx_tiles()
    monkeypatch.setenv("GEMMA3_BF16_GEMM", "auto")
    cpu_kernels.float32_gemm.cache_clear()
    try:
        assert not cpu_kernels.float32_gemm()
    finally:
        cpu_kernels.float32_gemm.cache_clear()



@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set flags")
@pytest.mark.parametrize("flags", VARIANTS)
def test_the_builds_for_cpus_without_these_instructions(flags, tmp_path):
    """A CPU with AMX-BF16 multiplies the GEMM's pairs in AMX tiles, one with AVX512-BF16 by pair products
    (vdpbf16ps), one with AVX-512 fills sixteen-lane float32 panels in the GEMM; the loops and panels other
    CPUs run (AVX512-BF16 without AMX, AVX-512 without BF16, and eight lanes: AVX2) are built here with those
    instruction sets turned off and checked by the same tests:
    products of every row count, the GEMM, and attention. A CPU without the instructions runs that build
    already (the tests above)."""
    if VARIANTS[flags] not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip(f"this CPU has no {VARIANTS[flags]}: its own build is the one without it")
    chosen = "builds_here or match_float64 or prefill or attention_matches or without_a_mask or split or screen"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", chosen],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "GEMMA3_KERNEL_CACHE_DIR": str(tmp_path), "GEMMA3_KERNEL_FLAGS": flags})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    # the build, 16 decode-sized products, 4 GEMMs, the GEMM's choice, 4 prefill attentions (the last three each as
    # pairs and as float32; without AVX512-BF16 the pair cases skip: 9), 18 attentions, 4 without a mask, 4 of the
    # split head's products and argmax, 4 of the screened head's argmax (vpdpbusd, or vpmaddubsw without AVX-512)
    pairs = flags == "-mno-amx-tile"
    passed, skipped = (61 if pairs else 52) + 4, 0 if pairs else 9
    want = f"{passed} passed" + (f", {skipped} skipped" if skipped else "")
    assert want in done.stdout, done.stdout[-3000:]


def _attention64(q, keys, values, visible):
    """softmax(q k^T, masked with float32's lowest as the einsum path masks) v in float64, per kv head."""
    b, t, n, h = q.shape
    kh = keys.shape[2]
    k64 = np.asarray(jnp.asarray(keys).view(jnp.bfloat16) if keys.dtype == jnp.uint16 else keys, np.float64)[:b]
    v64 = np.asarray(jnp.asarray(values).view(jnp.bfloat16) if values.dtype == jnp.uint16 else values,
                     np.float64)[:b]
    qg = np.asarray(q, np.float64).reshape(b, t, kh, n // kh, h)
    s = np.einsum("btkgh,bskh->btkgs", qg, k64)
    s = np.where(np.asarray(visible)[:, :, None, None, :], s, np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("btkgs,bskh->btkgh", p, v64).reshape(b, t, n, h)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint16"])  # uint16: a bfloat16 cache as its bits
@pytest.mark.parametrize("b,rows,t,n,kh,s,h", [
    (1, 1, 1, 4, 1, 256, 256),  # gemma-3-270m/1b decode: 4 heads over one kv head, entries split in two
    (3, 5, 2, 8, 2, 37, 20),  # rows of the cache beyond the batch, two tokens, odd entry count and depth
    (2, 2, 1, 16, 4, 9, 64),  # more (row, kv head) pairs than threads
    (1, 1, 8, 12, 1, 700, 16),  # 96 query rows: groups of eight and a rest
    (1, 1, 128, 4, 1, 128, 256),  # a 270m prefill chunk attending to itself: the GEMM path in bfloat16
    (2, 2, 33, 6, 2, 65, 24),  # odd token and entry counts: row blocks, tiles and panels with rests
])
def test_attention_matches_float64(dtype, b, rows, t, n, kh, s, h):
    """Scores, mask, softmax and values in the kernel against float64, with float32 queries and, for a
    bfloat16 cache, bfloat16 ones too (many of them take the kernel's GEMM); a fully
    masked query row averages every entry (as the einsum path's softmax over equal masked scores does)."""
    rng = np.random.default_rng(b * 1000 + s)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)) / np.sqrt(h), jnp.float32)
    store = jnp.bfloat16 if dtype != "float32" else jnp.float32
    keys = jnp.asarray(rng.standard_normal((rows, s, kh, h)), store)
    values = jnp.asarray(rng.standard_normal((rows, s, kh, h)), store)
    if dtype == "uint16":
        keys, values = keys.view(jnp.uint16), values.view(jnp.uint16)
    queries = [q]
    if dtype != "float32":
        queries = [q.astype(jnp.bfloat16).astype(jnp.float32), q.astype(jnp.bfloat16)]  # a bfloat16 model's
    visible = rng.random((b, t, s)) < 0.7
    visible[0, 0, :] = False
    want = _attention64(queries[0], keys, values, visible)
    for query in queries:
        if (query.dtype == jnp.float32) == (dtype == "float32"):  # a model's own pairing (the kernel takes both)
            assert cpu_kernels.attention_applies(query, keys)
        got = np.asarray(jax.jit(cpu_kernels.attention)(query, keys, values, jnp.asarray(visible)))
        assert got.shape == want.shape == (b, t, n, h)
        tol = 1e-5 if dtype == "float32" else 8e-3  # bfloat16: the probabilities are rounded, as the einsum path does
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,t,n,h", [(2, 100, 3, 72), (1, 5, 2, 40)])  # SigLIP's heads of 72 (AMX pads them to
# whole tiles), row blocks and a rest; and a few rows (the streaming path)
def test_attention_without_a_mask_sees_every_entry(dtype, b, t, n, h):
    """visible=None (SigLIP's bidirectional patches): no mask is built or read, and every entry counts."""
    rng = np.random.default_rng(t)
    q, keys, values = (jnp.asarray(rng.standard_normal((b, t, n, h)) / np.sqrt(h), dtype) for _ in range(3))
    want = _attention64(q.astype(jnp.float32), keys, values, np.ones((b, t, t), bool))
    assert cpu_kernels.attention_applies(q, keys)
    got = np.asarray(jax.jit(lambda *args: cpu_kernels.attention(*args, None))(q, keys, values))
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("window", [None, 90])
def test_prefill_attention_reads_only_what_each_block_sees(window, dtype, bf16_gemm):
    """A prefill chunk after 100 cached entries, causal (and within a sliding window's band): the GEMM path
    multiplies each block of query rows against the entries it sees alone (bfloat16 as pairs or float32
    FMAs, float32 as float32 FMAs), and matches float64 over every entry; a block holding a row that sees
    nothing takes every entry (that row averages them all)."""
    rng = np.random.default_rng(7)
    b, t, n, kh, h, cached = 1, 600, 2, 1, 64, 100
    s = cached + t
    q = jnp.asarray(rng.standard_normal((b, t, n, h)) / np.sqrt(h), dtype)
    keys = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
    values = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
    pos, entry = np.arange(t)[:, None] + cached, np.arange(s)[None, :]
    visible = (entry <= pos) & (True if window is None else entry > pos - window)
    visible = np.broadcast_to(visible, (b, t, s)).copy()
    visible[0, 300] = False
    want = _attention64(q.astype(jnp.float32), keys, values, visible)
    call = jax.jit(lambda *args: cpu_kernels.attention(*args))  # traced anew: the choice is read when tracing
    assert cpu_kernels.attention_applies(q, keys)
    assert ("float32_gemm = 1" in call.lower(q, keys, values, jnp.asarray(visible)).as_text()) == (
        bf16_gemm == "float32" and dtype == jnp.bfloat16)
    got = np.asarray(call(q, keys, values, jnp.asarray(visible)))
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_model_attends_in_the_kernel_as_it_does_through_xla(dtype):
    """A prefill into a cache and the decode steps after it (the kernel, where it applies) give the logits of
    a forward without a cache (always XLA's einsums), in float32 and bfloat16 (prefill through the kernel's
    GEMM), with image-free padding on the left."""
    from flax import nnx

    from gemma3 import Gemma3ForCausalLM, Gemma3TextConfig
    from gemma3 import cache as kv
    from tests.make_checkpoints import TEXT_BASE

    model = Gemma3ForCausalLM(Gemma3TextConfig.from_dict({**TEXT_BASE, "vocab_size": 512}), dtype=dtype,
                              rngs=nnx.Rngs(3))
    ids = jnp.asarray(np.random.default_rng(5).integers(3, 512, (2, 20)), jnp.int32)
    mask = jnp.ones((2, 20), bool).at[1, :3].set(False)
    want = np.asarray(model(input_ids=ids, attention_mask=mask).logits, np.float32)
    cache = model.init_cache(2, 32)
    out = jax.jit(lambda c: model(input_ids=ids[:, :17], attention_mask=mask[:, :17],
                                  past_key_values=kv.emptied(c)))(cache)
    got = [np.asarray(out.logits, np.float32)]
    cache = out.past_key_values
    step = jax.jit(lambda i, c: model(input_ids=i, past_key_values=c))
    for t in range(17, 20):
        out = step(ids[:, t:t + 1], cache)
        got.append(np.asarray(out.logits, np.float32))
        cache = out.past_key_values
    got = np.concatenate(got, axis=1)
    tol = 2e-4 if dtype == jnp.float32 else 3e-2  # bfloat16: rounded in other places by the two paths
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[0], want[0], atol=tol * scale)
    np.testing.assert_allclose(got[1, 3:], want[1, 3:], atol=tol * scale)  # the padding's own logits differ


def test_attention_derivatives_flow_through_xla():
    """The kernel has no derivative of its own: jax.grad through a model's call of it takes XLA's einsums,
    which agree with finite differences of the kernel's own forward."""
    from jax.test_util import check_grads

    from gemma3.text import kernel_attention

    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((1, 2, 4, 16)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((2, 9, 2, 16)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((2, 9, 2, 16)), jnp.float32)
    visible = jnp.asarray(rng.random((1, 2, 9)) < 0.7)
    check_grads(lambda q, k, v: kernel_attention(q, k, v, visible), (q, keys, values), order=1,
                modes=("fwd", "rev"), atol=2e-2, rtol=2e-2, eps=1e-2)
