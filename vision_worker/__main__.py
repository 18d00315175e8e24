"""``gemma3-vision-worker``: serve a Gemma 3 checkpoint's vision tower and projector over gRPC."""

from __future__ import annotations

import argparse
import logging
import sys

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

SERVICE = "gemma3serve.v1.VisionWorker"
log = logging.getLogger("vision_worker")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma3-vision-worker", description=__doc__)
    server_flags(p, "GEMMA3_VISION", 50053)
    env_flag(p, "--model", "GEMMA3_MODEL", None, "Hugging Face Gemma 3 (multimodal) checkpoint directory")
    env_flag(p, "--dtype", "GEMMA3_VISION_DTYPE", "bfloat16", "compute dtype", choices=["float32", "bfloat16"])
    env_flag(p, "--max-batch", "GEMMA3_VISION_MAX_BATCH", 8, "images run through the tower together", type=int)
    env_flag(p, "--batch-wait-ms", "GEMMA3_VISION_BATCH_WAIT_MS", 0.0, "how long a batch waits for company "
             "(0: a batch is what arrived while the tower ran the one before)", type=float)
    env_flag(p, "--redis-url", "REDIS_URL", "redis://127.0.0.1:6379/0", "Redis for the embedding cache")
    env_flag(p, "--cache-ttl", "GEMMA3_VISION_CACHE_TTL", 3600, "seconds an embedding stays cached", type=int)
    env_flag(p, "--inline-max-bytes", "GEMMA3_VISION_INLINE_MAX_BYTES", 1 << 20,
             "embeddings of at most this many bytes also travel inline (the LM worker skips Redis for them; a "
             "miss is written to Redis after the reply); larger ones by key alone (0: all by key)", type=int)
    worker_security_flags(p, "GEMMA3_VISION")
    compilation_cache_flag(p)
    cpu_threads_flag(p, "GEMMA3_VISION")
    env_flag(p, "--max-image-pixels", "GEMMA3_VISION_MAX_IMAGE_PIXELS", 64_000_000,
             "pixels per image (width x height, read from the header before decoding)", type=int)
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or GEMMA3_MODEL) is required")
    check_worker_security(p, args, "GEMMA3_VISION")
    return args


async def main_async(args) -> None:
    from gemma3serve.v1 import vision_worker_pb2_grpc
    from serving.embedding_cache import EmbeddingCache
    from serving.security import redact_url
    from serving.server import Server
    from vision_worker.service import VisionWorkerService, namespace_for

    server = Server([SERVICE], args.host, args.port, args.drain_seconds, credentials=args.server_credentials)
    cache = EmbeddingCache(args.redis_url, ttl_seconds=args.cache_ttl, secret=args.cache_secret,
                           ssl_ca_certs=args.redis_ca_cert)
    log.info("embedding cache", extra={"redis": redact_url(args.redis_url), "signed": args.cache_secret is not None})
    service = VisionWorkerService(cache, namespace_for(args.model), args.max_image_pixels, args.inline_max_bytes)
    vision_worker_pb2_grpc.add_VisionWorkerServicer_to_server(service, server.grpc)

    async def warm_up():
        fingerprint = await service.load(args.model, args.dtype, args.max_batch, args.batch_wait_ms)
        log.info("model ready", extra={"model": args.model, "fingerprint": fingerprint[:12]})

    async def on_stop():
        await service.stop()
        await service.cache.close()

    await server.serve(warm_up, on_stop)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("vision-worker", args.log_level, args.log_format)
    use_compilation_cache(args.compilation_cache_dir)
    use_cpu_threads(args.cpu_threads, args.model)
    from serving.server import run

    run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
