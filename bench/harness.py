"""What bench/model.py and bench/vision.py share: one worker process per library, driven over JSON lines.

Each library runs in its own process, so its peak RSS (VmHWM) is its own and per configuration. Only the
standard library and NumPy are imported here: bench/model.py's EasyDeL worker runs in another venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np


def rss_now() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """Peak resident set size of this process in bytes: VmHWM, the high-water mark of this address space.

    Not ``ru_maxrss``: Linux carries that over fork and exec, so a worker would report at least the
    coordinator's own peak (the 2 GiB bandwidth buffers).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x, digits=1):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def tail(path: str, n: int = 30) -> str:
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def report(text: str, output: str | None, json_path: str | None, data: dict) -> None:
    """Print the Markdown tables; also write them to ``output`` and the raw numbers to ``json_path``."""
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)


def serve(make: Callable, commands: dict[str, Callable]) -> None:
    """The worker side: JSON-line commands on the original stdout; everything libraries print goes to stderr.

    ``load`` builds the library's worker with ``make(**message)`` (it sets ``load_s`` and ``info``),
    ``finish`` reports the peak RSS and ends; every other command is ``commands[name](worker, message)``.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    w = None
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            if cmd == "load":
                rss0 = rss_now()
                w = make(**msg)
                reply = {"load_s": w.load_s, "rss_after_load": rss_now(), "rss_before_load": rss0, "info": w.info}
            elif cmd == "finish":
                reply = {"peak_rss": rss_peak(), "rss_now": rss_now()}
            elif cmd in commands:
                reply = commands[cmd](w, msg)
            else:
                raise ValueError(cmd)
        except Exception as e:  # reported to the coordinator, which stops
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
        if cmd == "finish":
            break


class Worker:
    """The coordinator's handle on one worker process: ``python script --_worker lib``."""

    def __init__(self, script: str, lib: str, log_path: str, python: str = sys.executable, env: dict | None = None):
        self.lib = lib
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", **(env or {}))
        self.proc = subprocess.Popen([python, os.path.abspath(script), "--_worker", lib],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(script))))

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.lib} worker died (rc {self.proc.returncode}); see {self.log_path}:\n"
                               + tail(self.log_path))
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.lib} worker: {reply['error']}; see {self.log_path}:\n" + tail(self.log_path))
        return reply

    def close(self):
        end_process(self.proc)
        self.log.close()


def end_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Close a line-protocol worker's stdin (its cue to exit) and wait for it; kill it after ``timeout``."""
    try:
        proc.stdin.close()
    except OSError:  # it is gone already
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
