"""Decode-sized products (1 to 8 rows) on XLA's CPU backend, by our own kernel, bfloat16 products of any row
count (prefill's GEMM), and attention over a cache (`attention`).

At a few rows a product reads every weight once and is bound by memory bandwidth, which XLA's CPU dot
does not reach (float32 layer products at 60-75% of the kernel's speed, bfloat16 ones 2-5x slower: see
bench/RESULTS.md). `kernels/rows_matmul.cc` streams the weights once across XLA's own intra-op threads.
At prefill sizes XLA's bfloat16 GEMM reached 0.6-0.9x of oneDNN's; the kernel's packed GEMM (bfloat16
pair products where the CPU has AVX512-BF16, in AMX tiles where it has AMX-BF16, float32 FMAs on widened
panels elsewhere) matches oneDNN there. Where that GEMM multiplies pairs (AMX tiles, or vdpbf16ps on
Zen 4 and 5), bfloat16 layer weights can be kept as its panels (`to_panels`, `kept_matmul`), so that no
product packs them on every call.
It is compiled on first use with the machine's compiler and `-march=native`, cached by source, compiler
and CPU, and registered as an XLA FFI target; without a compiler (or with ``GEMMA3_CPU_KERNELS=0``)
products fall back to XLA's dot. ``GEMMA3_KERNEL_FLAGS`` adds compiler flags (``-mno-avx512bf16``,
``-mno-avx512f``: the loops and GEMM panels of CPUs without those instructions). Accelerators never use it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

MAX_ROWS = 8
FLOAT32_GEMM_ROWS = 32  # fewer rows stay pairs (where `float32_gemm`): widening the panels costs more there
TARGET = "gemma3_rows_matmul"
ATTENTION_TARGET = "gemma3_attention"
SPLIT_PRODUCT_TARGET = "gemma3_split_product"
SPLIT_ARGMAX_TARGET = "gemma3_split_argmax"
SCREEN_ARGMAX_TARGET = "gemma3_screen_argmax"
KEPT_TARGET = "gemma3_kept_matmul"
YIELD_TARGET = "gemma3_yield_flag"
PANEL_COLUMNS = 64  # kernels/rows_matmul.cc's kPanelCols with AVX-512
YIELD_FLAGS = 64  # kernels/rows_matmul.cc's kYieldFlags
SOURCE = Path(__file__).with_name("kernels") / "rows_matmul.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("GEMMA3_KERNEL_CACHE_DIR") or Path(root) / "gemma3-serve" / "kernels")


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str | None = None) -> Path:
    """The kernel's shared library, compiled once per source, compiler, jaxlib headers and CPU."""
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    include = jax.ffi.include_dir()
    flags = (*FLAGS, *shlex.split(os.environ.get("GEMMA3_KERNEL_FLAGS", "")))
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), include, jax.__version__,
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"rows_matmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # other processes may build beside us
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, f"-I{include}", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The kernel, built and registered (once per process); None where it cannot be."""
    if os.environ.get("GEMMA3_CPU_KERNELS", "1").lower() in ("0", "false", "off", "no"):
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.Gemma3RowsMatmul), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.Gemma3Attention), platform="cpu")
        jax.ffi.register_ffi_target(SPLIT_PRODUCT_TARGET, jax.ffi.pycapsule(library.Gemma3SplitProduct),
                                    platform="cpu")
        jax.ffi.register_ffi_target(SPLIT_ARGMAX_TARGET, jax.ffi.pycapsule(library.Gemma3SplitArgmax),
                                    platform="cpu")
        jax.ffi.register_ffi_target(KEPT_TARGET, jax.ffi.pycapsule(library.Gemma3KeptMatmul), platform="cpu")
        jax.ffi.register_ffi_target(YIELD_TARGET, jax.ffi.pycapsule(library.Gemma3YieldFlag), platform="cpu")
        if library.Gemma3Int8Screen():
            jax.ffi.register_ffi_target(SCREEN_ARGMAX_TARGET, jax.ffi.pycapsule(library.Gemma3ScreenArgmax),
                                        platform="cpu")
    except Exception as error:  # noqa: BLE001 - any failure means XLA's dot, which is always correct
        log.warning("CPU product kernel unavailable, using XLA's dot: %s", error)
        return None
    return library


def available() -> bool:
    """Whether the kernel is built and registered; False where it cannot be."""
    return _library() is not None


@functools.cache
def pair_products() -> bool:
    """Whether the kernel multiplies bfloat16 pairs (the CPU has AVX512-BF16); elsewhere its GEMM widens
    bfloat16 panels to float32 (`float32_gemm`)."""
    library = _library()
    return library is not None and bool(library.Gemma3PairProducts())


@functools.cache
def int8_screen() -> bool:
    """Whether the kernel multiplies int8 rows, which a bfloat16 head's greedy screen needs (`screen_argmax`):
    x86 CPUs with AVX512-VNNI (vpdpbusd) or with AVX2 and FMA (vpmaddubsw, x in coarser steps)."""
    library = _library()
    return library is not None and bool(library.Gemma3Int8Screen())


@functools.cache
def amx_tiles() -> bool:
    """Whether the GEMM multiplies its bfloat16 pair panels in AMX tiles (Intel Sapphire Rapids and later:
    the CPU has AMX-BF16 and Linux grants the tiles; ``GEMMA3_AMX=0`` turns them off). Those products then
    run as pairs at any row count (`float32_gemm` is False)."""
    library = _library()
    return library is not None and bool(library.Gemma3AmxTiles())


@functools.cache
def float32_gemm() -> bool:
    """Whether bfloat16 products of FLOAT32_GEMM_ROWS rows or more (prefill's, and attention over a prefill
    chunk) run as float32 FMAs on panels widened as they are packed, rather than as bfloat16 pairs: always
    where the CPU has no pair products. ``GEMMA3_BF16_GEMM``: ``pairs``, ``float32``, or ``auto`` (the
    default): pairs where the GEMM has AMX tiles (`amx_tiles`), else whichever this CPU ran faster when the
    kernel timed both once, under a millisecond. Zen 4 multiplies pairs twice as fast as floats; an Intel
    Emerald Rapids without AMX ran the 1b prefill's products 1.7x faster as floats (its vdpbf16ps has half
    its FMA throughput)."""
    choice = os.environ.get("GEMMA3_BF16_GEMM", "auto")
    if choice not in ("auto", "pairs", "float32"):
        raise ValueError(f"GEMMA3_BF16_GEMM must be auto, pairs or float32, got {choice!r}")
    if not pair_products():
        return True
    if choice == "auto":
        choice = "pairs" if _library().Gemma3PairsOutpaceFloat32() else "float32"
        log.info("bfloat16 prefill products as %s (timed on this CPU)", choice)
    return choice == "float32"


def keeps_panels() -> bool:
    """Whether bfloat16 layer weights are worth keeping as the GEMM's pair panels (`to_panels`): where its products
    multiply pairs (AMX tiles, or vdpbf16ps where that outpaces float32 FMAs: Zen 4 and 5). With AMX tiles, packing
    them from memory took 40-56% of a 128-row product, and the tiles read kept panels at any row count; on a Zen 4
    kept panels ran prefill products 3-14% faster and a batch's 8-row products up to 1.7x, one row as fast
    (bench/RESULTS.md, sessions 37 and 39). ``GEMMA3_KEEP_PANELS=0`` keeps them as they are."""
    return (pair_products() and not float32_gemm()
            and os.environ.get("GEMMA3_KEEP_PANELS", "1").lower() not in ("0", "false", "off", "no"))


def panels_fit(w: jax.Array) -> bool:
    """Whether (in, out) weights ``w`` can be kept as panels: bfloat16, 2-D, an even depth and whole panels."""
    return w.ndim == 2 and w.dtype == jnp.bfloat16 and w.shape[0] % 2 == 0 and w.shape[1] % PANEL_COLUMNS == 0


def to_panels(w: jax.Array) -> jax.Array:
    """(K, N) weights as panels (N / 64, K / 2, 128): panel p, pair row q holds (w[2q, n], w[2q + 1, n]) for its
    64 columns n in turn, each panel's whole depth in one run (what the GEMM packs on every call otherwise).
    A jax or numpy array (then a view until copied)."""
    k, n = w.shape
    return w.reshape(k // 2, 2, n // PANEL_COLUMNS, PANEL_COLUMNS).transpose(2, 0, 3, 1).reshape(
        n // PANEL_COLUMNS, k // 2, 2 * PANEL_COLUMNS)


def from_panels(kept: jax.Array) -> jax.Array:
    """The (K, N) weights of `to_panels`' panels."""
    p, q, _ = kept.shape
    return kept.reshape(p, q, PANEL_COLUMNS, 2).transpose(1, 3, 0, 2).reshape(2 * q, p * PANEL_COLUMNS)


