"""bench/op_profile.py on a tiny checkpoint, run as users run it: a decode step and a prefill, each a table of
ops whose largest entries are our kernel's calls (products and attention) or XLA's own."""

import os
import re
import subprocess
import sys

from tests.make_checkpoints import save_text_checkpoint
from tests.services import ROOT


def test_bench_op_profile_tiny(tmp_path):
    # wider than the suite's tiny model: a step of milliseconds, so that 64 steps stand out of a noisy host's
    # jitter in generate's fixed costs (at the tiny width 64 more steps sometimes took less time than none)
    save_text_checkpoint(str(tmp_path / "ckpt"), hidden_size=512, intermediate_size=1536, vocab_size=8192)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the benchmarks run
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "op_profile.py"), "--checkpoint",
                           str(tmp_path / "ckpt"), "--prompt-len", "12", "--new-tokens", "64", "--top", "5"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    step = re.search(r"one decode step: (-?[\d.]+) ms wall, (-?[\d.]+) ms in ops", out)
    prefill = re.search(r"prefill of 12 tokens: ([\d.]+) ms wall, ([\d.]+) ms in ops", out)
    assert step and prefill, out
    assert all(float(x) > 0 for x in prefill.groups()), out
    # the decode step's products and attention are the kernel's (the float32 decode path on the CPU); only what
    # they are is asserted, not their time against noise
    assert re.search(r"\| ffi_call \| [\d.]+ \|", out.split("prefill of")[0]), out
