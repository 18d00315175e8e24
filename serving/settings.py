"""Command-line flags that each have an environment-variable equivalent (the flag wins).

Compose files and Kubernetes manifests configure through the environment, people through flags;
both name the same setting, and ``--help`` shows the variable beside each flag.
"""

from __future__ import annotations

import argparse
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