@jax.custom_jvp
def _kept_product(x: jax.Array, kept: jax.Array) -> jax.Array:
    if not pair_products():  # without the kernel or its pair products (GEMMA3_CPU_KERNELS=0): XLA's dot
        return jax.lax.dot_general(x, from_panels(kept), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return _ffi_call(KEPT_TARGET, (x.shape[0], kept.shape[0] * PANEL_COLUMNS), jnp.float32)(x, kept)


@_kept_product.defjvp
def _kept_product_jvp(primals, tangents):
    """Derivatives through XLA's dot on the weights unpacked (a reshape and transpose)."""
    x, kept = primals
    dx, dkept = tangents
    dims = (((1,), (0,)), ((), ()))
    tangent = (jax.lax.dot_general(dx, from_panels(kept), dims, preferred_element_type=jnp.float32)
               + jax.lax.dot_general(x, from_panels(dkept), dims, preferred_element_type=jnp.float32))
    return _kept_product(x, kept), tangent


def kept_matmul(lhs: jax.Array, kept: jax.Array, out_dtype=None) -> jax.Array:
    """``lhs @ w`` for w kept as `to_panels`, summed in float32, in ``out_dtype`` (lhs's)."""
    out = _kept_product(lhs.reshape(-1, lhs.shape[-1]).astype(kept.dtype), kept)
    return out.reshape(*lhs.shape[:-1], out.shape[-1]).astype(out_dtype or lhs.dtype)


def applies(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    """Whether ``dot_general(lhs, rhs, dimension_numbers)`` is a product the kernel runs faster than XLA:
    on the CPU backend, at most 8 rows of lhs against a 2-D weight matrix of the same dtype, float32 or
    bfloat16, in either layout; or more rows in bfloat16 with (in, out) weights (the GEMM).
    (XLA's float32 product with the (out, in) LM head matched the kernel on a Zen 3 CPU; on a Zen 4 it
    read the 270m head at 21.5 GB/s against the kernel's 28 at one row, and at 11.1 against 11.9-22.6
    GB/s at 2-8 rows: bench/RESULTS.md.)"""
    (contract_l, contract_r), batch = dimension_numbers
    if batch != ((), ()) or rhs.ndim != 2 or tuple(contract_l) != (lhs.ndim - 1,) or len(contract_r) != 1:
        return False
    if lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.float32, jnp.bfloat16):
        return False
    rows = int(np.prod(lhs.shape[:-1]))
    if rows > MAX_ROWS:  # prefill: bfloat16 with (in, out) weights
        return (lhs.dtype == jnp.bfloat16 and tuple(contract_r) == (0,) and jax.default_backend() == "cpu"
                and available())
    return rows >= 1 and jax.default_backend() == "cpu" and available()


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _product(x: jax.Array, w: jax.Array, w_layout: int) -> jax.Array:
    n = w.shape[1 - w_layout]
    call = _ffi_call(TARGET, (x.shape[0], n), jnp.float32)
    gemm = x.shape[0] >= FLOAT32_GEMM_ROWS and x.dtype == jnp.bfloat16 and float32_gemm()
    return call(x, w, w_layout=np.int64(w_layout), float32_gemm=np.int64(gemm))


@_product.defjvp
def _product_jvp(w_layout, primals, tangents):
    """Derivatives through XLA's dot (training and `jax.grad` never hit the kernel's missing rule)."""
    x, w = primals
    dx, dw = tangents
    dims = (((1,), (w_layout,)), ((), ()))
    tangent = (jax.lax.dot_general(dx, w, dims, preferred_element_type=jnp.float32)
               + jax.lax.dot_general(x, dw, dims, preferred_element_type=jnp.float32))
    return _product(x, w, w_layout), tangent


def rows_matmul(lhs: jax.Array, rhs: jax.Array, dimension_numbers, out_dtype=None) -> jax.Array:
    """``dot_general`` of a product that `applies`, accumulated in float32, in ``out_dtype`` (lhs's)."""
    (_, contract_r), _ = dimension_numbers
    w_layout = int(contract_r[0])  # 0: rhs is (in, out); 1: rhs is (out, in), the tied embedding
    out = _product(lhs.reshape(-1, lhs.shape[-1]), rhs, w_layout)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1 - w_layout]).astype(out_dtype or lhs.dtype)


