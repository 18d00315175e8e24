"""End to end: ``gemma3-stack`` brings up Redis and the three services on the shipped demo model, and
the demo model answers questions about freshly drawn images through the gateway and the CLI."""

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np
import pytest

from demo.shapes import render_scene
from gateway.client import Client, build_request
from tests import services


def started_pids(log_name: str) -> list[int]:
    """The processes the launcher says it started (redis, the two workers, the gateway)."""
    return [int(p) for p in re.findall(r"gemma3-stack: started \S+ \(pid (\d+)\)", open(log_name).read())]


@pytest.fixture(scope="module")
def launched():
    """The launcher as a user runs it, but without REDIS_URL: it starts its own redis-server."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(XLA_FLAGS="", PYTHONPATH=services.ROOT)
    port = services.free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "--port", str(port), "--num-slots", "4",
                             "--max-length", "256"], env=env, cwd=services.ROOT, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    stopped = False
    try:
        deadline = time.monotonic() + 600
        while "gemma3-stack: up" not in open(log.name).read():
            assert proc.poll() is None, "the launcher exited:\n" + open(log.name).read()
            assert time.monotonic() < deadline, "the stack did not come up:\n" + open(log.name).read()
            time.sleep(0.5)
        yield target, log.name
        proc.send_signal(signal.SIGINT)  # Ctrl-C: every service drains and stops, the launcher exits 0
        try:  # (the launcher gives each of its 4 processes up to 20 s: 80 s at worst)
            status = proc.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher did not stop in 90 s after Ctrl-C:\n" + open(log.name).read())
        assert status == 0, open(log.name).read()
        pids = started_pids(log.name)
        assert len(pids) == 4
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        stopped = True
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in [] if stopped else started_pids(log.name):
            try:  # a failed stop leaves no orphaned workers behind for the rest of the suite
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.unlink(log.name)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def cli(target, image_path, question) -> str:
    """The answer as ``gemma3-client`` streams it to the terminal."""
    out = subprocess.run([sys.executable, "-m", "gateway.client", "--target", target, "--image", image_path, question],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": services.ROOT})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_demo_model_names_shape_colour_and_position(launched, tmp_path):
    target, log = launched
    first = tmp_path / "red-circle.png"
    first.write_bytes(png(render_scene("circle", "red", "top left", noise_seed=fresh_seed())))
    answer = cli(target, str(first), "What is in this image?")
    assert "red circle" in answer and "top left" in answer, answer

    second = tmp_path / "two-shapes.png"
    second.write_bytes(png(render_scene("square", "blue", "bottom right", also=[("triangle", "yellow", "top right")],
                                        background=(225, 235, 245), noise_seed=fresh_seed())))
    answer = cli(target, str(second), "What is in this image?")
    assert "blue square" in answer and "bottom right" in answer and "yellow triangle" in answer, answer
    assert "red" not in answer

    with Client(target) as client:  # another question about the first image: its embedding is cached
        reply = client.complete(build_request("What colour is the circle?", [str(first)]))
    assert reply.text.strip() == "red" and reply.usage.image_cache_hits == 1
    with Client(target) as client:
        reply = client.complete(build_request("How many shapes are there?", [str(second)]))
    assert reply.text.strip() == "two" and reply.usage.image_cache_hits == 1

    logs = open(log).read()
    for name in ("redis", "vision-worker", "lm-worker", "gateway"):
        assert f"{name:>13} | " in logs, f"no log lines from {name}"
