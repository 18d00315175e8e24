"""``gemma3-gateway``: the public Gateway gRPC API in front of the vision and LM workers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import grpc

from serving.logs import configure_logging
from serving.settings import env_flag, server_flags, tls_flags

SERVICE = "gemma3serve.v1.Gateway"
# Client-side balancing over every address a dns:/// target resolves to (one per worker replica).
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma3-gateway", description=__doc__)
    server_flags(p, "GEMMA3_GATEWAY", 50051)
    env_flag(p, "--vision-target", "GEMMA3_VISION_TARGET", "127.0.0.1:50053",
             "vision worker address (dns:///host:port balances over all replicas), or 'lm': image bytes go to the LM "
             "workers, which embed them (started with --embed-images)")
    env_flag(p, "--lm-target", "GEMMA3_LM_TARGET", "127.0.0.1:50052", "LM worker address (dns:/// for replicas)")
    env_flag(p, "--max-images", "GEMMA3_GATEWAY_MAX_IMAGES", 8, "images per request", type=int)
    env_flag(p, "--max-image-bytes", "GEMMA3_GATEWAY_MAX_IMAGE_BYTES", 20 << 20, "bytes per image", type=int)
    env_flag(p, "--max-request-bytes", "GEMMA3_GATEWAY_MAX_REQUEST_BYTES", 64 << 20, "bytes per request message "
             "(larger ones get RESOURCE_EXHAUSTED from gRPC)", type=int)
    env_flag(p, "--max-streams-per-client", "GEMMA3_GATEWAY_MAX_STREAMS_PER_CLIENT", 64, "calls one client (its "
             "bearer token, else its IP address) may have open at once (0: no limit)", type=int)
    tls_flags(p, "GEMMA3_GATEWAY", client_ca=False)
    env_flag(p, "--token-file", "GEMMA3_GATEWAY_TOKEN_FILE", None, "file of bearer tokens clients must send, one "
             "per line (tokens may also come comma-separated in GEMMA3_GATEWAY_TOKENS; none: no authentication)")
    env_flag(p, "--worker-ca-cert", "GEMMA3_GATEWAY_WORKER_CA_CERT", None,
             "PEM CA that signed the workers' certificates: talk TLS to them")
    env_flag(p, "--worker-client-cert", "GEMMA3_GATEWAY_WORKER_CLIENT_CERT", None,
             "PEM certificate the gateway presents to the workers (mutual TLS; implies TLS)")
    env_flag(p, "--worker-client-key", "GEMMA3_GATEWAY_WORKER_CLIENT_KEY", None, "PEM key of --worker-client-cert")
    env_flag(p, "--worker-tls-server-name", "GEMMA3_GATEWAY_WORKER_TLS_SERVER_NAME", None,
             "name the workers' certificates must carry (default: the target's host name)")
    args = p.parse_args(argv)
    from serving.security import ConfigError, channel_credentials, load_tokens, server_credentials

    try:
        args.server_credentials = server_credentials(args.tls_cert, args.tls_key)
        args.tokens = load_tokens(args.token_file, os.environ.get("GEMMA3_GATEWAY_TOKENS"))
        args.worker_credentials = None
        if args.worker_ca_cert or args.worker_client_cert or args.worker_client_key:
            args.worker_credentials = channel_credentials(args.worker_ca_cert, args.worker_client_cert,
                                                          args.worker_client_key)
    except ConfigError as e:
        p.error(str(e))
    if args.token_file and not args.tokens:
        p.error(f"the token file {args.token_file!r} holds no token")
    return args


def channel(target: str, credentials: grpc.ChannelCredentials | None = None,
            server_name: str | None = None) -> grpc.aio.Channel:
    """A channel to a worker: plaintext, or TLS with ``credentials`` (mutual when they hold a certificate)."""
    from serving.server import CHANNEL_OPTIONS
    from serving.telemetry import client_interceptors

    options = [*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN)]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=client_interceptors())
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=client_interceptors())


async def main_async(args) -> None:
    from gateway.service import GatewayService, Limits
    from gemma3serve.v1 import gateway_pb2_grpc, lm_worker_pb2_grpc, vision_worker_pb2_grpc
    from serving.security import BearerTokenAuth
    from serving.server import Server

    interceptors = [BearerTokenAuth(args.tokens)] if args.tokens else []
    logging.getLogger("gateway").info("security", extra={
        "tls": args.server_credentials is not None, "bearer_tokens": len(args.tokens),
        "worker_tls": args.worker_credentials is not None, "worker_client_cert": bool(args.worker_client_cert)})
    server = Server([SERVICE], args.host, args.port, args.drain_seconds, credentials=args.server_credentials,
                    interceptors=interceptors, max_request_bytes=args.max_request_bytes)
    lm = channel(args.lm_target, args.worker_credentials, args.worker_tls_server_name)
    vision = None if args.vision_target == "lm" else channel(args.vision_target, args.worker_credentials,
                                                             args.worker_tls_server_name)
    service = GatewayService(vision and vision_worker_pb2_grpc.VisionWorkerStub(vision),
                             lm_worker_pb2_grpc.LMWorkerStub(lm),
                             Limits(args.max_images, args.max_image_bytes, args.max_streams_per_client))
    gateway_pb2_grpc.add_GatewayServicer_to_server(service, server.grpc)

    async def on_stop():
        if vision is not None:
            await vision.close()
        await lm.close()

    await server.serve(on_stop=on_stop)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging("gateway", args.log_level, args.log_format)
    from serving.server import run

    run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
