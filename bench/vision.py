"""Gemma 3 vision on CPU: SigLIP + projector images/s against transformers, and image time to first token
through the services with an embedding-cache hit against a miss. gemma-3-4b vision shapes, random weights.

    python bench/vision.py --workdir /tmp/bench-vision          # both parts, the defaults below (~18 min)
    python bench/vision.py --parts library --dtypes bfloat16 --batches 1,4 --repeats 2
    python bench/vision.py --parts services --pairs 5 --service-dtype float32
    python bench/vision.py --layers 3 --image-size 224 --pairs 2     # a quick look (shapes shrunk)

Shapes (gemma-3-4b / 12b / 27b share this vision tower): SigLIP at 896 x 896 px, patch 14 (64 x 64 = 4096
patches), 27 encoder layers, width 1152, MLP 4304, 16 heads, no pooling head; the projector average-pools the
patch grid to 16 x 16 = 256 soft tokens, RMSNorms them and projects them to the text width, 2560 at 4b
(https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json). One image is about 5.5 TFLOP
(2.7 T multiply-adds; 38% of them in attention over 4096 patches).

1. library (``--parts library``): random weights written ONCE by transformers
   (``Gemma3ForConditionalGeneration(config)``, every parameter redrawn: matrices and embeddings ~ N(0, 0.02),
   LayerNorm scales ~ 1 + N(0, 0.1) and biases ~ N(0, 0.02), the projector's RMSNorm offset ~ N(0, 0.1);
   a 1-layer, 512-token text model of the real width, which neither library runs here), ``save_pretrained``
   in float32; both libraries load that directory and cast to the benchmarked dtype. For each (dtype, batch)
   one worker process per library (peak RSS per library: VmHWM) embeds the same random pixels (uniform in
   [-1, 1], as the processor's output), first a cold call (ours compiles here), then
   ``--repeats`` timed calls alternating the two workers (the machine may be shared; compile s = the
   durations JAX reports for tracing, lowering and XLA compilation, ``jax.monitoring`` events):
     * ours: exactly what the vision worker runs per batch, ``vision_worker.service.Batcher._forward``: the
       jitted ``gemma3.Gemma3ImageEncoder`` (vision tower + projector) on the batch, back to float32 numpy;
     * transformers: ``Gemma3ForConditionalGeneration.get_image_features(pixel_values).pooler_output``
       (vision tower + ``multi_modal_projector``) under ``torch.inference_mode``, its default attention.
   Reported: images/s = batch / best time; the embeddings' difference (max |ours - theirs|, and that over
   max |theirs|) in each dtype (the float32 one is the numeric check).
2. services (``--parts services``): a checkpoint with that vision tower and a small text model (``--text-layers``
   layers of the 4b width 2560; tokenizer files from ``bench.checkpoints``), a private redis-server, the
   vision worker, one LM worker and the gateway as processes (``launcher``'s helpers). Then ``--pairs`` x
   (a request with a NEW random-noise image, then the same request again), one at a time, through the
   gateway's streaming ``Generate``; time to first token measured by the client (call to first chunk with a
   token). The first carries bytes never seen (a cache miss: the vision worker embeds them); the second the
   same bytes (a hit: the embedding comes from Redis). Checked per request with the answer's
   ``usage.image_cache_hits`` (0 for a miss, 1 for a hit) and at the end with the vision worker's own
   ``gemma3.vision.cache.hits`` / ``.misses`` counters. One untimed request first, which compiles the LM
   worker's prefill for this prompt shape: its image is an embedding put in Redis by this script and sent by
   ``embedding_key`` (the API's way to reuse an embedding), so the warm-up costs no vision forward.
   Reported: p50 (and min / max) of each, the hit / miss ratio (target <= 0.5).
3. Prints Markdown tables (``--output`` also writes them; ``--json`` dumps the raw numbers).

Defaults, chosen for time: at 4b shapes one image takes a minute or two on the project's 2-core CPU machine
(measured at 3 layers and scaled to 27, load average 1.5-4: ours ~75-95 s in float32 and ~115-125 s in
bfloat16, transformers ~45-70 s in either), so every call counts. Library: float32 and bfloat16 at batch 1,
one timed call per library after the cold one: about 12 min, its checkpoint included (``--repeats 2`` adds
about 5 min; batch 4 costs about 4x per dtype, and ours then peaks near 11 GiB: XLA materialises the
16 x 4096 x 4096 attention scores of every image). Services: float32 workers (``gemma3-stack``'s default;
``--service-dtype bfloat16``, the vision worker's own default, is slower in our tower today), 2 timed pairs:
about 6 min (the vision worker embeds one image at start, then one per pair). Both: about 18 min on an
otherwise idle machine. ``--workdir`` keeps the two checkpoints (about 40 s each to write) for the next run.
"""

