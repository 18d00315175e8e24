"""Gemma 3 text decoding on CPU: this library (JAX/Flax NNX) against its peers, same weights.

    python bench/model.py                                   # 270m, float32+bfloat16, batch 1 and 8
    python bench/model.py --shapes 270m,1b --dtypes bfloat16 --batches 1 --output /tmp/table.md

The peers (``--peers``, default both): transformers (PyTorch, eager), and EasyDeL 0.3.0 (JAX/Flax NNX, the
framework whose Gemma 3 API we follow), which pins its own jax and transformers and so runs from its own virtual
environment: make it once with ``bench/setup_easydel.sh`` (or pass ``--easydel-python``).

What it does:

1. Writes random weights ONCE per shape with transformers itself (``Gemma3ForCausalLM(config)``, every
   parameter redrawn: matrices and embedding ~ N(0, 0.02), RMSNorm offsets ~ N(0, 0.1)) at the real
   shapes of gemma-3-270m / gemma-3-1b, ``save_pretrained`` in float32. Every library loads that directory
   (and casts to the benchmarked dtype itself).
2. Measures the machine's memory bandwidth with numpy copies (bytes read + written / time, best of 5)
   and read-only streams (a sum, a BLAS matrix-vector product), and derives the decode roofline: parameter
   bytes (tied embedding counted once, as the LM head reads it) / bandwidth = the fastest a batch-1 decode
   step can be when every weight is read once per step; against the copy figure, and against the best
   read-only one (the read roofline: on some CPUs a read-only stream is slower than a copy's traffic).
3. For each (shape, dtype, batch) starts one worker process per library (so peak RSS is per library and
   per configuration: VmHWM), loads the checkpoint, warms up, then runs the workers one after the other,
   repeat by repeat, rotating who goes first (the machine may be shared: each ratio compares runs measured
   side by side). Each repeat times, on the same random prompt (B x prompt_len tokens, greedy, no stop token):
     * prefill, ``--prefill-reps`` times a library, the libraries taking turns one prefill at a time (a noisy
       minute of a shared host then falls on every library alike): one forward of the prompt filling a fresh
       cache, what each library's ``generate`` runs first: ours, the jitted prefill of
       ``gemma3.generation._compiled`` (last-position logits only; the cache is allocated before the timer
       starts); transformers, ``model(..., use_cache=True, logits_to_keep=1)``;
       EasyDeL, its generate's first step jitted alone (cache allocated before the timer), which computes the
       LM head for EVERY prompt position, as its generate does (see bench/easydel_worker.py);
     * generate: the whole ``generate`` call (prefill + new_tokens - 1 decode steps); EasyDeL's is its traced
       generate (prefill, then a ``lax.while_loop``) in one ``jax.jit``;
     * ours only, with --step-loop: a bare decode loop with the jitted step, syncing the token to the
       host each step as ``generate`` does (a cross-check of the derived decode rate).
   Reported: the best (minimum time) over the repeats for every timing. Decode tokens/s =
   B * (new_tokens - 1) / (generate - prefill), the same derivation for every library. Compile time
   (the JAX libraries) = the first ``generate`` in a fresh process minus the best steady-state ``generate``.
4. Prints Markdown tables (``--output`` also writes them to a file; ``--json`` dumps the raw numbers): one
   row per library and configuration, then ours against each peer and against the best peer.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from harness import Worker, fmt, log, report, serve  # bench/: this script's directory, first on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTLE_S = 1.0  # the pause before each timed call (see run_config)

SHAPES = {
    # https://huggingface.co/google/gemma-3-270m/blob/main/config.json (weights replaced by random ones)
    "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, sliding_window=512, vocab_size=262_144,
                 query_pre_attn_scalar=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                 sliding_window_pattern=6, max_position_embeddings=32_768),
    # https://huggingface.co/google/gemma-3-1b-it/blob/main/config.json
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
               num_key_value_heads=1, head_dim=256, sliding_window=512, vocab_size=262_144,
               query_pre_attn_scalar=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
               sliding_window_pattern=6, max_position_embeddings=32_768),
}
COMMON = dict(rms_norm_eps=1e-6, final_logit_softcapping=None, attn_logit_softcapping=None, rope_scaling=None,
              tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
              hidden_activation="gelu_pytorch_tanh")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
LIBS = {  # worker key: (name in --peers, name in the tables); "ours" is always run
    "ours": ("ours", "gemma3 (JAX)"),
    "hf": ("transformers", "transformers (torch)"),
    "easydel": ("easydel", "EasyDeL 0.3.0 (JAX)"),
}
PEERS = {v[0]: k for k, v in LIBS.items() if k != "ours"}
JIT_LIBS = {"ours", "easydel"}  # their first generate compiles
EASYDEL_PYTHON = os.path.expanduser("~/.cache/gemma3-bench/easydel-venv/bin/python")  # bench/setup_easydel.sh's
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------- helpers
def prompt_ids(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """The random prompt both libraries get: ids above the special tokens (0 pad, 1 eos, 2 bos)."""
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int64)


# --------------------------------------------------------------------------------------- the checkpoint
def make_checkpoint(shape: str, path: str, seed: int) -> None:
    """Random weights at the real shapes, written by transformers' save_pretrained (float32)."""
    import torch
    import transformers

    config = transformers.Gemma3TextConfig(**SHAPES[shape], **COMMON)
    torch.manual_seed(seed)
    with torch.no_grad():
        model = transformers.Gemma3ForCausalLM(config).eval()
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "norm" in name else 0.02))
    model.save_pretrained(path)
    with open(os.path.join(path, "bench_meta.json"), "w") as f:
        json.dump({"shape": shape, "seed": seed, "config": SHAPES[shape] | COMMON}, f)