def attention_applies(q: jax.Array, keys: jax.Array) -> bool:
    """Whether `attention` takes queries q (B, T, N, H) over ``keys``: on the CPU backend with the kernel, float32
    or bfloat16 alike (a bfloat16 cache may be kept as its bits), for any number of tokens: a decode step's few
    (T <= 8) stream the entries, more (prefill) go through the kernel's GEMM, each block of query rows against
    only the entries it sees."""
    if jax.default_backend() != "cpu" or not available():
        return False
    return (q.dtype, keys.dtype) in ((jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                     (jnp.bfloat16, jnp.uint16))


def attention(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array | None) -> jax.Array:
    """softmax(q k^T masked by ``visible``) v per kv head, in the kernel (float32 sums and softmax), reading
    the keys and values in place.

    q: (B, T, N, H), already scaled; keys, values: (Bc, S, K, H) for Bc >= B, of which the first B rows are
    read: a cache's whole buffers (bfloat16 may be kept as its uint16 bits) or a chunk's own keys; visible:
    (B, T, S), or None where every query sees every entry (SigLIP's patches: no mask of T x S to build and
    read). Returns (B, T, N, H) float32. XLA's CPU dots copied a decode step's keys and values transposed
    every layer, and widened a bfloat16 prefill's to float32 (kernels/rows_matmul.cc). It has no derivative:
    models call it through `gemma3.text.kernel_attention`, whose derivatives are XLA's."""
    call = _ffi_call(ATTENTION_TARGET, q.shape, jnp.float32)
    rows = q.shape[1] * q.shape[2] // keys.shape[2]  # a (row, kv head) pair's query rows
    gemm = rows >= FLOAT32_GEMM_ROWS and q.dtype == jnp.bfloat16 and float32_gemm()
    all_visible = visible is None
    visible = jnp.ones((1, 1, 1), bool) if all_visible else visible.astype(bool)
    return call(q, keys, values, visible, float32_gemm=np.int64(gemm), all_visible=np.int64(all_visible))


def split_product(x: jax.Array, planes: jax.Array) -> jax.Array:
    """x (M, K) float32 times the float32 (N, K) matrix that ``planes`` (2, N, K) uint16 holds as its top and
    bottom halves (`gemma3.text.SplitFloat32Embed`), transposed: (M, N) float32, summed as the kernel sums a
    float32 matrix's rows. Any M: past eight rows, eight at a time over blocks of the planes that stay in L2."""
    return _ffi_call(SPLIT_PRODUCT_TARGET, (x.shape[0], planes.shape[1]), jnp.float32)(x, planes)


def split_argmax(x: jax.Array, planes: jax.Array) -> jax.Array:
    """The argmax over n of `split_product` (M,) int32, exact (the first on ties, NaN largest, as jnp.argmax),
    reading the top plane alone but for the few rows that may hold the maximum (kernels/rows_matmul.cc)."""
    return _ffi_call(SPLIT_ARGMAX_TARGET, (x.shape[0],), jnp.int32)(x, planes)


def screen_argmax(x: jax.Array, table: jax.Array, screen: jax.Array, rows: jax.Array) -> jax.Array:
    """The argmax over n of x (M, K) times the bfloat16 table (N, K) transposed, (M,) int32: of the logits as a
    one-row product sums them and rounds them to bfloat16 (the first on ties, NaN largest, as jnp.argmax),
    reading the int8 ``screen`` (N, K) and its ``rows`` (4, N) (`gemma3.text.HeadScreen`) but for the few table
    rows that may hold the maximum."""
    if not int8_screen():
        raise RuntimeError("the head's int8 screen needs the CPU kernel with AVX512-VNNI or AVX2, unavailable here")
    return _ffi_call(SCREEN_ARGMAX_TARGET, (x.shape[0],), jnp.int32)(x.astype(jnp.bfloat16), table, screen, rows)


def yield_flag(flag: jax.Array, step: jax.Array) -> jax.Array:
    """Whether flag ``flag`` (below YIELD_FLAGS: a value of the program, so one program serves every engine) is set
    when a program reads it at ``step`` (int32 scalars; the result nonzero: set). The step, which the kernel
    does not read, ties each read to its iteration, so that XLA neither hoists one out of a loop nor merges
    two (marking the call as having a side effect would do that too, but jax then dispatches the program
    in Python: 6 ms a call). CPU only."""
    return _ffi_call(YIELD_TARGET, (), jnp.int32)(jnp.asarray(flag, jnp.int32), jnp.asarray(step, jnp.int32))


def set_yield(flag: int, on: bool) -> None:
    """Set or clear flag ``flag`` from any thread, running programs included (see `yield_flag`)."""
    _library().gemma3_set_yield(ctypes.c_int32(flag), ctypes.c_int32(int(on)))


def _ffi_call(target: str, shape: tuple, dtype):
    """A call of one of the kernel's targets, registered first (a caller may come before any `applies`)."""
    if not available():  # (which registers the targets)
        raise RuntimeError(f"{target} needs the CPU kernel, which is unavailable here")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")
