"""Gemma 3 decode on one GPU (a lent H200): gemma-3-4b text shapes, bfloat16, random weights.

    bash bench/gpu.sh                 # on the device machine (see bench/RESULTS.md for recorded runs)
    python bench/gpu.py --shape tiny  # the same code on CPU in seconds (a check that it runs)

For each batch size (1, 32, 128): prefill of a random prompt, then greedy decode of ``--new-tokens``
tokens through ``gemma3.generate`` (its decode loop runs on the device in one call), and the same
through the sharded path (parameters and cache placed by ``gemma3.sharding`` on a mesh over every
device). Decode tokens/s = B x (new - 1) / (generate - prefill), aggregated over the batch; best of
``--repeats``. The LM worker's engine (continuous batching, in-process, no gRPC) runs
``--engine-slots`` requests at once; its tokens/s counts every token over the whole wave, prefills
included, so it is a lower bound beside the generate rows; a note under the table gives its decode
rate while every slot decodes.

Roofline: a decode step reads every weight once and the batch's KV cache; the fastest step is those
bytes / the HBM bandwidth, which the script measures itself (a jitted copy, bytes read + written).
Weights are drawn on the device (no checkpoint is written: 8.6 GB in bfloat16), so the load path
is not timed here; bench/model.py covers it on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    # https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json (text_config)
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, sliding_window=1024, vocab_size=262_208,
               query_pre_attn_scalar=256, max_position_embeddings=131_072,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=16, vocab_size=512, query_pre_attn_scalar=16,
                 max_position_embeddings=1024),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hbm_bandwidth(jax, jnp, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes read + written per second by a jitted copy of a ``gib`` GiB buffer (best of ``repeats``)."""
    n = int(gib * (1 << 30)) // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * n * 4 / best


