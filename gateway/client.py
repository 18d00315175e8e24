"""Python clients of the Gateway (sync and asyncio) and the ``gemma3-client`` command.

    gemma3-client --image cat.png "What is in this image?"
    gemma3-client --json --max-new-tokens 64 "Tell me a joke"
    GEMMA3_CLIENT_TOKEN=... gemma3-client --target gemma.example.com:443 --ca-cert ca.pem "Hello"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from google.protobuf.json_format import MessageToDict

from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

ImageLike = bytes | str | os.PathLike


def _image(image: ImageLike) -> common_pb2.Image:
    if isinstance(image, bytes):
        return common_pb2.Image(data=image)
    with open(image, "rb") as f:
        return common_pb2.Image(data=f.read())


def build_request(prompt: str, images: Sequence[ImageLike] = (), system: str | None = None,
                  request_id: str = "", pan_and_scan: bool = False, **sampling) -> gateway_pb2.GenerateRequest:
    """A one-turn chat: the images first, then the prompt text. ``sampling``: SamplingParams fields
    (max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids)."""
    turns = []
    if system:
        turns.append(common_pb2.Turn(role="system", parts=[common_pb2.ContentPart(text=system)]))
    parts = [common_pb2.ContentPart(image=_image(i)) for i in images] + [common_pb2.ContentPart(text=prompt)]
    turns.append(common_pb2.Turn(role="user", parts=parts))
    return gateway_pb2.GenerateRequest(request_id=request_id, chat=common_pb2.Chat(turns=turns),
                                       sampling=common_pb2.SamplingParams(**sampling), pan_and_scan=pan_and_scan)


def _security(token: str | None, ca_cert: str | None, tls: bool, tls_server_name: str | None):
    """(channel credentials or None for plaintext, channel options, call metadata)."""
    from serving.security import channel_credentials

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    if not (tls or ca_cert):
        return None, [], metadata
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return channel_credentials(ca_cert), options, metadata


class Client:
    """Blocking client: ``stream`` yields GenerateResponse chunks, ``complete`` returns the whole answer.

    ``token``: a bearer token for a gateway that requires one; ``ca_cert`` (or ``tls=True`` for the
    system's roots): TLS; ``tls_server_name``: the name the gateway's certificate carries, when the
    target's host is another (a port-forward, an IP address)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 300.0, *, token: str | None = None,
                 ca_cert: str | None = None, tls: bool = False, tls_server_name: str | None = None):
        credentials, options, self.metadata = _security(token, ca_cert, tls, tls_server_name)
        self.channel = (grpc.secure_channel(target, credentials, options=options) if credentials
                        else grpc.insecure_channel(target))
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def stream(self, request: gateway_pb2.GenerateRequest) -> Iterator[common_pb2.GenerateResponse]:
        return self.stub.Generate(request, timeout=self.timeout, metadata=self.metadata)

    def complete(self, request: gateway_pb2.GenerateRequest) -> common_pb2.GenerateResponse:
        return self.stub.GenerateComplete(request, timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client with the same methods and options as :class:`Client`."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 300.0, *, token: str | None = None,
                 ca_cert: str | None = None, tls: bool = False, tls_server_name: str | None = None):
        credentials, options, self.metadata = _security(token, ca_cert, tls, tls_server_name)
        self.channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                        else grpc.aio.insecure_channel(target))
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def stream(self, request: gateway_pb2.GenerateRequest) -> AsyncIterator[common_pb2.GenerateResponse]:
        return self.stub.Generate(request, timeout=self.timeout, metadata=self.metadata)

    async def complete(self, request: gateway_pb2.GenerateRequest) -> common_pb2.GenerateResponse:
        return await self.stub.GenerateComplete(request, timeout=self.timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gemma3-client", description="Ask the Gemma 3 gateway; the answer streams "
                                "to stdout.")
    p.add_argument("prompt")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--target", default=os.environ.get("GEMMA3_GATEWAY_TARGET", "127.0.0.1:50051"),
                   help="gateway address [env GEMMA3_GATEWAY_TARGET]")
    p.add_argument("--token", default=os.environ.get("GEMMA3_CLIENT_TOKEN"),
                   help="bearer token for a gateway that requires one (the variable keeps it out of `ps`) "
                   "[env GEMMA3_CLIENT_TOKEN]")
    p.add_argument("--ca-cert", default=os.environ.get("GEMMA3_CLIENT_CA_CERT"),
                   help="PEM CA that signed the gateway's certificate: connect with TLS [env GEMMA3_CLIENT_CA_CERT]")
    p.add_argument("--tls", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("GEMMA3_CLIENT_TLS", "").lower() in ("1", "true", "yes", "on"),
                   help="connect with TLS, trusting the system's roots [env GEMMA3_CLIENT_TLS]")
    p.add_argument("--tls-server-name", default=os.environ.get("GEMMA3_CLIENT_TLS_SERVER_NAME"),
                   help="name the gateway's certificate carries, if not the target's host "
                   "[env GEMMA3_CLIENT_TLS_SERVER_NAME]")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--pan-and-scan", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print the whole answer as one JSON object")
    args = p.parse_args(argv)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, stop=args.stop)
    if args.seed is not None:
        sampling["seed"] = args.seed
    try:
        request = build_request(args.prompt, args.image, args.system, pan_and_scan=args.pan_and_scan, **sampling)
    except OSError as e:
        print(f"gemma3-client: cannot read image: {e}", file=sys.stderr)
        return 2
    try:
        client = Client(args.target, args.timeout, token=args.token, ca_cert=args.ca_cert, tls=args.tls,
                        tls_server_name=args.tls_server_name)
    except ValueError as e:
        print(f"gemma3-client: {e}", file=sys.stderr)
        return 2
    if args.token and not (args.tls or args.ca_cert) and not _is_local(args.target):
        print("gemma3-client: warning: sending the token without TLS (--ca-cert or --tls)", file=sys.stderr)
    with client:
        try:
            if args.json:
                reply = client.complete(request)
                print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True)))
            else:
                for chunk in client.stream(request):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        except grpc.RpcError as e:
            print(f"gemma3-client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _is_local(target: str) -> bool:
    from serving.security import is_loopback

    host = target.split("///")[-1].rsplit(":", 1)[0]
    return is_loopback(host)


if __name__ == "__main__":
    sys.exit(main())
