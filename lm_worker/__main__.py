"""``gemma3-lm-worker``: serve a Gemma 3 checkpoint's decoder over gRPC (LMWorker, health, reflection)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time

from grpc_health.v1 import health_pb2

from serving.logs import configure_logging
from serving.settings import (
    check_worker_security,
    compilation_cache_flag,
    cpu_threads_flag,
    env_flag,
    server_flags,
    use_compilation_cache,
    use_cpu_threads,
    worker_security_flags,
)

SERVICE = "gemma3serve.v1.LMWorker"
log = logging.getLogger("lm_worker")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma3-lm-worker", description=__doc__)
    server_flags(p, "GEMMA3_LM", 50052)
    env_flag(p, "--model", "GEMMA3_MODEL", None, "Hugging Face Gemma 3 checkpoint directory", required=False)
    env_flag(p, "--dtype", "GEMMA3_LM_DTYPE", "bfloat16", "parameter and compute dtype",
             choices=["float32", "bfloat16"])
    env_flag(p, "--num-slots", "GEMMA3_LM_NUM_SLOTS", 8, "decode slots (requests decoded together)", type=int)
    env_flag(p, "--max-length", "GEMMA3_LM_MAX_LENGTH", 4096, "context window per request (prompt + answer)",
             type=int)
    env_flag(p, "--max-queue", "GEMMA3_LM_MAX_QUEUE", 64, "requests waiting beyond the slots before "
             "RESOURCE_EXHAUSTED", type=int)
    env_flag(p, "--max-new-tokens", "GEMMA3_LM_MAX_NEW_TOKENS", 256, "default max_new_tokens", type=int)
    env_flag(p, "--max-new-tokens-limit", "GEMMA3_LM_MAX_NEW_TOKENS_LIMIT", 0, "most max_new_tokens a request may "
             "ask (0: what the context has left)", type=int)
    env_flag(p, "--max-prompt-tokens", "GEMMA3_LM_MAX_PROMPT_TOKENS", 0, "most prompt tokens, image tokens included "
             "(0: the context less one)", type=int)
    env_flag(p, "--decode-burst-ms", "GEMMA3_LM_DECODE_BURST_MS", None, "longest a device call may decode for "
             "when no request waits for a slot, so the longest tokens wait to stream: a step can cost less than a "
             "call's host overhead, so it decodes several tokens per call (0: one token per call; default 80 where "
             "a request that comes meanwhile ends the call after the step under way (the CPU kernel, no mesh), else "
             "20)", type=float)
    env_flag(p, "--prefill-chunk", "GEMMA3_LM_PREFILL_CHUNK", 512, "most prompt tokens one prefill call takes: a "
             "longer prompt prefills a chunk at a time, between the running requests' decode calls, so they never "
             "wait for more than a chunk's prefill (0: whole prompts; at least an image's tokens)", type=int)
    env_flag(p, "--prefix-cache", "GEMMA3_LM_PREFIX_CACHE", 4, "prompts whose cache rows are kept on the device "
             "so that a later prompt that begins alike (a shared system prompt, a conversation's earlier turns, "
             "the same prompt again) prefills only the rest; each as large as one slot's cache (0: none)", type=int)
    env_flag(p, "--warm-up", "GEMMA3_LM_WARM_UP", "smallest", "before serving, compile the prefill of the smallest "
             "text bucket only ('smallest': a fast start; a longer prompt compiles its bucket on first use), or of "
             "every prompt-length bucket a chunk takes, text and one image, whole and as a later chunk or after a "
             "kept prefix ('all', as JetStream does: no request waits for XLA; minutes on a CPU at a long "
             "max-length, once: the compilation cache keeps them)",
             choices=["smallest", "all"])
    env_flag(p, "--max-top-logprobs", "GEMMA3_LM_MAX_TOP_LOGPROBS", 5, "most alternatives a request may ask "
             "logprobs for", type=int)
    env_flag(p, "--tensor-parallel", "GEMMA3_LM_TENSOR_PARALLEL", 1, "mesh tensor axis (the rest goes to data)",
             type=int)
    env_flag(p, "--fsdp", "GEMMA3_LM_FSDP", 1, "mesh fsdp axis", type=int)
    env_flag(p, "--redis-url", "REDIS_URL", "redis://127.0.0.1:6379/0", "Redis holding the image embeddings")
    env_flag(p, "--embed-images", "GEMMA3_LM_EMBED_IMAGES", False, "also load the vision tower and embed images "
             "sent as bytes (a gateway with --vision-target lm sends them so), through the same Redis cache as the "
             "vision worker: no vision worker and no hop to it; for one machine or a small model", type=bool)
    env_flag(p, "--max-image-pixels", "GEMMA3_LM_MAX_IMAGE_PIXELS", 64_000_000, "with --embed-images: pixels per "
             "image (width x height, read from the header before decoding)", type=int)
    env_flag(p, "--cache-ttl", "GEMMA3_LM_CACHE_TTL", 3600, "with --embed-images: seconds an embedding made here "
             "stays cached", type=int)
    env_flag(p, "--coordinator-address", "GEMMA3_LM_COORDINATOR_ADDRESS", None, "multi-host: host:port of "
             "process 0's JAX coordinator (unset: one process)")
    env_flag(p, "--num-processes", "GEMMA3_LM_NUM_PROCESSES", 1, "multi-host: processes in the group", type=int)
    env_flag(p, "--process-id", "GEMMA3_LM_PROCESS_ID", -1, "multi-host: this process's id, 0 the leader (-1: "
             "the ordinal at the end of the host name, as in a StatefulSet)", type=int)
    env_flag(p, "--group-port", "GEMMA3_LM_GROUP_PORT", 0, "multi-host: the leader's port for its followers "
             "(0: the coordinator's port + 1)", type=int)
    env_flag(p, "--group-timeout", "GEMMA3_LM_GROUP_TIMEOUT", 5.0, "multi-host: seconds of silence after which a "
             "process counts as gone", type=float)
    worker_security_flags(p, "GEMMA3_LM")
    compilation_cache_flag(p)
    cpu_threads_flag(p, "GEMMA3_LM")
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or GEMMA3_MODEL) is required")
    if args.num_processes > 1:
        if not args.coordinator_address or ":" not in args.coordinator_address:
            p.error("--num-processes > 1 needs --coordinator-address host:port")
        if args.process_id >= args.num_processes:
            p.error(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
        host, port = args.coordinator_address.rsplit(":", 1)
        args.group_address = f"{host}:{args.group_port or int(port) + 1}"
        if args.embed_images:
            p.error("--embed-images runs on one process: with --num-processes > 1, run a vision worker")
    check_worker_security(p, args, "GEMMA3_LM")
    return args


def load(args):
    """The model (text-only or multimodal, by its config.json) and its mesh over every device (each
    process reads only the slices of the weights its own devices hold)."""
    import jax
    import jax.numpy as jnp

    from gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration, create_mesh

    with open(os.path.join(args.model, "config.json")) as f:
        multimodal = "vision_config" in json.load(f)
    cls = Gemma3ForConditionalGeneration if multimodal else Gemma3ForCausalLM
    mesh = None
    if len(jax.devices()) > 1:  # with several processes: every device of the group
        mesh = create_mesh(data=-1, fsdp=args.fsdp, tensor=args.tensor_parallel)
    # The head as the loader keeps it on one CPU device (split in float32, screened in bfloat16): decode calls
    # whose requests are all greedy and want no log-probabilities take the argmax without the logits (Engine).
    # Past 16 slots a split head's logits (its kernel's row loops, SplitFloat32Embed.attend) cost more than
    # XLA's GEMM on the table, which every sampled or log-probability step needs, and a screen's pass keeps
    # slots x vocabulary sums.
    light = None if args.num_slots <= 16 else False
    return cls.from_pretrained(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh, split_head=light,
                               screen_head=light), mesh


def follower(args) -> int:
    """A follower process: the model's slice on this host's devices, running the leader's device calls."""
    from lm_worker.engine import DeviceProgram
    from lm_worker.group import follow

    health = follower_health(args)
    model, mesh = load(args)
    program = DeviceProgram(model, args.num_slots, args.max_length, args.max_top_logprobs, mesh)
    try:
        follow(program, args.group_address, args.process_id,
               on_connected=lambda: health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING))
    except (OSError, ValueError) as e:
        log.error("lost the leader", extra={"error": str(e)})
        return 1
    return 0


