"""A multi-host LM worker: N JAX processes (``jax.distributed``) run one model on one global mesh.

Process 0, the leader, hosts the gRPC front and the engine's scheduler. Each call the engine makes on
the device (prefill into a slot, a prompt's chunk before its last or the dropping of its row, a kept
prefix row let go, a decode step, a cache reset) is first sent to every follower over a plain TCP
connection, with all of its host inputs, then run; the followers run the same call, so every process
executes the same compiled programs in the same order and their collectives meet.

Failure: followers send a heartbeat every ``HEARTBEAT_S``; a follower whose connection breaks or
whose heartbeat stops for ``timeout`` seconds makes the leader call ``on_failure`` (the worker then
reports NOT_SERVING and fails every request with UNAVAILABLE). The group cannot continue without the
process (its devices hold part of the weights and cache), so it must be restarted as a whole (a
StatefulSet does that when the leader's liveness probe fails). A follower exits when the leader goes.

Wire format (no pickle: it is read off the network): u32 header length, u32 body length, a JSON header
naming the call and describing each argument (a NumPy value's dtype and shape, or a dict of them),
then the arguments' raw bytes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
DTYPES = {"float32", "int32", "uint32", "bool"}
CALLS = {"prefill", "extend", "drop_row", "forget", "decode", "reset", "stop"}


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the JAX process group (CPU collectives over gloo; accelerators use their own)."""
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    log.info("joined the process group", extra={"process_id": process_id, "processes": num_processes,
                                                 "devices": jax.device_count(),
                                                 "local_devices": jax.local_device_count()})


# ------------------------------------------------------------------------------------------- wire format
def pack(call: str, args: tuple) -> bytes:
    buffers: list[bytes] = []

    def describe(value):
        if isinstance(value, dict):
            return {"dict": {k: describe(v) for k, v in value.items()}}
        array = np.asarray(value)  # (not ascontiguousarray: it turns scalars into shape (1,))
        if array.dtype.name not in DTYPES:
            raise TypeError(f"cannot send {array.dtype} to followers")
        buffers.append(array.tobytes(order="C"))
        return {"dtype": array.dtype.name, "shape": list(array.shape)}

    header = json.dumps({"call": call, "args": [describe(a) for a in args]}).encode()
    body = b"".join(buffers)
    return struct.pack("<II", len(header), len(body)) + header + body