from __future__ import annotations

import argparse
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
GIB = 1 << 30

# https://huggingface.co/google/gemma-3-4b-it/blob/main/config.json (vision_config; weights replaced)
VISION_4B = dict(image_size=896, patch_size=14, num_hidden_layers=27, hidden_size=1152, intermediate_size=4304,
                 num_attention_heads=16, layer_norm_eps=1e-6, vision_use_head=False, hidden_act="gelu_pytorch_tanh",
                 num_channels=3)
MM_TOKENS_4B, TEXT_HIDDEN_4B = 256, 2560
# The library part's text model: the 4b width (the projector's output), otherwise as small as it gets.
LIB_TEXT = dict(num_hidden_layers=1, intermediate_size=256, num_attention_heads=1, num_key_value_heads=1,
                head_dim=256, vocab_size=512, query_pre_attn_scalar=256, layer_types=["full_attention"],
                sliding_window=512, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
LIB_TOKENS = dict(boi_token_index=509, eoi_token_index=510, image_token_index=511)
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------- helpers
def vision_shapes(args) -> tuple[dict, int, int]:
    """(vision_config, mm_tokens_per_image, text width) from the defaults and the shape flags."""
    vision = dict(VISION_4B, num_hidden_layers=args.layers, image_size=args.image_size)
    for item in args.vision_override:
        key, _, value = item.partition("=")
        if key not in VISION_4B:
            raise SystemExit(f"--vision-override: unknown key {key!r}; one of {sorted(VISION_4B)}")
        vision[key] = type(VISION_4B[key])(json.loads(value))
    side = int(round(args.mm_tokens ** 0.5))
    per_side = vision["image_size"] // vision["patch_size"]
    if side * side != args.mm_tokens or vision["image_size"] % vision["patch_size"] or per_side % side:
        raise SystemExit(f"--mm-tokens {args.mm_tokens} must be a square whose side divides the "
                         f"{per_side} patches per side (--image-size / patch_size)")
    return vision, args.mm_tokens, args.text_hidden


def flops_per_image(vision: dict, mm_tokens: int, text_hidden: int) -> float:
    """Multiply-adds x 2 of the tower and the projector (matrix products and attention; not norms/softmax)."""
    p = (vision["image_size"] // vision["patch_size"]) ** 2
    d, f = vision["hidden_size"], vision["intermediate_size"]
    patch = p * vision["num_channels"] * vision["patch_size"] ** 2 * d
    layer = p * (4 * d * d + 2 * d * f) + 2 * p * p * d
    return 2.0 * (patch + vision["num_hidden_layers"] * layer + mm_tokens * d * text_hidden)


def random_pixels(batch: int, size: int, seed: int) -> np.ndarray:
    """What the image processor hands the tower: (B, 3, size, size) float32 in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


# --------------------------------------------------------------------------------------- the checkpoint
def randomize(model, seed: int) -> None:
    """Redraw every parameter: matrices/embeddings N(0, 0.02); LayerNorm scale 1 + N(0, 0.1), bias N(0, 0.02);
    Gemma RMSNorm offsets (used as 1 + w) N(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "vision_tower" in name and ("layer_norm" in name or "post_layernorm" in name):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.02 * noise)
            elif "norm" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def make_checkpoint(path: str, spec: dict, seed: int) -> None:
    """Random weights at ``spec``'s shapes, written by transformers' save_pretrained (float32)."""
    import torch
    import transformers

    config = transformers.Gemma3Config(text_config=dict(LIB_TEXT, hidden_size=spec["text_hidden"]),
                                       vision_config=spec["vision"], mm_tokens_per_image=spec["mm_tokens"],
                                       **LIB_TOKENS)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    with open(os.path.join(path, "bench_meta.json"), "w") as f:
        json.dump({"spec": spec, "seed": seed}, f)


def ensure_checkpoint(workdir: str, spec: dict, seed: int) -> str:
    v = spec["vision"]
    path = os.path.join(workdir, f"vision-{v['image_size']}px-{v['num_hidden_layers']}l-{v['hidden_size']}w-"
                                 f"{spec['mm_tokens']}t-{spec['text_hidden']}-seed{seed}")
    meta = os.path.join(path, "bench_meta.json")
    if os.path.exists(meta):
        with open(meta) as f:
            if json.load(f) == json.loads(json.dumps({"spec": spec, "seed": seed})):
                log(f"# reusing checkpoint {path}")
                return path
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    # a subprocess, so that torch and the float32 model never sit in the coordinator's memory
    subprocess.run([sys.executable, os.path.abspath(__file__), "--_make-checkpoint", path, json.dumps(spec),
                    "--seed", str(seed)], check=True)
    log(f"# wrote {path} in {time.perf_counter() - t0:.0f}s")
    return path


# ---------------------------------------------------------------------------------------------- workers
class OursWorker:
    """gemma3 (JAX/Flax NNX): the vision worker's own batch function."""

    def __init__(self, ckpt, dtype, batch, seed):
        import jax
        import jax.numpy as jnp

        sys.path.insert(0, ROOT)
        from gemma3 import Gemma3ImageEncoder
        from vision_worker.service import Batcher

        t0 = time.perf_counter()
        encoder = Gemma3ImageEncoder.from_pretrained(ckpt, dtype=getattr(jnp, dtype), progress=False)
        jax.block_until_ready(encoder)
        self.load_s = time.perf_counter() - t0
        self.batcher = Batcher(encoder, max_batch=batch)
        self.pixels = random_pixels(batch, encoder.config.vision_config.image_size, seed)
        self.info = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": str(jax.devices())}
        self.compile_s = 0.0  # JAX's own trace + lowering + XLA compile durations, summed
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, seconds: float, **kw) -> None:
        if name.startswith("/jax/core/compile/"):
            self.compile_s += seconds

    def embed(self) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = self.batcher._forward(self.pixels)  # jitted encoder, padded to a power of two, to float32 numpy
        return time.perf_counter() - t0, out


class HFWorker:
    """transformers (PyTorch, CPU, eager execution, its default attention implementation)."""

    def __init__(self, ckpt, dtype, batch, seed):
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        self.model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
            ckpt, dtype=getattr(torch, dtype)).eval()
        self.load_s = time.perf_counter() - t0
        size = self.model.config.vision_config.image_size
        self.pixels = torch.from_numpy(random_pixels(batch, size, seed)).to(getattr(torch, dtype))
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(),
                     "attn": self.model.config.vision_config._attn_implementation}

    def embed(self) -> tuple[float, np.ndarray]:
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.get_image_features(pixel_values=self.pixels).pooler_output
            out = out.float().numpy()
            return time.perf_counter() - t0, out


