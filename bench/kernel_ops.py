"""The CPU kernel's prefill products and attention against XLA's, op by op, at gemma-3-270m and 1b shapes.

    python bench/kernel_ops.py                       # products at 128 and 1024 rows, attention at 128 and 2048
    python bench/kernel_ops.py --rows 128 --shapes 270m --tokens 128

Products: the text decoder's (in, out) weight products of one layer (q, k/v, o, gate/up, down), random
weights, through `cpu_kernels.rows_matmul` (the kernel's GEMM for bfloat16) and through `lax.dot_general`
(XLA's GEMM), each jitted, best of 7 calls. Attention: a prefill chunk attending to itself causally (and within
a sliding window), 4 query heads over one kv head of 256 as both models have, through `cpu_kernels.attention`
and through `gemma3.text.attend` (the models' XLA path: grouped einsums, a float32 softmax). The ratio is
XLA's time over the kernel's: > 1 means the kernel is faster. Run it alone (the machine is shared and noisy);
the findings go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gemma3 import cpu_kernels  # noqa: E402
from gemma3.text import attend  # noqa: E402

KN = (((1,), (0,)), ((), ()))
# (in, out) of one decoder layer's products: q, k (v alike), o, gate (up alike), down
LAYER = {"270m": [(640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640)],
         "1b": [(1152, 1024), (1152, 256), (1024, 1152), (1152, 6912), (6912, 1152)]}


def best(f, *args, n: int = 7) -> float:
    """The least of n timed calls, after one that compiles."""
    f(*args).block_until_ready()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times)


def products(shapes, rows_list, dtypes):
    rows_out = []
    kernel = jax.jit(lambda x, w: cpu_kernels.rows_matmul(x, w, KN))
    xla = jax.jit(lambda x, w: jax.lax.dot_general(x, w, KN, preferred_element_type=jnp.float32).astype(x.dtype))
    for dtype in dtypes:
        for shape in shapes:
            for rows in rows_list:
                tk = tx = 0.0
                for k, n in LAYER[shape]:
                    rng = np.random.default_rng(k * n)
                    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
                    w = jnp.asarray(rng.standard_normal((k, n)) * 0.05, dtype)
                    if not cpu_kernels.applies(x, w, KN):  # float32 GEMMs stay with XLA: nothing to compare
                        break
                    tk += best(kernel, x, w)
                    tx += best(xla, x, w)
                else:
                    flops = 2 * rows * sum(k * n for k, n in LAYER[shape])
                    rows_out.append((f"{shape} layer products, {rows} rows", jnp.dtype(dtype).name, tk, tx,
                                     flops / tk / 1e9, flops / tx / 1e9))
    return rows_out


def attention(tokens_list, batches, dtypes, window: int):
    rows_out = []
    kernel, xla = jax.jit(cpu_kernels.attention), jax.jit(lambda q, k, v, seen: attend(q, [(k, v, seen)])[0])
    for dtype in dtypes:
        for t in tokens_list:
            for b in batches:
                for win in (None, window) if t > window else (None,):
                    rng = np.random.default_rng(t)
                    q = jnp.asarray(rng.standard_normal((b, t, 4, 256)) / 16, dtype)
                    k = jnp.asarray(rng.standard_normal((b, t, 1, 256)), dtype)
                    v = jnp.asarray(rng.standard_normal((b, t, 1, 256)), dtype)
                    pos = np.arange(t)
                    seen = (pos[None, :] <= pos[:, None]) & (True if win is None else pos[None, :] > pos[:, None] - win)
                    seen = jnp.asarray(np.broadcast_to(seen, (b, t, t)))
                    label = f"attention B{b} T{t}" + (f" window {win}" if win else " causal")
                    rows_out.append((label, jnp.dtype(dtype).name, best(kernel, q, k, v, seen),
                                     best(xla, q, k, v, seen), None, None))
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="270m,1b")
    p.add_argument("--rows", default="128,1024", help="prefill rows of the products (batch x prompt)")
    p.add_argument("--tokens", default="128,2048", help="prefill chunk lengths of the attention")
    p.add_argument("--batches", default="1,8", help="attention batch sizes at the shortest chunk")
    p.add_argument("--window", type=int, default=512, help="a sliding window, for chunks longer than it")
    p.add_argument("--dtypes", default="bfloat16,float32")
    a = p.parse_args()
    if not cpu_kernels.available():
        sys.exit("the CPU kernel is not available here (no compiler, or GEMMA3_CPU_KERNELS=0)")
    dtypes = [jnp.dtype(d) for d in a.dtypes.split(",")]
    tokens = [int(t) for t in a.tokens.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    rows = products(a.shapes.split(","), [int(r) for r in a.rows.split(",")], dtypes)
    for t in tokens:  # every batch at the shortest chunk, batch 1 at longer ones
        rows += attention([t], batches if t == min(tokens) else [1], dtypes, a.window)
    print(f"jax {jax.__version__}; kernel: bfloat16 pair products {cpu_kernels.pair_products()}, "
          f"float32 GEMM for bfloat16 {cpu_kernels.float32_gemm()}\n")
    print("| op | dtype | kernel ms | XLA ms | XLA / kernel | kernel GFLOP/s | XLA GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, dtype, tk, tx, gk, gx in rows:
        rates = f"{gk:.1f} | {gx:.1f}" if gk else "- | -"
        print(f"| {label} | {dtype} | {tk * 1e3:.2f} | {tx * 1e3:.2f} | {tx / tk:.2f} | {rates} |", flush=True)


if __name__ == "__main__":
    main()
