"""bench/kernel_ops.py at small sizes, run as users run it: a table of the kernel's prefill ops against XLA's,
where bfloat16 products are the kernel's GEMM and float32 ones stay with XLA (so have no row)."""

import os
import re
import subprocess
import sys

from tests.services import ROOT


def test_bench_kernel_ops_small():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the benchmarks run
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_ops.py"), "--shapes", "270m",
                           "--rows", "16", "--tokens", "20", "--batches", "1,2", "--window", "8"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = re.findall(r"^\| (.+?) \| (bfloat16|float32) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", proc.stdout, re.M)
    ops = {(label, dtype) for label, dtype, *_ in rows}
    assert ops == {("270m layer products, 16 rows", "bfloat16"),
                   *((f"attention B{b} T20 {kind}", d) for b in (1, 2) for kind in ("causal", "window 8")
                     for d in ("bfloat16", "float32"))}, proc.stdout
    assert all(float(kernel) > 0 and float(xla) > 0 for *_, kernel, xla, _ in rows), proc.stdout
