"""The committed gRPC stubs are what the .proto files generate, and they import from the package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_and_round_trip():
    from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, lm_worker_pb2_grpc, vision_worker_pb2_grpc

    request = gateway_pb2.GenerateRequest(
        request_id="r1",
        chat=common_pb2.Chat(turns=[common_pb2.Turn(role="user", parts=[
            common_pb2.ContentPart(image=common_pb2.Image(data=b"\x89PNG")),
            common_pb2.ContentPart(text="What is in this image?")])]),
        sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=0.5, seed=3, stop=["\n"]),
    )
    back = gateway_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert back == request and back.WhichOneof("prompt") == "chat" and back.sampling.HasField("seed")
    assert hasattr(gateway_pb2_grpc, "GatewayStub") and hasattr(lm_worker_pb2_grpc, "LMWorkerServicer")
    assert hasattr(vision_worker_pb2_grpc, "add_VisionWorkerServicer_to_server")
