"""Python clients of the Gateway (sync and asyncio) and the ``gemma3-client`` command.

    gemma3-client --image cat.png "What is in this image?"
    gemma3-client --json --max-new-tokens 64 "Tell me a joke"
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


class Client:
    """Blocking client: ``stream`` yields GenerateResponse chunks, ``complete`` returns the whole answer."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 300.0):
        self.channel = grpc.insecure_channel(target)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def stream(self, request: gateway_pb2.GenerateRequest) -> Iterator[common_pb2.GenerateResponse]:
        return self.stub.Generate(request, timeout=self.timeout)

    def complete(self, request: gateway_pb2.GenerateRequest) -> common_pb2.GenerateResponse:
        return self.stub.GenerateComplete(request, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client with the same methods as :class:`Client`."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 300.0):
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.timeout = timeout

    def stream(self, request: gateway_pb2.GenerateRequest) -> AsyncIterator[common_pb2.GenerateResponse]:
        return self.stub.Generate(request, timeout=self.timeout)

    async def complete(self, request: gateway_pb2.GenerateRequest) -> common_pb2.GenerateResponse:
        return await self.stub.GenerateComplete(request, timeout=self.timeout)

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
    with Client(args.target, args.timeout) as client:
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


if __name__ == "__main__":
    sys.exit(main())