def embed_command(w, msg) -> dict:
    """Time one call; ``save``: where the embeddings go (.npy), for the comparison."""
    dt, out = w.embed()
    if msg.get("save"):
        np.save(msg["save"], out)
    return {"s": dt, "shape": list(out.shape), "finite": bool(np.isfinite(out).all()),
            "compile_s": getattr(w, "compile_s", None)}


def worker_main(lib: str) -> None:
    serve(OursWorker if lib == "ours" else HFWorker, {"embed": embed_command})


LIBS = (("ours", "gemma3 (JAX)"), ("hf", "transformers (torch)"))


def run_library_config(ckpt, dtype, batch, args, workdir) -> dict:
    logdir = os.path.join(workdir, "logs")
    res = {"dtype": dtype, "batch": batch}
    workers = {}
    outputs = {lib: os.path.join(workdir, f"embeddings-{dtype}-b{batch}-{lib}.npy") for lib, _ in LIBS}
    try:
        for lib, _ in LIBS:  # loaded one after the other, so loads do not compete
            workers[lib] = Worker(__file__, lib, os.path.join(logdir, f"library-{dtype}-b{batch}-{lib}.log"),
                                  env={"PYTHONPATH": ROOT})
            res[lib] = {"load": workers[lib].call("load", ckpt=ckpt, dtype=dtype, batch=batch, seed=args.seed + 1),
                        "repeats": []}
        for lib, _ in LIBS:  # first call: ours compiles here, transformers warms up
            cold = workers[lib].call("embed", save=outputs[lib])
            res[lib]["cold_s"] = cold["s"]
            res[lib]["compile_s"] = cold["compile_s"]  # ours: JAX's compile events during the cold call
            res[lib]["finite"] = cold["finite"]
            log(f"  {dtype} B={batch} {lib}: first call {cold['s']:.1f}s")
        for r in range(args.repeats):
            for lib in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):  # alternate who goes first
                rep = workers[lib].call("embed")
                rep["loadavg_1m"] = os.getloadavg()[0]
                res[lib]["repeats"].append(rep)
                log(f"  {dtype} B={batch} {lib} repeat {r + 1}: {rep['s']:.2f}s ({batch / rep['s']:.3f} images/s), "
                    f"load average {rep['loadavg_1m']:.1f}")
        for lib, _ in LIBS:
            res[lib].update(workers[lib].call("finish"))
    finally:
        for w in workers.values():
            w.close()
    ours, theirs = np.load(outputs["ours"]), np.load(outputs["hf"])
    if ours.shape != theirs.shape:
        raise RuntimeError(f"embeddings differ in shape: ours {ours.shape}, transformers {theirs.shape}")
    diff = np.abs(ours.astype(np.float64) - theirs)
    res["shape"] = list(ours.shape)
    res["max_abs_diff"] = float(diff.max())
    res["max_abs_ref"] = float(np.abs(theirs).max())
    res["max_rel_diff"] = res["max_abs_diff"] / res["max_abs_ref"]
    res["mean_abs_diff"] = float(diff.mean())
    res["mean_abs_ref"] = float(np.abs(theirs).mean())
    for lib, _ in LIBS:
        os.remove(outputs[lib])
        r = res[lib]
        r["best_s"] = min(x["s"] for x in r["repeats"])
        r["images_s"] = batch / r["best_s"]
        r["cold_minus_best_s"] = r["cold_s"] - r["best_s"]
    res["loadavg_max"] = max(x["loadavg_1m"] for lib, _ in LIBS for x in res[lib]["repeats"])
    return res


