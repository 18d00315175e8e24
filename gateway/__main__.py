"""``gemma3-gateway``: the public Gateway gRPC API in front of the vision and LM workers."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc

from serving.logs import configure_logging
from serving.settings import env_flag, server_flags

SERVICE = "gemma3serve.v1.Gateway"
# Client-side balancing over every address a dns:/// target resolves to (one per worker replica).
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma3-gateway", description=__doc__)
    server_flags(p, "GEMMA3_GATEWAY", 50051)
    env_flag(p, "--vision-target", "GEMMA3_VISION_TARGET", "127.0.0.1:50053",
             "vision worker address (dns:///host:port balances over all replicas)")
    env_flag(p, "--lm-target", "GEMMA3_LM_TARGET", "127.0.0.1:50052", "LM worker address (dns:/// for replicas)")
    env_flag(p, "--max-images", "GEMMA3_GATEWAY_MAX_IMAGES", 8, "images per request", type=int)
    env_flag(p, "--max-image-bytes", "GEMMA3_GATEWAY_MAX_IMAGE_BYTES", 20 << 20, "bytes per image", type=int)
    return p.parse_args(argv)


def channel(target: str) -> grpc.aio.Channel:
    from serving.server import CHANNEL_OPTIONS
    from serving.telemetry import client_interceptors

    return grpc.aio.insecure_channel(target, options=[*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN)],
                                     interceptors=client_interceptors())


async def main_async(args) -> None:
    from gateway.service import GatewayService, Limits
    from gemma3serve.v1 import gateway_pb2_grpc, lm_worker_pb2_grpc, vision_worker_pb2_grpc
    from serving.server import Server

    server = Server([SERVICE], args.host, args.port, args.drain_seconds)
    vision, lm = channel(args.vision_target), channel(args.lm_target)
    service = GatewayService(vision_worker_pb2_grpc.VisionWorkerStub(vision), lm_worker_pb2_grpc.LMWorkerStub(lm),
                             Limits(args.max_images, args.max_image_bytes))
    gateway_pb2_grpc.add_GatewayServicer_to_server(service, server.grpc)

    async def on_stop():
        await vision.close()
        await lm.close()

    await server.serve(on_stop=on_stop)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("gateway", args.log_level, args.log_format)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