def unpack(header: bytes, body: bytes) -> tuple[str, list]:
    """The call and its arguments; anything malformed raises ValueError."""
    try:
        message = json.loads(header)
        call, specs = message["call"], message["args"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed group message: {e}") from None
    if call not in CALLS or not isinstance(specs, list):
        raise ValueError(f"unknown group call {call!r}")
    offset = 0

    def build(spec):
        nonlocal offset
        if "dict" in spec:
            return {str(k): build(v) for k, v in spec["dict"].items()}
        if spec.get("dtype") not in DTYPES:
            raise ValueError(f"unexpected dtype {spec.get('dtype')!r}")
        dtype, shape = np.dtype(spec["dtype"]), tuple(int(d) for d in spec["shape"])
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + n > len(body):
            raise ValueError("group message shorter than its header says")
        value = np.frombuffer(body, dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset).reshape(shape)
        offset += n
        return value.copy()

    return call, [build(s) for s in specs]


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> tuple[str, list]:
    header_len, body_len = struct.unpack("<II", _read_exact(sock, 8))
    if header_len > 1 << 20:
        raise ValueError("group message header too large")
    return unpack(_read_exact(sock, header_len), _read_exact(sock, body_len))


# ------------------------------------------------------------------------------------------- leader
class Leader:
    """Accepts the followers' connections, sends them every device call, watches their heartbeats."""

    def __init__(self, host: str, port: int, followers: int, timeout: float = 5.0):
        self.timeout, self.expected = timeout, followers
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self.followers: list[socket.socket] = []
        self.failed: str | None = None
        self.on_failure: Callable[[str], None] = lambda reason: None
        self._send_lock = threading.Lock()
        self._last_seen: dict[int, float] = {}

    def accept(self, wait: float = 300.0) -> None:
        """Until every follower has connected (each says its process id first)."""
        self.listener.settimeout(wait)
        while len(self.followers) < self.expected:
            try:
                conn, address = self.listener.accept()
            except TimeoutError:
                raise TimeoutError(f"only {len(self.followers)} of {self.expected} followers connected in "
                                   f"{wait:.0f} s") from None
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            process = struct.unpack("<I", _read_exact(conn, 4))[0]
            index = len(self.followers)
            self.followers.append(conn)
            self._last_seen[index] = time.monotonic()
            threading.Thread(target=self._watch, args=(index, process, conn), name=f"group-watch-{process}",
                             daemon=True).start()
            log.info("follower connected", extra={"process_id": process, "address": address[0]})
        threading.Thread(target=self._check_heartbeats, name="group-heartbeats", daemon=True).start()

    def _watch(self, index: int, process: int, conn: socket.socket) -> None:
        try:
            while self.failed is None:
                if not conn.recv(64):
                    raise ConnectionError("closed its connection")
                self._last_seen[index] = time.monotonic()
        except OSError as e:
            self.fail(f"process {process} of the LM worker group is gone ({e})")

    def _check_heartbeats(self) -> None:
        while self.failed is None:
            time.sleep(HEARTBEAT_S / 2)
            now = time.monotonic()
            for seen in list(self._last_seen.values()):
                if now - seen > self.timeout:
                    self.fail(f"a process of the LM worker group stopped answering ({now - seen:.1f} s silent)")

    def fail(self, reason: str) -> None:
        with self._send_lock:
            if self.failed is not None:
                return
            self.failed = reason
        log.error("LM worker group failed", extra={"reason": reason})
        self.on_failure(reason)

    def send(self, call: str, args: tuple = ()) -> None:
        if self.failed is not None:
            raise ConnectionError(self.failed)
        message = pack(call, args)
        for conn in self.followers:
            try:
                conn.sendall(message)
            except OSError as e:
                self.fail(f"a process of the LM worker group is gone ({e})")
                raise ConnectionError(self.failed) from e

    def close(self) -> None:
        """Tell the followers to exit (a normal stop), then close."""
        if self.failed is None:
            try:
                self.send("stop")
            except ConnectionError:
                pass
        self.failed = self.failed or "stopped"
        for conn in self.followers:
            conn.close()
        self.listener.close()


class GroupProgram:
    """A DeviceProgram whose every call is first sent to the group's followers."""

    yield_flag = None  # (every process runs a burst's steps in lockstep: none may end it early)

    def __init__(self, program, leader: Leader):
        self.program, self.leader = program, leader

    def prefill(self, *args):
        self.leader.send("prefill", args)
        return self._run(self.program.prefill, args)

    def extend(self, *args):
        self.leader.send("extend", args)
        return self._run(self.program.extend, args)

    def drop_row(self):
        self.leader.send("drop_row")
        self.program.drop_row()

    def forget(self, handle):
        self.leader.send("forget", (handle,))
        self.program.forget(handle)

    def decode(self, *args):
        self.leader.send("decode", args)
        return self._run(self.program.decode, args)

    def fetch(self, pending):
        """The leader's own picks (a follower dispatches the same call and never fetches)."""
        return self._run(self.program.fetch, (pending,))

    def steps_within(self, active, seconds: float) -> int:
        """The leader's own measure; the followers run the burst length it chose (an argument of decode)."""
        return self.program.steps_within(active, seconds)

    def _run(self, call, args):
        try:
            return call(*args)
        except Exception:
            # A collective fails when a peer dies, often before its connection is seen to close: wait
            # for the verdict, so the requests end as "unavailable" rather than as an internal error.
            deadline = time.monotonic() + self.leader.timeout
            while self.leader.failed is None and time.monotonic() < deadline:
                time.sleep(0.05)
            raise

    def reset(self):
        self.leader.send("reset")
        self.program.reset()


# ------------------------------------------------------------------------------------------- follower
def follow(program, leader_address: str, process_id: int, connect_timeout: float = 300.0,
           on_connected: Callable[[], None] = lambda: None) -> None:
    """Run the leader's device calls on this process's ``program`` until the leader stops or goes."""
    host, port = leader_address.rsplit(":", 1)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack("<I", process_id))
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            try:
                sock.sendall(b"h")
            except OSError:
                return

    threading.Thread(target=heartbeat, name="group-heartbeat", daemon=True).start()
    log.info("following the leader", extra={"leader": leader_address})
    on_connected()
    calls = {"prefill": program.prefill, "extend": program.extend, "drop_row": program.drop_row,
             "forget": program.forget, "decode": program.decode, "reset": program.reset}
    try:
        while True:
            call, args = receive(sock)
            if call == "stop":
                log.info("the leader stopped the group")
                return
            calls[call](*args)
    finally:
        stop.set()
        sock.close()