def follower_health(args):
    """A follower serves only grpc.health.v1 (NOT_SERVING until it follows the leader), on the worker's
    port, so that one pod template with the same probes fits every process of a group."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{args.host}:{args.port}"
    if args.server_credentials is not None:
        server.add_secure_port(address, args.server_credentials)
    else:
        server.add_insecure_port(address)
    server.start()
    servicer.server = server  # kept alive with the servicer (a collected grpc.Server stops)
    return servicer


async def main_async(args) -> None:
    from gemma3serve.v1 import lm_worker_pb2_grpc
    from lm_worker.engine import DeviceProgram, Engine
    from lm_worker.group import GroupProgram, Leader
    from lm_worker.prompts import PromptBuilder
    from lm_worker.service import LMWorkerService
    from serving.embedding_cache import EmbeddingCache
    from serving.security import redact_url
    from serving.server import Server

    server = Server([SERVICE], args.host, args.port, args.drain_seconds, credentials=args.server_credentials)
    cache = EmbeddingCache(args.redis_url, ttl_seconds=args.cache_ttl, secret=args.cache_secret,
                           ssl_ca_certs=args.redis_ca_cert)
    log.info("embedding cache", extra={"redis": redact_url(args.redis_url), "signed": args.cache_secret is not None})
    service = LMWorkerService(cache, default_max_new_tokens=args.max_new_tokens,
                              max_new_tokens_limit=args.max_new_tokens_limit, max_prompt_tokens=args.max_prompt_tokens)
    lm_worker_pb2_grpc.add_LMWorkerServicer_to_server(service, server.grpc)
    if args.embed_images:
        from vision_worker.service import VisionWorkerService, namespace_for

        # every image embedding goes to Redis behind the answer's first token: none travels on a wire
        vision = VisionWorkerService(cache, namespace_for(args.model), args.max_image_pixels, inline_max_bytes=1 << 62)

    leader = None

    async def warm_up():
        nonlocal leader
        model, mesh = await asyncio.to_thread(load, args)
        prompts = PromptBuilder.from_pretrained(args.model, model.config)
        if args.embed_images and prompts.embedding_shape is None:
            raise RuntimeError(f"--embed-images needs a multimodal checkpoint; {args.model} is text-only")
        program = DeviceProgram(model, args.num_slots, args.max_length, args.max_top_logprobs, mesh)
        if args.num_processes > 1:
            host, port = args.group_address.rsplit(":", 1)
            leader = Leader(host, int(port), args.num_processes - 1, timeout=args.group_timeout)
            await asyncio.to_thread(leader.accept)
            program = GroupProgram(program, leader)
        engine = Engine(model, num_slots=args.num_slots, max_length=args.max_length, max_queue=args.max_queue,
                        max_top_logprobs=args.max_top_logprobs, program=program, burst_ms=args.decode_burst_ms,
                        prefill_chunk=args.prefill_chunk, prefix_rows=args.prefix_cache)
        if leader is not None:
            loop = asyncio.get_running_loop()

            def on_failure(reason: str) -> None:  # from a watcher thread
                engine.fail_all(reason)
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(server.set_serving(False)))

            leader.on_failure = on_failure
        engine.start()
        every_bucket = args.warm_up == "all"
        image = None if prompts.embedding_shape is None or not every_bucket else (
            model.config.image_token_index, *prompts.embedding_shape)
        started = time.monotonic()
        runs = await asyncio.to_thread(engine.warm_up, prompts.bos_id, image, every_bucket)
        log.info("warmed up", extra={"buckets": engine.chunk_buckets if every_bucket else engine.chunk_buckets[:1],
                                     "prompts": runs, "seconds": round(time.monotonic() - started, 1)})
        if args.embed_images:
            from gemma3 import Gemma3ImageEncoder

            encoder = Gemma3ImageEncoder(model.config, of=model.model)  # the model's own tower and projector
            fingerprint = await vision.load(args.model, args.dtype, max_batch=8, wait_ms=0.0, encoder=encoder)
            service.vision = vision
            log.info("vision tower ready", extra={"fingerprint": fingerprint[:12]})
        service.attach(engine, prompts)
        log.info("model ready", extra={"model": args.model, "slots": args.num_slots})

    async def on_stop():
        if service.engine is not None and not service.engine.broken:
            service.engine.stop()
        if leader is not None:
            leader.close()
        if service.vision is not None:
            await service.vision.stop()
        await service.cache.close()

    await server.serve(warm_up, on_stop)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("lm-worker", args.log_level, args.log_format)
    use_compilation_cache(args.compilation_cache_dir)
    use_cpu_threads(args.cpu_threads, args.model)
    if args.num_processes > 1:
        from lm_worker.group import initialize

        if args.process_id < 0:  # a StatefulSet's pod: lm-worker-3 is process 3
            ordinal = socket.gethostname().rsplit("-", 1)[-1]
            if not ordinal.isdigit() or int(ordinal) >= args.num_processes:
                print(f"gemma3-lm-worker: error: --process-id is not set and the host name {socket.gethostname()!r} "
                      f"does not end in an ordinal below {args.num_processes}", file=sys.stderr)
                return 2
            args.process_id = int(ordinal)
        initialize(args.coordinator_address, args.num_processes, args.process_id)
        if args.process_id != 0:
            code = follower(args)
            logging.shutdown()
            os._exit(code)  # not jax.distributed's exit barrier: the group may already be gone
    from serving.server import run

    run(main_async(args))
    if args.num_processes > 1:
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
