"""Where a decode step and a prefill of our library spend their time, from jax.profiler traces (CPU).

    python bench/op_profile.py --checkpoint DIR --dtype float32 --batch 1          # any Gemma 3 text checkpoint
    python bench/op_profile.py --shape 270m --workdir /tmp/bw-work --dtype bfloat16 --batch 8

A decode step: ``generate`` of 2N and of N new tokens (compiled first, then each traced three times, the
least of each kept); the difference of every op's total time between the two, divided by N, is one step
without the prefill or the first call's fixed costs. Prefill: the jitted prefill of ``generate`` on the
same prompt, traced once. Ops are named as XLA's CPU thunks: ``ffi_call`` are our kernel's calls
(products and attention, ``gemma3/kernels/rows_matmul.cc``), ``ynn_fusion`` XLA's library dots, the rest
XLA's own fusions. Times are summed over XLA's threads, so a step's ops may add up to more than its wall
time. Run it alone: the machine is shared and noisy (bench/RESULTS.md). The findings go to
bench/RESULTS.md. (Not "profile.py": scripts run with bench/ on sys.path, where that name hid the
standard library's profile module.)"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_SKIPPED = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "end: ")


def op_times(trace_dir: str) -> collections.Counter:
    """Total nanoseconds per op kind (the thunk's name without its number) on XLA's threads."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    times = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for event in line.events:
                if not event.name.startswith(_SKIPPED):
                    times[event.name.rstrip("0123456789").rstrip(".")] += event.duration_ns
    return times


def traced(fn, trace_dir: str) -> tuple[float, collections.Counter]:
    """Wall seconds of fn() under the profiler, and its op times."""
    import jax

    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    return wall, op_times(trace_dir)


def best_of(fn, trace_dir: str, repeats: int) -> tuple[float, collections.Counter]:
    """``traced`` ``repeats`` times: the least wall time, and each op's least time (a tiny model's few
    milliseconds move by as much between single traces)."""
    runs = [traced(fn, os.path.join(trace_dir, str(i))) for i in range(repeats)]
    ops = set.intersection(*(set(times) for _, times in runs))
    return min(wall for wall, _ in runs), collections.Counter({k: min(times[k] for _, times in runs) for k in ops})


def table(title: str, wall_ms: float, times: dict, top: int) -> str:
    """Markdown: the ops' milliseconds (largest first) and their share of the wall time."""
    lines = [f"{title}: {wall_ms:.2f} ms wall, {sum(times.values()) / 1e6:.2f} ms in ops (summed over threads)",
             "", "| op | ms | % of wall |", "|---|---:|---:|"]
    for name, ns in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name} | {ns / 1e6:.3f} | {100 * ns / 1e6 / wall_ms:.1f}% |")
    return "\n".join(lines)


def profile(checkpoint: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, top: int = 15,
            repeats: int = 3) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gemma3 import Gemma3ForCausalLM
    from gemma3.generation import _compiled

    model = Gemma3ForCausalLM.from_pretrained(checkpoint, dtype=getattr(jnp, dtype), progress=False)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(3, vocab, size=(batch, prompt_len)).astype(np.int32)

    def run(n):
        return model.generate(ids, max_new_tokens=n, eos_token_id=[]).new_tokens

    run(new_tokens), run(2 * new_tokens)  # compile both
    with tempfile.TemporaryDirectory() as d:
        short_s, short = best_of(lambda: run(new_tokens), os.path.join(d, "short"), repeats)
        long_s, long = best_of(lambda: run(2 * new_tokens), os.path.join(d, "long"), repeats)
        step = {k: (long[k] - short.get(k, 0)) / new_tokens for k in long}
        step = {k: v for k, v in step.items() if v > 0}

        kwargs = model.prepare_inputs_for_generation(ids, max_length=prompt_len + 2 * new_tokens)
        graphdef, state = nnx.split(model)
        prefill = _compiled(graphdef)[0]

        def prefill_once():
            kw = model.prepare_inputs_for_generation(ids, max_length=prompt_len + 2 * new_tokens)
            jax.block_until_ready(prefill(state, ids, kw["attention_mask"], kw["position_ids"],
                                          kw["past_key_values"], {}))

        jax.block_until_ready(kwargs)
        prefill_once()  # compiles it for this cache length (generate's may differ): the trace holds no compile
        prefill_s, prefill_ops = traced(prefill_once, os.path.join(d, "prefill"))
    step_ms = (long_s - short_s) / new_tokens * 1e3
    head = (f"{os.path.basename(checkpoint.rstrip('/'))}, {dtype}, batch {batch}, prompt {prompt_len}, "
            f"generate {new_tokens} and {2 * new_tokens} new tokens: {short_s:.3f} s and {long_s:.3f} s")
    return "\n\n".join([head, table("one decode step", step_ms, step, top),
                        table(f"prefill of {prompt_len} tokens", prefill_s * 1e3, prefill_ops, top)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="a Gemma 3 text checkpoint directory")
    p.add_argument("--shape", help="instead: bench/model.py's random checkpoint of this shape (270m, 1b)")
    p.add_argument("--workdir", default=None, help="where bench/model.py keeps (or writes) that checkpoint")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="N: generate N and 2N, the difference is N steps")
    p.add_argument("--top", type=int, default=15, help="ops listed per table")
    p.add_argument("--repeats", type=int, default=3, help="traces of each generate (the least of each is kept)")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.shape is None):
        p.error("give --checkpoint or --shape")
    checkpoint = args.checkpoint
    if checkpoint is None:
        from bench.model import ensure_checkpoint

        checkpoint = ensure_checkpoint(args.shape, args.workdir or tempfile.mkdtemp(prefix="gemma3-profile-"), 0)
    print(profile(checkpoint, args.dtype, args.batch, args.prompt_len, args.new_tokens, args.top, args.repeats))


if __name__ == "__main__":
    main()