def library_tables(results: list[dict], args, flops: float) -> str:
    o, h = results[0]["ours"]["load"]["info"], results[0]["hf"]["load"]["info"]
    lines = [
        f"jax {o['jax']} ({o['backend']}); torch {h['torch']} ({h['threads']} threads), transformers "
        f"{h['transformers']} (attention: {h['attn']}).",
        "",
        f"Vision tower + projector, {results[0]['shape'][1]} soft tokens x {results[0]['shape'][2]} per image, "
        f"random pixels; best of {args.repeats} repeats after a cold call (ours: compile s = JAX's trace + lower + XLA "
        f"compile events in it). "
        f"~{flops / 1e12:.2f} TFLOP per image (matrix products and attention).",
        "",
        "| dtype | B | library | images/s | s / batch (best) | GFLOP/s | compile s | peak RSS GiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for lib, name in LIBS:
            r = res[lib]
            lines.append(f"| {res['dtype']} | {res['batch']} | {name} | {fmt(r['images_s'], 3)} | "
                         f"{fmt(r['best_s'], 2)} | {fmt(flops * r['images_s'] / 1e9, 0)} | "
                         f"{fmt(r['compile_s'], 1) if lib == 'ours' else '-'} | {fmt(r['peak_rss'] / GIB, 2)} |")
    lines += [
        "",
        f"Ours / transformers (same run, interleaved; > 1: ours faster, or for RSS larger). Embedding difference: "
        f"max |ours - transformers| over all values, and that / max |transformers|. Load average after each "
        f"repeat (the benchmark itself accounts for about {os.cpu_count()}).",
        "",
        "| dtype | B | images/s x | peak RSS x | max abs diff | max abs diff / max abs | mean abs diff / mean abs "
        "| max 1-min load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        o, h = res["ours"], res["hf"]
        lines.append(f"| {res['dtype']} | {res['batch']} | {o['images_s'] / h['images_s']:.2f} | "
                     f"{o['peak_rss'] / h['peak_rss']:.2f} | {res['max_abs_diff']:.2e} | {res['max_rel_diff']:.2e} | "
                     f"{res['mean_abs_diff'] / res['mean_abs_ref']:.2e} | {res['loadavg_max']:.1f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- services
def services_text_config(args) -> dict:
    """The small text model behind the services: gemma-3-4b's layer shape, ``--text-layers`` of them (5 local :
    1 global, like the real model), and the tokenizer's vocabulary (bench.checkpoints' default)."""
    n = args.text_layers
    return dict(hidden_size=args.text_hidden, intermediate_size=4 * args.text_hidden, num_hidden_layers=n,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=1024, max_position_embeddings=131_072,
                layer_types=["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
                             for i in range(n)])


def noise_png(size: int, seed) -> bytes:
    """A random-noise RGB PNG: bytes no earlier request carried (PNG is lossless, noise incompressible)."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def counter_totals(path: str) -> dict[str, float]:
    """name -> value summed over data points, from the last export in a GEMMA3_METRICS_FILE."""
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
    except OSError:
        return {}
    out: dict[str, float] = {}
    if lines:
        for resource in json.loads(lines[-1])["resource_metrics"]:
            for scope in resource["scope_metrics"]:
                for metric in scope["metrics"]:
                    points = metric["data"]["data_points"]
                    if points and "value" in points[0]:
                        out[metric["name"]] = sum(pt["value"] for pt in points)
    return out


def proc_peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def put_embedding(redis_url: str, key: str, array: np.ndarray) -> None:
    """Store an embedding in Redis as the vision worker does (``serving.embedding_cache``)."""
    import asyncio

    from serving.embedding_cache import EmbeddingCache

    async def put():
        cache = EmbeddingCache(redis_url, ttl_seconds=600)
        try:
            await cache.put(key, array)
        finally:
            await cache.close()

    asyncio.run(put())


def one_request(stub, request) -> dict:
    """Stream one Generate; client-side time to first token (first chunk with a token) and the usage."""
    t0 = time.perf_counter()
    ttft, tokens, usage = None, 0, None
    for chunk in stub.Generate(request, timeout=1800):
        if chunk.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        tokens += len(chunk.token_ids)
        if chunk.finish_reason:
            usage = chunk.usage
    if ttft is None or usage is None:
        raise RuntimeError("the stream ended without a token or without a finish reason")
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "tokens": tokens,
            "cache_hits": usage.image_cache_hits, "gateway_ttft_s": usage.time_to_first_token_s,
            "key": usage.image_embedding_keys[0] if usage.image_embedding_keys else ""}


def run_services(args, workdir: str, vision: dict, mm_tokens: int) -> dict:
    import hashlib

    sys.path.insert(0, ROOT)
    import grpc

    from gateway.client import build_request
    from gemma3serve.v1 import common_pb2, gateway_pb2_grpc
    from launcher.__main__ import Stack, free_port, redis_server_binary, wait_healthy, wait_redis

    text = services_text_config(args)
    path = os.path.join(workdir, f"services-{vision['image_size']}px-{vision['num_hidden_layers']}l-"
                                 f"text{args.text_layers}x{args.text_hidden}-seed{args.seed}")
    t0 = time.perf_counter()
    # a subprocess, so that torch and the float32 model never sit in the coordinator's memory (reused when
    # the directory already holds this checkpoint)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--_services-checkpoint", path,
                    json.dumps({"text": text, "vision": vision, "mm_tokens": mm_tokens}), "--seed", str(args.seed)],
                   check=True)
    log(f"# services checkpoint {path} ready in {time.perf_counter() - t0:.0f}s")
    logdir = os.path.join(workdir, "logs")

    class FileStack(Stack):
        """The launcher's Stack, each service's output in its own file instead of on our stderr."""

        def _relay(self, name, proc):
            with open(os.path.join(logdir, f"services-{name}.log"), "a") as f:
                for line in proc.stdout:
                    f.write(line)
                    f.flush()

    stack = FileStack("text")
    metrics_path = os.path.join(workdir, "vision-metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    common = ["--model", path, "--dtype", args.service_dtype, "--drain-seconds", "1"]
    env = {"JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    res = {"dtype": args.service_dtype, "text": text, "checkpoint": path, "requests": []}
    try:
        redis_url = args.redis_url
        if not redis_url:  # a private, empty one: nothing cached before the run
            port = free_port()
            redis_proc = stack.start("redis", [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port),
                                               "--save", "", "--appendonly", "no", "--maxmemory", "1gb",
                                               "--maxmemory-policy", "allkeys-lru"])
            redis_url = f"redis://127.0.0.1:{port}/0"
            wait_redis(redis_url, redis_proc, 30)
        env["REDIS_URL"] = redis_url
        vision_port, lm_port, gateway_port = free_port(), free_port(), free_port()
        t0 = time.perf_counter()
        vision_proc = stack.service(
            "vision-worker", "vision_worker", vision_port, *common,
            env={**env, "GEMMA3_METRICS_FILE": metrics_path, "OTEL_METRIC_EXPORT_INTERVAL": "1000"})
        # the LM worker loads while the vision worker compiles and embeds its start-up image
        lm_proc = stack.service("lm-worker", "lm_worker", lm_port, *common, "--num-slots", "1",
                                "--max-length", str(max(512, mm_tokens + 256)), "--max-new-tokens",
                                str(args.new_tokens), env=env)
        wait_healthy("vision-worker", f"127.0.0.1:{vision_port}", "gemma3serve.v1.VisionWorker", vision_proc,
                     args.startup_timeout)
        res["vision_ready_s"] = time.perf_counter() - t0
        wait_healthy("lm-worker", f"127.0.0.1:{lm_port}", "gemma3serve.v1.LMWorker", lm_proc, args.startup_timeout)
        res["lm_ready_s"] = time.perf_counter() - t0
        gateway_proc = stack.service("gateway", "gateway", gateway_port, "--vision-target",
                                     f"127.0.0.1:{vision_port}", "--lm-target", f"127.0.0.1:{lm_port}",
                                     "--drain-seconds", "1", env=env)
        target = f"127.0.0.1:{gateway_port}"
        wait_healthy("gateway", target, "gemma3serve.v1.Gateway", gateway_proc, args.startup_timeout)
        log(f"# stack up in {time.perf_counter() - t0:.0f}s (vision worker ready after {res['vision_ready_s']:.0f}s, "
            f"LM worker after {res['lm_ready_s']:.0f}s)")

        seen: set[str] = set()
        run_nonce = time.time_ns()
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            # Untimed warm-up: the LM worker compiles its prefill for this prompt shape (one image, this text).
            # The image is an embedding put in Redis here and sent by key, as a client may after a first
            # request: the same prompt without another minute in the vision tower.
            key = f"bench-vision:warmup:{os.getpid()}:{time.time_ns()}"
            put_embedding(redis_url, key, np.random.default_rng(args.seed).normal(
                0, 1, (1, mm_tokens, args.text_hidden)).astype(np.float32))
            warm = build_request(args.prompt, [b"x"], max_new_tokens=args.new_tokens, temperature=0.0)
            warm.chat.turns[-1].parts[0].image.CopyFrom(common_pb2.Image(embedding_key=key))
            r = one_request(stub, warm)
            res["warmup"] = r
            log(f"  warm-up (embedding by key): time to first token {r['ttft_s']:.3f}s, {r['tokens']} tokens")
            for i in range(1, args.pairs + 1):
                image = noise_png(args.request_image_px, [args.seed, run_nonce, i])  # new even to a shared Redis
                digest = hashlib.sha256(image).hexdigest()
                if digest in seen:
                    raise RuntimeError("two 'new' images have the same bytes")
                seen.add(digest)
                request = build_request(args.prompt, [image], max_new_tokens=args.new_tokens, temperature=0.0)
                for kind in ("miss", "hit"):  # the same request twice: new bytes, then the same bytes again
                    r = one_request(stub, request)
                    r.update(kind=kind, pair=i, image_bytes=len(image), sha256=digest[:16],
                             loadavg_1m=os.getloadavg()[0])
                    expected = 0 if kind == "miss" else 1
                    if r["cache_hits"] != expected:
                        raise RuntimeError(f"pair {i}: the {kind} reported {r['cache_hits']} cache hits, "
                                           f"expected {expected}")
                    res["requests"].append(r)
                    log(f"  pair {i} {kind}: time to first token {r['ttft_s']:.3f}s "
                        f"(gateway {r['gateway_ttft_s']:.3f}s), {r['tokens']} tokens in {r['total_s']:.2f}s, "
                        f"cache hits {r['cache_hits']}, load average {r['loadavg_1m']:.1f}")
        if len({r["key"] for r in res["requests"]}) != args.pairs:
            raise RuntimeError("the embedding keys do not match the images (one key per image expected)")
        res["vision_peak_rss"] = proc_peak_rss(vision_proc.pid)
        res["lm_peak_rss"] = proc_peak_rss(lm_proc.pid)
    finally:
        stack.stop()  # SIGTERM: the vision worker exports its metrics one last time as it exits
    counters = counter_totals(metrics_path)
    res["vision_cache_hits"] = counters.get("gemma3.vision.cache.hits")
    res["vision_cache_misses"] = counters.get("gemma3.vision.cache.misses")
    n = args.pairs
    if (res["vision_cache_hits"], res["vision_cache_misses"]) != (n, n):
        raise RuntimeError(f"the vision worker counted {res['vision_cache_hits']} hits and "
                           f"{res['vision_cache_misses']} misses; expected {n} of each")
    for kind in ("miss", "hit"):
        timed = [r["ttft_s"] for r in res["requests"] if r["kind"] == kind]
        gw = [r["gateway_ttft_s"] for r in res["requests"] if r["kind"] == kind]
        res[kind] = {"p50_s": float(np.median(timed)), "min_s": min(timed), "max_s": max(timed),
                     "gateway_p50_s": float(np.median(gw)), "n": len(timed)}
    res["ratio_p50"] = res["hit"]["p50_s"] / res["miss"]["p50_s"]
    pair_ratios = [h["ttft_s"] / m["ttft_s"] for m, h in zip(res["requests"][0::2], res["requests"][1::2])]
    res["ratio_pairs"] = pair_ratios
    res["loadavg_max"] = max(r["loadavg_1m"] for r in res["requests"])
    return res


def services_table(res: dict, args, vision: dict, mm_tokens: int) -> str:
    t = res["text"]
    lines = [
        f"Through the gateway's streaming Generate, one request at a time: {args.pairs} pairs of (a new "
        f"{args.request_image_px} x {args.request_image_px} random-noise PNG, "
        f"{res['requests'][0]['image_bytes'] / 1e6:.1f} MB: cache miss; the same request again: cache hit) after "
        f"one untimed warm-up request. Workers in {res['dtype']}; "
        f"text model: {t['num_hidden_layers']} layers of width {t['hidden_size']} (MLP {t['intermediate_size']}); "
        f"{mm_tokens} image tokens; {args.new_tokens} new tokens, greedy. Time to first token measured by the client "
        "(gateway's own figure in brackets). Hits and misses confirmed per request (usage.image_cache_hits) and by "
        f"the vision worker's counters: {res['vision_cache_hits']:.0f} hits, {res['vision_cache_misses']:.0f} "
        "misses.",
        "",
        "| image embedding | requests | TTFT p50 s | min s | max s | gateway TTFT p50 s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, name in (("miss", "cache miss (vision worker embeds)"), ("hit", "cache hit (from Redis)")):
        r = res[kind]
        lines.append(f"| {name} | {r['n']} | {r['p50_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                     f"{r['gateway_p50_s']:.3f} |")
    ok = "meets" if res["ratio_p50"] <= 0.5 else "misses"
    lines += [
        "",
        f"Hit / miss TTFT (p50): **{res['ratio_p50']:.3f}** ({ok} the target <= 0.5; per pair: "
        f"{', '.join(f'{x:.3f}' for x in res['ratio_pairs'])}). Peak RSS: vision worker "
        f"{fmt((res['vision_peak_rss'] or float('nan')) / GIB, 2)} GiB, LM worker "
        f"{fmt((res['lm_peak_rss'] or float('nan')) / GIB, 2)} GiB. Vision worker ready "
        f"{res['vision_ready_s']:.0f} s after start (load, fingerprint, compile, one image). Max 1-min "
        f"load average {res['loadavg_max']:.1f}.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="library,services", help="comma-separated: library,services")
    p.add_argument("--dtypes", default="float32,bfloat16", help="library part")
    p.add_argument("--batches", default="1", help="library part: images per call, comma-separated (e.g. 1,4)")
    p.add_argument("--repeats", type=int, default=1, help="library part: timed calls per library after the cold "
                   "one (best reported)")
    p.add_argument("--layers", type=int, default=VISION_4B["num_hidden_layers"], help="SigLIP encoder layers")
    p.add_argument("--image-size", type=int, default=VISION_4B["image_size"], help="pixels per side")
    p.add_argument("--mm-tokens", type=int, default=MM_TOKENS_4B, help="soft tokens per image (a square)")
    p.add_argument("--text-hidden", type=int, default=TEXT_HIDDEN_4B, help="text width (the projector's output)")
    p.add_argument("--vision-override", action="append", default=[], metavar="KEY=VALUE",
                   help="another vision_config value (hidden_size, intermediate_size, num_attention_heads, ...)")
    p.add_argument("--pairs", type=int, default=2, help="services part: timed (miss, hit) request pairs")
    p.add_argument("--service-dtype", default="float32", choices=DTYPES, help="services part: both workers' dtype")
    p.add_argument("--text-layers", type=int, default=2, help="services part: text decoder layers (4b width)")
    p.add_argument("--new-tokens", type=int, default=4, help="services part: max_new_tokens per request")
    p.add_argument("--request-image-px", type=int, default=896, help="services part: side of the noise PNGs sent")
    p.add_argument("--prompt", default="Describe this image.", help="services part: the question")
    p.add_argument("--redis-url", default="", help="services part: Redis to use (default: a private redis-server)")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="services part: seconds per service")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep checkpoints and logs here (reused); default: a temp dir")
    p.add_argument("--output", default=None, help="also write the Markdown tables to this file")
    p.add_argument("--json", default=None, help="dump the raw measurements to this file")
    p.add_argument("--_worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--_make-checkpoint", nargs=2, metavar=("DIR", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--_services-checkpoint", nargs=2, metavar=("DIR", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    if args._make_checkpoint:
        return make_checkpoint(args._make_checkpoint[0], json.loads(args._make_checkpoint[1]), args.seed)
    if args._services_checkpoint:
        sys.path.insert(0, ROOT)
        from bench.checkpoints import write_multimodal_checkpoint

        spec = json.loads(args._services_checkpoint[1])
        write_multimodal_checkpoint(args._services_checkpoint[0], spec["text"], spec["vision"], args.seed,
                                    mm_tokens_per_image=spec["mm_tokens"])
        return None

    parts = [x for x in args.parts.split(",") if x]
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    for part in parts:
        if part not in ("library", "services"):
            p.error(f"unknown part {part}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d}; choose from {DTYPES}")
    if args.repeats < 1 or any(b < 1 for b in batches) or args.pairs < 1 or args.new_tokens < 1:
        p.error("need --repeats, --pairs, --new-tokens and batches >= 1")
    vision, mm_tokens, text_hidden = vision_shapes(args)
    spec = {"vision": vision, "mm_tokens": mm_tokens, "text_hidden": text_hidden}
    flops = flops_per_image(vision, mm_tokens, text_hidden)

    temp = args.workdir is None
    workdir = tempfile.mkdtemp(prefix="gemma3-bench-vision-") if temp else args.workdir
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    t_start = time.perf_counter()
    out = {"args": vars(args), "python": platform.python_version(), "spec": spec, "flops_per_image": flops}
    text = (f"Vision shapes: {vision['image_size']} px, patch {vision['patch_size']}, {vision['num_hidden_layers']} "
            f"layers, width {vision['hidden_size']}, MLP {vision['intermediate_size']}, "
            f"{vision['num_attention_heads']} heads; projector to {mm_tokens} tokens x {text_hidden}.\n\n")
    try:
        if "library" in parts:
            ckpt = ensure_checkpoint(workdir, spec, args.seed)
            results = []
            for dtype in dtypes:
                for batch in batches:
                    log(f"# library {dtype} batch {batch}")
                    results.append(run_library_config(ckpt, dtype, batch, args, workdir))
            out["library"] = results
            text += "### Library: images/s\n\n" + library_tables(results, args, flops) + "\n"
        if "services" in parts:
            log("# services")
            res = run_services(args, workdir, vision, mm_tokens)
            out["services"] = res
            text += "### Services: time to first token, cache hit vs miss\n\n" + services_table(
                res, args, vision, mm_tokens) + "\n"
        report(text, args.output, args.json, out)
        log(f"# total {time.perf_counter() - t_start:.0f}s")
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
