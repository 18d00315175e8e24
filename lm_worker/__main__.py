"""``gemma3-lm-worker``: serve a Gemma 3 checkpoint's decoder over gRPC (LMWorker, health, reflection)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from serving.logs import configure_logging
from serving.settings import check_worker_security, env_flag, server_flags, worker_security_flags

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
    env_flag(p, "--max-top-logprobs", "GEMMA3_LM_MAX_TOP_LOGPROBS", 5, "most alternatives a request may ask "
             "logprobs for", type=int)
    env_flag(p, "--tensor-parallel", "GEMMA3_LM_TENSOR_PARALLEL", 1, "mesh tensor axis (the rest goes to data)",
             type=int)
    env_flag(p, "--fsdp", "GEMMA3_LM_FSDP", 1, "mesh fsdp axis", type=int)
    env_flag(p, "--redis-url", "REDIS_URL", "redis://127.0.0.1:6379/0", "Redis holding the image embeddings")
    worker_security_flags(p, "GEMMA3_LM")
    args = p.parse_args(argv)
    if not args.model:
        p.error("--model (or GEMMA3_MODEL) is required")
    check_worker_security(p, args, "GEMMA3_LM")
    return args


def load(args):
    """The model (text-only or multimodal, by its config.json), on a mesh over every local device."""
    import jax
    import jax.numpy as jnp

    from gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration, create_mesh

    with open(os.path.join(args.model, "config.json")) as f:
        multimodal = "vision_config" in json.load(f)
    cls = Gemma3ForConditionalGeneration if multimodal else Gemma3ForCausalLM
    mesh = None
    if len(jax.devices()) > 1:
        mesh = create_mesh(data=-1, fsdp=args.fsdp, tensor=args.tensor_parallel)
    return cls.from_pretrained(args.model, dtype=getattr(jnp, args.dtype), mesh=mesh)


async def main_async(args) -> None:
    from gemma3serve.v1 import lm_worker_pb2_grpc
    from lm_worker.engine import Engine, Request
    from lm_worker.prompts import PromptBuilder
    from lm_worker.service import LMWorkerService
    from serving.embedding_cache import EmbeddingCache
    from serving.security import redact_url
    from serving.server import Server

    server = Server([SERVICE], args.host, args.port, args.drain_seconds, credentials=args.server_credentials)
    cache = EmbeddingCache(args.redis_url, secret=args.cache_secret, ssl_ca_certs=args.redis_ca_cert)
    log.info("embedding cache", extra={"redis": redact_url(args.redis_url), "signed": args.cache_secret is not None})
    service = LMWorkerService(cache, default_max_new_tokens=args.max_new_tokens,
                              max_new_tokens_limit=args.max_new_tokens_limit, max_prompt_tokens=args.max_prompt_tokens)
    lm_worker_pb2_grpc.add_LMWorkerServicer_to_server(service, server.grpc)

    async def warm_up():
        model = await asyncio.to_thread(load, args)
        prompts = PromptBuilder.from_pretrained(args.model, model.config)
        engine = Engine(model, num_slots=args.num_slots, max_length=args.max_length, max_queue=args.max_queue,
                        max_top_logprobs=args.max_top_logprobs).start()
        probe = engine.submit(Request(prompt_ids=[prompts.bos_id], max_new_tokens=2))  # compiles the hot path
        await asyncio.to_thread(lambda: list(probe.stream()))
        service.attach(engine, prompts)
        log.info("model ready", extra={"model": args.model, "slots": args.num_slots})

    async def on_stop():
        if service.engine is not None:
            service.engine.stop()
        await service.cache.close()

    await server.serve(warm_up, on_stop)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("lm-worker", args.log_level, args.log_format)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
