"""What keeping prompts' cache rows buys: the serving engine in one process (CPU), prefix cache on and off.

    python bench/prefix_cache.py --workdir /tmp/bw-work                  # gemma-3-270m shapes, bfloat16
    python bench/prefix_cache.py --shape 1b --system 400 --turns 6

Two engines over the same loaded model (bench/model.py's random checkpoint), ``prefix_rows`` 4 (the LM
worker's default) and 0, each request alone (time to first token, medians over ``--rounds``):

* **system prompt**: chats that share a ``--system``-token system prompt, each with its own
  ``--user``-token question (the prompts fit the 512-token sliding window, so any kept one serves);
* **long system prompt**: the same past the window (``--long-system`` tokens): the second chat keeps its
  row where it parts from the first, and the chats after it start from there;
* **conversation**: one chat's ``--turns`` turns, each prompt the one before, its ``--answer``-token answer
  and a new ``--user``-token question (past the window: only the whole earlier prompt is reused);
* **unrelated**: prompts that share nothing (the store's cost: keys, a match, a row kept).

The engine's own answer with the prefix cache off is the peer: only ratios within one run count (the
machine is shared and noisy); the findings go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.chunked_prefill import first_token_seconds  # noqa: E402

SKIP = {"long system prompt": 2}
"""Requests at the start of a workload that have nothing to start from (1 where not named): left out of its median."""


def workloads(args, vocab: int, round_: int) -> dict[str, list[list[int]]]:
    """Each workload's prompts for one round (new tokens each round: nothing carries over between rounds)."""
    import numpy as np

    rng = np.random.default_rng(100 + round_)
    words = lambda n: rng.integers(3, vocab, n).tolist()  # noqa: E731
    system, long_system = [2] + words(args.system - 1), [2] + words(args.long_system - 1)
    conversation, turns = [2] + words(args.user - 1), []
    for _ in range(args.turns):
        turns.append(list(conversation))
        conversation += words(args.answer) + words(args.user)
    return {"system prompt": [system + words(args.user) for _ in range(args.chats)],
            "long system prompt": [long_system + words(args.user) for _ in range(args.chats + 1)],
            "conversation": turns,
            "unrelated": [[2] + words(args.system + args.user - 1) for _ in range(args.chats)]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="270m", help="bench/model.py's random checkpoint of this shape (270m, 1b)")
    p.add_argument("--workdir", default="/tmp/bw-work", help="where bench/model.py keeps (or writes) it")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--system", type=int, default=400, help="the shared system prompt's tokens")
    p.add_argument("--long-system", type=int, default=800, help="the long system prompt's tokens")
    p.add_argument("--user", type=int, default=40, help="a question's tokens")
    p.add_argument("--answer", type=int, default=100, help="a conversation's answers' tokens")
    p.add_argument("--chats", type=int, default=5, help="chats per round sharing the system prompt")
    p.add_argument("--turns", type=int, default=8, help="a conversation's turns")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from bench.model import ensure_checkpoint
    from gemma3 import Gemma3ForCausalLM
    from lm_worker.engine import PREFIX_ROWS, Engine

    path = ensure_checkpoint(args.shape, args.workdir, 0)
    model = Gemma3ForCausalLM.from_pretrained(path, dtype=getattr(jnp, args.dtype), progress=False)
    vocab = model.config.vocab_size
    longest = max(len(p) for prompts in workloads(args, vocab, 0).values() for p in prompts)
    max_length = 1 << (longest + 64).bit_length()
    engines = {rows: Engine(model, num_slots=4, max_length=max_length, prefix_rows=rows).start()
               for rows in (PREFIX_ROWS, 0)}
    print(f"# {args.shape} {args.dtype}, {jax.devices()[0].device_kind}, max_length {max_length}", file=sys.stderr)
    for engine in engines.values():  # compiles every program the runs take (a round of its own)
        engine.warm_up(2)
        for prompts in workloads(args, vocab, -1).values():
            for prompt in prompts:
                first_token_seconds(engine, prompt)
    runs: dict[tuple[str, int], list[float]] = {}
    for i in range(args.rounds):
        for name, prompts in workloads(args, vocab, i).items():
            seconds = {rows: [] for rows in engines}
            for j, prompt in enumerate(prompts):  # each prompt on both engines, either first in turn
                for rows in (PREFIX_ROWS, 0) if (i + j) % 2 == 0 else (0, PREFIX_ROWS):
                    seconds[rows].append(first_token_seconds(engines[rows], prompt))
            for rows, s in seconds.items():  # the first chat (and the first turn) has nothing to start from
                runs.setdefault((name, rows), []).append(statistics.median(s[SKIP.get(name, 1):]))
                print(f"# round {i} {name} prefix_rows {rows}: {[round(x * 1e3) for x in s]} ms", file=sys.stderr)
    for engine in engines.values():
        engine.stop()

    prompts = workloads(args, vocab, 0)
    print(f"{args.shape}, {args.dtype}, each request alone, time to first token: medians over {args.rounds} rounds "
          f"of each round's median over its requests after the first (the long system prompt's: the second) "
          f"(ms)\n")
    print("| workload | prompt tokens | prefix cache on | off | off / on |")
    print("|---|---|---:|---:|---:|")
    for name in prompts:
        on, off = (statistics.median(runs[(name, rows)]) * 1e3 for rows in (PREFIX_ROWS, 0))
        lengths = [len(p) for p in prompts[name][SKIP.get(name, 1):]]
        print(f"| {name} | {min(lengths)}-{max(lengths)} | {on:.0f} | {off:.0f} | {off / on:.2f}x |")


if __name__ == "__main__":
    main()