def random_model(cls, config, dtype, jax, nnx):
    """The model with N(0, 0.02) weights drawn on the device, one small jitted draw per leaf (one jit
    over every leaf took XLA minutes to compile at 4b shapes; a per-shape draw compiles once per shape)."""
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(key, shape, dtype):
        return (0.02 * jax.random.normal(key, shape, jax.numpy.float32)).astype(dtype)

    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [draw(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def run_batch(model, batch: int, args, mesh, jax, jnp) -> dict:
    from flax import nnx

    from gemma3.generation import _compiled

    ids = jnp.asarray(np.random.default_rng(batch).integers(3, model.config.vocab_size, (batch, args.prompt_len)),
                      jnp.int32)
    graphdef, state = nnx.split(model)
    prefill = _compiled(graphdef)[0]

    def time_prefill():
        kw = model.prepare_inputs_for_generation(ids, max_length=args.prompt_len + args.new_tokens)
        cache = kw["past_key_values"]
        if mesh is not None:
            from gemma3.sharding import shard_cache

            cache = shard_cache(cache, mesh)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        logits, _ = prefill(state, ids, kw["attention_mask"], kw["position_ids"], cache, {})
        logits.block_until_ready()
        return time.perf_counter() - t0

    def time_generate():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[], mesh=mesh)
        assert out.new_tokens.shape == (batch, args.new_tokens)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    time_generate()
    time_prefill()
    compile_s = time.perf_counter() - t0
    prefill_s = min(time_prefill() for _ in range(args.repeats))
    generate_s = min(time_generate() for _ in range(args.repeats))
    decode_s = generate_s - prefill_s
    return {"batch": batch, "compile_and_first_s": compile_s, "prefill_s": prefill_s, "generate_s": generate_s,
            "prefill_tok_s": batch * args.prompt_len / prefill_s,
            "decode_tok_s": batch * (args.new_tokens - 1) / decode_s, "step_ms": 1e3 * decode_s / (args.new_tokens - 1)}


def run_engine(model, slots: int, args) -> dict:
    """The LM worker's continuous-batching engine in-process (no gRPC): ``slots`` requests of the same
    prompt length at once, after a warm-up wave. Two figures: tokens/s over the whole wave (every token,
    the one-at-a-time prefills included), and the decode rate while every slot decodes (tokens that
    arrive between the last request's first token and the first request's last one, over that time)."""
    import threading

    from lm_worker.engine import Engine, Request, Token

    engine = Engine(model, num_slots=slots, max_length=args.prompt_len + args.new_tokens, max_queue=2 * slots,
                    prefill_buckets=(args.prompt_len,), burst_ms=args.engine_burst_ms).start()
    rng = np.random.default_rng(slots)

    def wave() -> dict:
        t0 = time.perf_counter()
        requests = [engine.submit(Request(prompt_ids=rng.integers(3, model.config.vocab_size, args.prompt_len).tolist(),
                                          max_new_tokens=args.new_tokens)) for _ in range(slots)]
        stamps: list[list[float]] = [[] for _ in requests]

        def read(i):  # one reader per request, so each token is stamped as it arrives
            stamps[i].extend(time.perf_counter() for e in requests[i].stream(timeout=600) if isinstance(e, Token))

        readers = [threading.Thread(target=read, args=(i,)) for i in range(slots)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert all(len(s) == args.new_tokens for s in stamps), [len(s) for s in stamps]
        all_in, first_out = max(s[0] for s in stamps), min(s[-1] for s in stamps)
        steady = sum(all_in < t <= first_out for s in stamps for t in s)
        return {"ttft_s": min(s[0] for s in stamps) - t0, "generate_s": max(s[-1] for s in stamps) - t0,
                "steady_tok_s": steady / (first_out - all_in) if first_out > all_in and steady else None}

    try:
        t0 = time.perf_counter()
        wave()
        compile_s = time.perf_counter() - t0
        best = min((wave() for _ in range(args.repeats)), key=lambda w: w["generate_s"])
    finally:
        engine.stop()
    n = slots * args.new_tokens
    return {"batch": slots, "compile_and_first_s": compile_s, **best, "prefill_tok_s": None,
            "decode_tok_s": n / best["generate_s"], "step_ms": 1e3 * best["generate_s"] / args.new_tokens}


def kv_bytes_per_step(config, batch: int, context: int, itemsize: int) -> int:
    """KV-cache bytes a decode step reads: every layer's keys and values over its visible context."""
    total = 0
    for kind in config.layer_types:
        seen = min(context, config.sliding_window) if kind == "sliding_attention" else context
        total += 2 * batch * seen * config.num_key_value_heads * config.head_dim * itemsize
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="4b")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--engine-slots", default="1,32", help="slot counts run through the LM worker's engine ('' skips)")
    p.add_argument("--engine-burst-ms", type=float, default=20.0,
                   help="the engine's burst_ms (the LM worker's default)")
    p.add_argument("--sharded-batches", default="32", help="batches run again through the sharded path ('' skips)")
    p.add_argument("--json", default=None)
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no new row after this many seconds, so the table prints inside the lease")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gemma3 import Gemma3ForCausalLM, Gemma3TextConfig, create_mesh, shard_model

    t_start = time.perf_counter()
    devices = jax.devices()
    log(f"# jax {jax.__version__}, {len(devices)} x {devices[0].device_kind}")
    bw = hbm_bandwidth(jax, jnp, gib=4.0 if devices[0].platform == "gpu" else 0.25)
    log(f"# copy bandwidth {bw / 1e9:.0f} GB/s")
    config = Gemma3TextConfig(**SHAPES[args.shape])
    model = random_model(Gemma3ForCausalLM, config, jnp.bfloat16, jax, nnx)
    jax.block_until_ready(nnx.state(model))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    log(f"# {args.shape}: {weight_bytes / 1e9:.2f} GB of bfloat16 weights, at {time.perf_counter() - t_start:.0f}s")

    rows, skipped = [], []

    def save() -> None:
        if args.json:  # after every row, so a run cut short still leaves its figures
            with open(args.json, "w") as f:
                json.dump({"bandwidth": bw, "weight_bytes": weight_bytes, "rows": rows, "skipped": skipped,
                           "args": vars(args)}, f, indent=1)

    paths = [("single device", None, args.batches), ("LM worker engine", "engine", args.engine_slots),
             ("sharded (mesh)", "mesh", args.sharded_batches)]
    for label, kind, batches in paths:
        mesh = None
        if kind == "mesh" and batches:
            mesh = create_mesh(tensor=len(devices))
            shard_model(model, mesh)
        for b in (int(x) for x in batches.split(",") if x):
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{label} B={b}: over the {args.budget_s:.0f} s budget")
                log(f"  skipped {skipped[-1]}")
                continue
            try:
                r = run_engine(model, b, args) if kind == "engine" else run_batch(model, b, args, mesh, jax, jnp)
            except Exception as e:  # one failing row (memory, say) must not lose the others
                skipped.append(f"{label} B={b}: {type(e).__name__}: {str(e)[:300]}")
                log(f"  failed {skipped[-1]}")
                continue
            context = args.prompt_len + args.new_tokens // 2  # the mean context over the decode
            step_bytes = weight_bytes + kv_bytes_per_step(config, b, context, 2)
            r.update(path=label, roofline_tok_s=b * bw / step_bytes, weights_only_roofline_tok_s=b * bw / weight_bytes)
            rows.append(r)
            save()
            log(f"  {label} B={b}: decode {r['decode_tok_s']:.0f} tok/s ({r['step_ms']:.2f} ms/step), "
                f"{100 * r['decode_tok_s'] / r['roofline_tok_s']:.0f}% of roofline; "
                f"prefill {r['prefill_tok_s'] or 0:.0f} tok/s; compile + first {r['compile_and_first_s']:.0f}s; "
                f"elapsed {time.perf_counter() - t_start:.0f}s"
                + (f"; all slots decoding: {r['steady_tok_s']:.0f} tok/s" if r.get("steady_tok_s") else ""))

    print(f"Device: {len(devices)} x {devices[0].device_kind}; jax {jax.__version__}; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s (read + written); gemma-3-{args.shape} text shapes, bfloat16, "
          f"{weight_bytes / 1e9:.2f} GB of weights; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; "
          f"best of {args.repeats}.\n")
    print("| path | B | prefill tok/s | decode tok/s | ms / step | roofline tok/s (weights + KV) | % of roofline | "
          "compile + first s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pct = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
        prefill = "–" if r["prefill_tok_s"] is None else f"{r['prefill_tok_s']:,.0f}"
        print(f"| {r['path']} | {r['batch']} | {prefill} | {r['decode_tok_s']:,.0f} | "
              f"{r['step_ms']:.2f} | {r['roofline_tok_s']:,.0f} | {pct:.0f}% | {r['compile_and_first_s']:.0f} |")
    for r in rows:
        if r.get("steady_tok_s"):
            pct = 100 * r["steady_tok_s"] / r["roofline_tok_s"]
            print(f"\n{r['path']} B={r['batch']}: while every slot decodes (no prefill between steps), "
                  f"{r['steady_tok_s']:,.0f} tok/s, {1e3 * r['batch'] / r['steady_tok_s']:.2f} ms/step, "
                  f"{pct:.0f}% of roofline.")
    for line in skipped:
        print(f"\nNot measured: {line}")
    save()
    log(f"# total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
