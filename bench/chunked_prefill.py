"""What prefilling long prompts a chunk at a time costs and buys: the serving engine in one process (CPU).

    python bench/chunked_prefill.py --workdir /tmp/bw-work                 # gemma-3-270m shapes, bfloat16
    python bench/chunked_prefill.py --shape 1b --chunks 0,512 --prompt 1536

For each ``--chunks`` setting (0: whole prompts, the engine before chunking) an ``Engine`` over the same
loaded model (bench/model.py's random checkpoint), in turns, ``--rounds`` times:

* **alone**: the time to first token of a lone ``--prompt``-token prompt (the cost of chunking: more
  device calls, and each later chunk attends to the cache the earlier ones wrote);
* **under load**: ``--streams`` requests stream tokens (greedy, short prompts), then the long prompt comes.
  Its time to first token, and the running streams' longest wait between two of their tokens while it
  prefills (the stall chunking bounds), with the tokens each stream got meanwhile; and the time to first
  token of a short prompt that comes 50 ms after the long one (which may go between its chunks).

Medians over the rounds. Run it alone (the machine is shared and noisy: only ratios within one run count);
the findings go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def timed_tokens(request, stamps: list[float]) -> threading.Thread:
    """A thread that appends the arrival time of each of ``request``'s tokens to ``stamps``."""
    from lm_worker.engine import Token

    def read():
        for event in request.stream(timeout=600):
            if isinstance(event, Token):
                stamps.append(time.perf_counter())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def first_token_seconds(engine, prompt: list[int]) -> float:
    from lm_worker.engine import Request

    start = time.perf_counter()
    stamps: list[float] = []
    timed_tokens(engine.submit(Request(prompt_ids=prompt, max_new_tokens=1, logprobs=False)), stamps).join()
    return stamps[0] - start


def under_load(engine, prompt: list[int], streams: int, vocab: int) -> dict:
    """The long prompt's time to first token while ``streams`` requests decode, and their waits meanwhile."""
    import numpy as np

    from lm_worker.engine import Request

    rng = np.random.default_rng(1)
    running, stamps, readers = [], [], []
    for _ in range(streams):
        r = engine.submit(Request(prompt_ids=rng.integers(3, vocab, 16).tolist(), logprobs=False,
                                  max_new_tokens=engine.max_length - 16))
        running.append(r)
        stamps.append([])
        readers.append(timed_tokens(r, stamps[-1]))
    while min(len(s) for s in stamps) < 8:  # all decoding, past their first bursts
        time.sleep(0.01)
    start = time.perf_counter()
    long_stamps: list[float] = []
    long = timed_tokens(engine.submit(Request(prompt_ids=prompt, max_new_tokens=1, logprobs=False)), long_stamps)
    time.sleep(0.05)  # a short request comes while the long one prefills
    short = first_token_seconds(engine, rng.integers(3, vocab, 16).tolist())
    long.join()
    ttft = long_stamps[0] - start
    end = start + ttft
    while min(s[-1] for s in stamps) < end:  # each stream's first token after the prefill ends its wait
        time.sleep(0.01)
    for r in running:
        r.cancel()
    for t in readers:
        t.join()
    waits = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > start and a < end]
    during = statistics.mean(sum(start < t < end for t in s) for s in stamps)
    return {"ttft": ttft, "longest_wait": max(waits), "tokens_during": during, "short_ttft": short}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="270m", help="bench/model.py's random checkpoint of this shape (270m, 1b)")
    p.add_argument("--workdir", default="/tmp/bw-work", help="where bench/model.py keeps (or writes) it")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--chunks", default="0,512,256", help="prefill_chunk settings (0: whole prompts)")
    p.add_argument("--prompt", type=int, default=2000, help="the long prompt's tokens")
    p.add_argument("--streams", type=int, default=4, help="requests decoding when it comes")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.model import ensure_checkpoint
    from gemma3 import Gemma3ForCausalLM
    from lm_worker.engine import Engine

    path = ensure_checkpoint(args.shape, args.workdir, 0)
    model = Gemma3ForCausalLM.from_pretrained(path, dtype=getattr(jnp, args.dtype), progress=False)
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(0).integers(3, vocab, args.prompt).tolist()
    chunks = [int(c) for c in args.chunks.split(",")]
    max_length = 1 << (args.prompt + 64).bit_length()
    engines = {c: Engine(model, num_slots=args.slots, max_length=max_length, prefill_chunk=c, prefix_rows=0).start()
               for c in chunks}  # (no prefix cache: the long prompt comes again each round, prefilled anew)
    print(f"# {args.shape} {args.dtype}, {jax.devices()[0].device_kind}, max_length {max_length}, "
          f"prompt {args.prompt}, {args.streams} streams", file=sys.stderr)
    for engine in engines.values():  # compiles every program the runs take
        first_token_seconds(engine, prompt)
        under_load(engine, prompt, args.streams, vocab)
    runs = {c: [] for c in chunks}
    for i in range(args.rounds):
        for c, engine in engines.items():
            alone = first_token_seconds(engine, prompt)
            runs[c].append({"alone": alone, **under_load(engine, prompt, args.streams, vocab)})
            print(f"# round {i} chunk {c}: {runs[c][-1] | {'alone': alone}}", file=sys.stderr)
    for engine in engines.values():
        engine.stop()

    def med(c, key, scale=1e3):
        return statistics.median(r[key] for r in runs[c]) * scale

    print(f"{args.shape}, {args.dtype}, prompt of {args.prompt} tokens, {args.streams} streams decoding, "
          f"medians of {args.rounds} rounds (ms)\n")
    print("| prefill_chunk | alone: TTFT | under load: TTFT | streams' longest wait | tokens a stream got meanwhile "
          "| a short prompt's TTFT meanwhile |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in chunks:
        print(f"| {c or 'whole prompt'} | {med(c, 'alone'):.0f} | {med(c, 'ttft'):.0f} | "
              f"{med(c, 'longest_wait'):.0f} | {med(c, 'tokens_during', 1):.1f} | {med(c, 'short_ttft'):.0f} |")


if __name__ == "__main__":
    main()
