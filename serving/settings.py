"""Command-line flags that each have an environment-variable equivalent (the flag wins).

Compose files and Kubernetes manifests configure through the environment, people through flags;
both name the same setting, and ``--help`` shows the variable beside each flag.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os


def env_flag(parser: argparse.ArgumentParser, flag: str, env: str, default, help: str, type=str, **kwargs) -> None:
    """Add ``--flag`` whose default comes from ``$env`` (then ``default``)."""
    raw = os.environ.get(env)
    if raw is not None and type is bool:
        value = raw.strip().lower() in ("1", "true", "yes", "on")
    else:
        value = type(raw) if raw is not None else default
    if type is bool:
        parser.add_argument(flag, default=value, action=argparse.BooleanOptionalAction, help=f"{help} [env {env}]",
                            **kwargs)
    else:
        parser.add_argument(flag, default=value, type=type, help=f"{help} [env {env}, default {default}]", **kwargs)


def server_flags(parser: argparse.ArgumentParser, prefix: str, port: int) -> None:
    """Flags every server has: where it listens, how long it drains, how it logs."""
    env_flag(parser, "--host", f"{prefix}_HOST", "127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    env_flag(parser, "--port", f"{prefix}_PORT", port, "port to listen on (0: any free port)", type=int)
    env_flag(parser, "--drain-seconds", f"{prefix}_DRAIN_SECONDS", 10.0,
             "on SIGTERM, seconds to let in-flight calls finish", type=float)
    env_flag(parser, "--log-level", f"{prefix}_LOG_LEVEL", "INFO", "log level")
    env_flag(parser, "--log-format", f"{prefix}_LOG_FORMAT", "json", "log format: json or text",
             choices=["json", "text"])


def compilation_cache_flag(parser: argparse.ArgumentParser) -> None:
    """Where XLA's compiled programs persist across restarts (JAX's own variable, so one setting also
    reaches any other JAX program): a restart then loads them instead of compiling for minutes."""
    env_flag(parser, "--compilation-cache-dir", "JAX_COMPILATION_CACHE_DIR", None,
             "directory for JAX's persistent compilation cache (unset: compile at every start)")


def use_compilation_cache(path: str | None) -> None:
    """Point JAX's persistent compilation cache at ``path`` (before the first compile)."""
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)


SMALL_MODEL_BYTES = 64 << 20
"""Weights under this size run on one XLA CPU thread with ``--cpu-threads auto``."""


def _cpu_threads(raw: str) -> str:
    if raw == "auto" or (raw.isdigit() and int(raw) >= 1):
        return raw
    raise argparse.ArgumentTypeError(f"expected auto or a number of threads >= 1, got {raw!r}")


def cpu_threads_flag(parser: argparse.ArgumentParser, prefix: str) -> None:
    """How many threads XLA's CPU backend runs a program on (its intra-op pool)."""
    env_flag(parser, "--cpu-threads", f"{prefix}_CPU_THREADS", "auto",
             "XLA's CPU threads: a number, or auto: 1 for a model whose weights take under 64 MB (the demo "
             "model), whose steps are too short to share, else one per core (or what NPROC says)", type=_cpu_threads)


def use_cpu_threads(value: str, model_dir: str) -> int | None:
    """Size XLA's CPU thread pool before JAX starts its CPU client (it reads ``NPROC`` then, once); the
    size set, or None where it is left to XLA (every core) or to an ``NPROC`` already set.

    Why a small model gets one thread: its decode step takes a fraction of a millisecond, too little to
    split, and XLA's pool threads spin for work between steps. Beside the gateway and the vision worker
    on a 2-core machine, the demo model's LM worker spent 11.8 ms of CPU per 32-token request with the
    pool's 2 threads and 6.6 ms with 1, and answered through the gateway in 7.6 ms instead of 10.3
    (bench/RESULTS.md). A larger model's products use the pool (gemma-3-270m decodes 1.7x slower on
    one thread)."""
    threads = None
    if value != "auto":
        threads = int(value)
    elif "NPROC" not in os.environ:
        weights = sum(os.path.getsize(f) for f in glob.glob(os.path.join(model_dir, "*.safetensors")))
        threads = 1 if 0 < weights < SMALL_MODEL_BYTES else None
    if threads is not None:
        os.environ["NPROC"] = str(threads)
    logging.getLogger(__name__).info("XLA CPU threads", extra={"threads": os.environ.get("NPROC", "one per core")})
    return threads


def tls_flags(parser: argparse.ArgumentParser, prefix: str, client_ca: bool) -> None:
    """The server's own certificate (TLS) and, for workers, the CA whose client certificates it accepts."""
    env_flag(parser, "--tls-cert", f"{prefix}_TLS_CERT", None, "PEM certificate (chain) to serve TLS with")
    env_flag(parser, "--tls-key", f"{prefix}_TLS_KEY", None, "PEM private key of --tls-cert")
    if client_ca:
        env_flag(parser, "--tls-client-ca", f"{prefix}_TLS_CLIENT_CA", None,
                 "PEM CA: require clients (the gateway) to present a certificate it signed (mutual TLS)")


def worker_security_flags(parser: argparse.ArgumentParser, prefix: str) -> None:
    """A worker's TLS, the plaintext opt-in, and the embedding cache's Redis TLS and secret."""
    tls_flags(parser, prefix, client_ca=True)
    env_flag(parser, "--allow-insecure", f"{prefix}_ALLOW_INSECURE", False,
             "serve plaintext on a non-loopback --host (only inside a private network)", type=bool)
    env_flag(parser, "--redis-ca-cert", "REDIS_CA_CERT", None, "PEM CA that signed the Redis server's "
             "certificate (rediss:// URLs; default: the system's roots)")
    env_flag(parser, "--cache-secret-file", "GEMMA3_CACHE_SECRET_FILE", None,
             "file with the secret that signs cache entries (HMAC-SHA256; the same on every worker; "
             "or the secret itself in GEMMA3_CACHE_SECRET)")


def check_worker_security(parser: argparse.ArgumentParser, args: argparse.Namespace, prefix: str) -> None:
    """Load and check what ``worker_security_flags`` named (``parser.error`` on a problem): sets
    ``args.server_credentials`` and ``args.cache_secret``."""
    from serving.security import ConfigError, load_secret, plaintext_refusal, server_credentials

    try:
        args.server_credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        args.cache_secret = load_secret(args.cache_secret_file, os.environ.get("GEMMA3_CACHE_SECRET"))
    except ConfigError as e:
        parser.error(str(e))
    refusal = plaintext_refusal(args.host, args.server_credentials is not None, args.allow_insecure, prefix)
    if refusal:
        parser.error(refusal)
    if args.redis_ca_cert and not args.redis_url.startswith("rediss://"):
        parser.error("--redis-ca-cert (REDIS_CA_CERT) applies to TLS connections: use a rediss:// Redis URL")