def ensure_checkpoint(shape: str, workdir: str, seed: int) -> str:
    path = os.path.join(workdir, f"gemma-3-{shape}-random-seed{seed}")
    meta = os.path.join(path, "bench_meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            m = json.load(f)
        if m.get("config") == json.loads(json.dumps(SHAPES[shape] | COMMON)):
            print(f"# reusing checkpoint {path}", file=sys.stderr)
            return path
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    # a subprocess, so that torch and the float32 model never sit in the coordinator's memory
    subprocess.run([sys.executable, os.path.abspath(__file__), "--_make-checkpoint", shape, path, "--seed", str(seed)],
                   check=True)
    print(f"# wrote {path} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return path


def parameter_count(path: str) -> int:
    """Elements of every tensor in the checkpoint (the tied embedding is stored once)."""
    import struct

    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with open(os.path.join(path, name), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                if key == "lm_head.weight":  # tied: the head reads the embedding; never counted twice
                    continue
                total += int(np.prod(info["shape"]))
    return total


# -------------------------------------------------------------------------------------------- bandwidth
def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Copy bandwidth (bytes read + written per second), best of ``repeats``, 1 thread and all cores.

    Also read-only figures, since decode only reads: a float64 sum (which numpy vectorises), and a float32
    matrix-vector product through numpy's BLAS on all cores, a decode step's own access pattern. On an Intel
    Xeon (session 16) the sum read 19 GB/s and the BLAS product 30.6, while copies moved 45 (read + written):
    a core there has only so many reads in flight, so copies outrun any read-only stream (bench/RESULTS.md).
    """
    n = int(gib * GIB) // 8
    src = np.ones(n, np.float64)
    dst = np.zeros(n, np.float64)  # both touched, so no page faults are timed
    threads = os.cpu_count() or 1
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def copy_part(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    def sum_part(b):
        return float(src[b[0]:b[1]].sum())

    matrix = src.view(np.float32).reshape(-1, 4096)  # the same bytes as float32 rows
    vector = np.ones(4096, np.float32)
    out = {"buffer_bytes": n * 8, "threads": threads}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for label, fn, factor in (("copy_1t", lambda: np.copyto(dst, src), 2),
                                  ("copy_mt", lambda: list(pool.map(copy_part, bounds)), 2),
                                  ("read_1t", lambda: src.sum(), 1),
                                  ("read_mt", lambda: list(pool.map(sum_part, bounds)), 1),
                                  ("read_gemv", lambda: matrix @ vector, 1)):
            fn()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out[label] = factor * n * 8 / best
    src = dst = matrix = None  # free the 2 GiB before the workers start
    out["copy"] = max(out["copy_1t"], out["copy_mt"])
    out["read"] = max(out["read_1t"], out["read_mt"], out["read_gemv"])
    return out


# ---------------------------------------------------------------------------------------------- workers
class OursWorker:
    """gemma3 (JAX/Flax NNX)."""

    def __init__(self, ckpt, dtype, batch, prompt_len, new_tokens, seed):
        import jax
        import jax.numpy as jnp

        sys.path.insert(0, ROOT)
        from gemma3 import Gemma3ForCausalLM

        self.jax, self.jnp = jax, jnp
        t0 = time.perf_counter()
        self.model = Gemma3ForCausalLM.from_pretrained(ckpt, dtype={"float32": jnp.float32,
                                                                     "bfloat16": jnp.bfloat16}[dtype], progress=False)
        jax.block_until_ready(self.model)
        self.load_s = time.perf_counter() - t0
        self.batch, self.t, self.n = batch, prompt_len, new_tokens
        self.ids = prompt_ids(batch, prompt_len, self.model.config.vocab_size, seed)
        self.jids = jnp.asarray(self.ids, jnp.int32)
        self.info = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": str(jax.devices())}

    def generate(self):
        t0 = time.perf_counter()
        out = self.model.generate(self.jids, max_new_tokens=self.n, eos_token_id=[])
        dt = time.perf_counter() - t0
        assert out.new_tokens.shape == (self.batch, self.n) and (out.num_new_tokens == self.n).all()
        return dt, out.new_tokens

    def cold(self):
        dt, _ = self.generate()
        return {"cold_generate_s": dt}

    def _fresh(self):
        from flax import nnx

        from gemma3.generation import _compiled

        graphdef, state = nnx.split(self.model)
        prefill, decode, first = _compiled(graphdef, True)  # greedy, as generate compiles for these runs
        kw = self.model.prepare_inputs_for_generation(self.jids, max_length=self.t + self.n)
        self.jax.block_until_ready(kw)
        return state, prefill, decode, first, kw

    def prefill(self):
        state, prefill, decode, first, kw = self._fresh()
        t0 = time.perf_counter()
        logits, cache = prefill(state, self.jids, kw["attention_mask"], kw["position_ids"], kw["past_key_values"], {})
        logits.block_until_ready()
        return time.perf_counter() - t0, (logits, cache, state, decode, first)

    def repeat(self, step_loop=False):
        jnp, np_ = self.jnp, np
        b = self.batch
        out = {}
        if step_loop:  # the bare decode loop, continuing from a prefill (host sync per token, as generate)
            seeds, zero_f = jnp.zeros((b,), jnp.uint32), jnp.zeros((b,), jnp.float32)
            top_k, top_p = jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.float32)
            _, (logits, cache, state, decode, first) = self.prefill()
            token = first(logits, seeds, zero_f, top_k, top_p)
            np_.asarray(token)
            t0 = time.perf_counter()
            for i in range(self.n - 1):
                token, cache = decode(state, token, cache, seeds, jnp.int32(i + 1), zero_f, top_k, top_p)
                np_.asarray(token)
            out["step_loop_s"] = time.perf_counter() - t0
            del logits, cache
        out["generate_s"], new = self.generate()
        out["tokens"] = new.tolist()
        return out


class HFWorker:
    """transformers (PyTorch, CPU, eager execution, default attention implementation)."""

    def __init__(self, ckpt, dtype, batch, prompt_len, new_tokens, seed):
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        self.model = transformers.Gemma3ForCausalLM.from_pretrained(
            ckpt, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).eval()
        self.load_s = time.perf_counter() - t0
        self.batch, self.t, self.n = batch, prompt_len, new_tokens
        self.ids = torch.from_numpy(prompt_ids(batch, prompt_len, self.model.config.vocab_size, seed))
        self.mask = torch.ones_like(self.ids)
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(), "attn": self.model.config._attn_implementation}

    def generate(self):
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(self.ids, attention_mask=self.mask, do_sample=False, max_new_tokens=self.n,
                                      min_new_tokens=self.n, pad_token_id=0)
            dt = time.perf_counter() - t0
        new = out[:, self.t:]
        assert new.shape == (self.batch, self.n), new.shape
        return dt, new.numpy()

    def cold(self):
        dt, _ = self.generate()
        return {"cold_generate_s": dt}

    def prefill(self):
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0, out

    def repeat(self, step_loop=False):
        gen_s, new = self.generate()
        return {"generate_s": gen_s, "tokens": new.tolist()}


def worker_class(lib: str):
    if lib == "easydel":  # that module runs only in EasyDeL's own virtual environment
        from easydel_worker import EasyDeLWorker

        return EasyDeLWorker
    return {"ours": OursWorker, "hf": HFWorker}[lib]


def worker_main(lib: str) -> None:
    serve(worker_class(lib), {"cold": lambda w, _: w.cold(), "prefill": lambda w, _: {"prefill_s": w.prefill()[0]},
                              "repeat": lambda w, msg: w.repeat(**msg)})


# ------------------------------------------------------------------------------------------ the benchmark
def run_config(ckpt, shape, dtype, batch, args, logdir) -> dict:
    load = dict(ckpt=ckpt, dtype=dtype, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                seed=args.seed + 1)
    libs = args.libs
    res = {"shape": shape, "dtype": dtype, "batch": batch, "libs": libs}
    workers = {}
    try:
        for lib in libs:  # loaded one after the other, so loads do not compete
            workers[lib] = Worker(__file__, lib, os.path.join(logdir, f"{shape}-{dtype}-b{batch}-{lib}.log"),
                                  args.easydel_python if lib == "easydel" else sys.executable)
            res[lib] = {"load": workers[lib].call("load", **load), "repeats": []}
        for lib in libs:  # first generate: the JAX libraries compile here, transformers warms up
            res[lib].update(workers[lib].call("cold"))
            log(f"  {shape} {dtype} B={batch} {lib}: first generate {res[lib]['cold_generate_s']:.2f}s")
        for r in range(args.repeats):
            k = r % len(libs)
            order = libs[k:] + libs[:k]  # rotate who goes first
            # the prefills one library after the other, round by round, so that a noisy minute of a shared
            # host falls on every library's timings alike; then each library's generate. Each timed call
            # starts after a pause: EasyDeL's process used ~0.3 s of CPU in the 3 s after a 1b prefill had
            # returned (none once it had been idle 0.5 s), inside the next library's timing
            prefills = {lib: [] for lib in libs}
            for _ in range(args.prefill_reps):
                for lib in order:
                    time.sleep(SETTLE_S)
                    prefills[lib].append(workers[lib].call("prefill")["prefill_s"])
            for lib in order:
                time.sleep(SETTLE_S)
                rep = workers[lib].call("repeat", step_loop=args.step_loop)
                rep["prefill_s"], rep["prefill_each_s"] = min(prefills[lib]), prefills[lib]
                rep["loadavg_1m"] = os.getloadavg()[0]  # our worker alone accounts for ~its thread count
                res[lib]["repeats"].append(rep)
                extra = f", step loop {rep['step_loop_s']:.2f}s" if "step_loop_s" in rep else ""
                log(f"  {shape} {dtype} B={batch} {lib} repeat {r + 1}: prefill {rep['prefill_s']:.3f}s, "
                    f"generate {rep['generate_s']:.2f}s{extra}, load average {rep['loadavg_1m']:.1f}")
        for lib in libs:
            res[lib].update(workers[lib].call("finish"))
    finally:
        for w in workers.values():
            w.close()
    return res


def summarize(res: dict, args) -> dict:
    b, t, n = res["batch"], args.prompt_len, args.new_tokens
    for lib in res["libs"]:
        r = res[lib]
        reps = r["repeats"]
        r["prefill_best_s"] = min(x["prefill_s"] for x in reps)
        r["generate_best_s"] = min(x["generate_s"] for x in reps)
        r["prefill_tok_s"] = b * t / r["prefill_best_s"]
        decode_s = r["generate_best_s"] - r["prefill_best_s"]
        r["decode_tok_s"] = b * (n - 1) / decode_s if decode_s > 0 else float("nan")
        r["generate_tok_s"] = b * n / r["generate_best_s"]
        if "step_loop_s" in reps[0]:
            r["step_loop_best_s"] = min(x["step_loop_s"] for x in reps)
            r["step_loop_tok_s"] = b * (n - 1) / r["step_loop_best_s"]
        r["compile_s"] = r["cold_generate_s"] - r["generate_best_s"]
    ours = np.array(res["ours"]["repeats"][-1]["tokens"])
    res["greedy_agree_prefix"] = {}  # per peer, per row: new tokens identical to ours before the first difference
    for lib in res["libs"][1:]:
        same = ours == np.array(res[lib]["repeats"][-1]["tokens"])
        res["greedy_agree_prefix"][lib] = [int(np.argmin(row)) if not row.all() else n for row in same]
    res["loadavg_max"] = max(x["loadavg_1m"] for lib in res["libs"] for x in res[lib]["repeats"])
    return res


def measure_bandwidth(when: str) -> dict:
    log(f"# measuring memory bandwidth ({when} the runs)")
    bw = memory_bandwidth()
    bw["when"] = when
    log(f"# copy {bw['copy'] / 1e9:.1f} GB/s, read {bw['read'] / 1e9:.1f} GB/s")
    return bw


def tables(results, rooflines, bw, args) -> str:
    n = args.new_tokens
    lines = [
        f"Prompt {args.prompt_len} random tokens, {n} new tokens greedy (no stop token); best of {args.repeats} "
        f"repeats (prefill: best of {args.repeats} x {args.prefill_reps}). Decode tok/s = B x {n - 1} / "
        "(generate - prefill), aggregated over the batch. Roofline = B x bandwidth / weight bytes "
        "(weights read once per step; ignores KV-cache reads and compute): the decode roofline against the copy "
        "bandwidth (bytes read + written), the read roofline against the fastest read-only stream measured."
        + (" EasyDeL's prefill computes the LM head at every prompt position, as its generate does; the others' "
           "at the last one only." if "easydel" in args.libs else ""),
        "",
        "| model | dtype | B | library | prefill tok/s | decode tok/s | generate s | generate tok/s | "
        + ("decode step loop tok/s | " if args.step_loop else "") + "compile s | peak RSS GiB | % of decode roofline | "
        "% of read roofline |",
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if args.step_loop else "") + "---:|---:|---:|---:|",
    ]
    for res in results:
        rf = rooflines[(res["shape"], res["dtype"])]
        roof, roof_read = res["batch"] * rf["tok_s"], res["batch"] * rf["tok_s_read"]
        for lib in res["libs"]:
            r = res[lib]
            lines.append(
                f"| {res['shape']} | {res['dtype']} | {res['batch']} | {LIBS[lib][1]} | {fmt(r['prefill_tok_s'])} | "
                f"{fmt(r['decode_tok_s'])} | {fmt(r['generate_best_s'], 2)} | {fmt(r['generate_tok_s'])} | "
                + (f"{fmt(r.get('step_loop_tok_s'))} | " if args.step_loop else "")
                + f"{fmt(r['compile_s'], 1) if lib in JIT_LIBS else '-'} | "
                f"{fmt(r['peak_rss'] / GIB, 2)} | {fmt(100 * r['decode_tok_s'] / roof, 0)}% | "
                f"{fmt(100 * r['decode_tok_s'] / roof_read, 0)}% |")
    lines += [
        "",
        "Ours / each peer (same run, interleaved; > 1 means ours is faster, or for RSS larger), and ours / the best "
        "peer for each figure (named). Load average after each repeat: the benchmark itself accounts for about "
        f"{os.cpu_count()}; more means other work competed for the cores.",
        "",
        "| model | dtype | B | ours vs | prefill x | decode x | generate x | peak RSS x | greedy tokens equal before "
        "first difference (per row) | max 1-min load avg |",
        "|---|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for res in results:
        o, peers = res["ours"], res["libs"][1:]
        config = f"| {res['shape']} | {res['dtype']} | {res['batch']} |"
        for lib in peers:
            h, agree = res[lib], res["greedy_agree_prefix"][lib]
            agree_s = f"all {n}" if all(a == n for a in agree) else ", ".join(map(str, agree))
            lines.append(
                f"{config} {LIBS[lib][1]} | {fmt(o['prefill_tok_s'] / h['prefill_tok_s'], 2)} | "
                f"{fmt(o['decode_tok_s'] / h['decode_tok_s'], 2)} | "
                f"{fmt(h['generate_best_s'] / o['generate_best_s'], 2)} | "
                f"{fmt(o['peak_rss'] / h['peak_rss'], 2)} | {agree_s} | {res['loadavg_max']:.1f} |")
        if len(peers) > 1:
            cells = []
            for key, faster in (("prefill_tok_s", max), ("decode_tok_s", max), ("generate_best_s", min)):
                ok = [lib for lib in peers if np.isfinite(res[lib][key])]  # decode is n/a where generate <= prefill
                if not ok:
                    cells.append("n/a")
                    continue
                best = faster(ok, key=lambda lib: res[lib][key])
                x = o[key] / res[best][key] if faster is max else res[best][key] / o[key]
                cells.append(f"{fmt(x, 2)} ({LIBS[best][0]})")
            lines.append(f"{config} best peer | {' | '.join(cells)} | - | - | {res['loadavg_max']:.1f} |")
    lines += [
        "",
        f"Memory bandwidth (numpy, {bw['buffer_bytes'] / GIB:.0f} GiB buffers, best of 5, measured before and after "
        f"the runs: copy {' / '.join(f'{c / 1e9:.1f}' for c in bw['all_copy'])} GB/s; details of the better one, "
        f"{bw['when']}): copy "
        f"{bw['copy_1t'] / 1e9:.1f} GB/s (1 thread), {bw['copy_mt'] / 1e9:.1f} GB/s ({bw['threads']} threads), "
        f"read+written bytes; read-only: sum {bw['read_1t'] / 1e9:.1f} / {bw['read_mt'] / 1e9:.1f} GB/s, "
        f"BLAS float32 matrix-vector product {bw['read_gemv'] / 1e9:.1f} GB/s. "
        f"Decode roofline: the copy figure, {bw['copy'] / 1e9:.1f} GB/s; read roofline: the best read-only "
        f"figure, {bw['read'] / 1e9:.1f} GB/s.",
        "",
        "| model | dtype | parameters | weight bytes / step | roofline decode tok/s (B=1) | "
        "same, read-only bandwidth |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (shape, dtype), rf in rooflines.items():
        lines.append(f"| {shape} | {dtype} | {rf['params'] / 1e6:,.1f} M | {rf['bytes'] / 1e9:.3f} GB | "
                     f"{rf['tok_s']:.1f} | {rf['tok_s_read']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="270m", help="comma-separated: 270m,1b (default 270m)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per library (best is reported)")
    p.add_argument("--prefill-reps", type=int, default=2,
                   help="prefill timings of each library per repeat, the libraries taking turns")
    p.add_argument("--step-loop", action="store_true",
                   help="also time ours' bare jitted decode loop (cross-check of generate - prefill; slower)")
    p.add_argument("--peers", default="transformers,easydel",
                   help=f"comma-separated libraries to measure ours against: {','.join(PEERS)} (default both)")
    p.add_argument("--easydel-python", default=EASYDEL_PYTHON,
                   help="the python of EasyDeL's virtual environment (made by bench/setup_easydel.sh; "
                        "default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep checkpoints and logs here (reused); default: a temp dir")
    p.add_argument("--output", default=None, help="also write the Markdown tables to this file")
    p.add_argument("--json", default=None, help="dump the raw measurements to this file")
    p.add_argument("--_worker", choices=list(LIBS), help=argparse.SUPPRESS)
    p.add_argument("--_make-checkpoint", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    if args._make_checkpoint:
        return make_checkpoint(args._make_checkpoint[0], args._make_checkpoint[1], args.seed)

    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s}; choose from {sorted(SHAPES)}")
    for d in dtypes:
        if d not in DTYPE_BYTES:
            p.error(f"unknown dtype {d}; choose from {sorted(DTYPE_BYTES)}")
    if args.new_tokens < 2 or args.repeats < 1:
        p.error("need --new-tokens >= 2 and --repeats >= 1")
    peers = [x for x in args.peers.split(",") if x]
    for x in peers:
        if x not in PEERS:
            p.error(f"unknown peer {x}; choose from {list(PEERS)}")
    if not peers:
        p.error("--peers: name at least one")
    args.libs = ["ours"] + [PEERS[x] for x in dict.fromkeys(peers)]
    if "easydel" in args.libs and not os.path.exists(args.easydel_python):
        p.error(f"EasyDeL's python {args.easydel_python} does not exist: run bench/setup_easydel.sh (its default "
                "location) or pass --easydel-python, or leave easydel out of --peers")

    temp = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="gemma3-bench-") if temp else args.workdir
    os.makedirs(workdir, exist_ok=True)
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    t_start = time.perf_counter()
    try:
        # Bandwidth before and after the runs; the best of the two (a shared machine only ever lowers it).
        bws = [measure_bandwidth("before")]
        params, results = {}, []
        for shape in shapes:
            ckpt = ensure_checkpoint(shape, workdir, args.seed)
            params[shape] = parameter_count(ckpt)
            for dtype in dtypes:
                for batch in batches:
                    log(f"# {shape} {dtype} batch {batch}")
                    results.append(summarize(run_config(ckpt, shape, dtype, batch, args, logdir), args))
        bws.append(measure_bandwidth("after"))
        bw = max(bws, key=lambda b: b["copy"])
        bw["all_copy"] = [b["copy"] for b in bws]
        rooflines = {}
        for shape in shapes:
            for dtype in dtypes:
                nbytes = params[shape] * DTYPE_BYTES[dtype]
                rooflines[(shape, dtype)] = {"params": params[shape], "bytes": nbytes, "tok_s": bw["copy"] / nbytes,
                                             "tok_s_read": bw["read"] / nbytes}
        text = tables(results, rooflines, bw, args)
        report(text, args.output, args.json, {
            "args": vars(args), "bandwidth": bws, "python": platform.python_version(),
            "rooflines": {f"{k[0]}/{k[1]}": v for k, v in rooflines.items()}, "results": results})
        log(f"# total {time.perf_counter() - t_start:.0f}s")
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
