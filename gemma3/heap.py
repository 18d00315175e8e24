"""Hand the memory that loading weights and compiling programs free back to the operating system.

Compiling a decoder's programs allocates and frees tens to hundreds of MB of host heap (HLO passes,
LLVM). glibc keeps most of what is freed inside its arenas, so the process's resident size stays at
the compile's high-water mark for the rest of its life, and grows again where the next allocation
does not fit in the holes. ``malloc_trim`` returns the free pages. Importing ``gemma3`` runs it after
every compile in the process (the user's own programs too): about 3 ms a compile, and the peak
resident size of a float32 generate (load, compile, run; bench/model.py's worker) fell by 30-180 MB:
gemma-3-1b batch 8 4,685 -> 4,504 MB, gemma-3-270m batch 8 1,660 -> 1,555 MB.

Other C libraries (musl, macOS) have no ``malloc_trim``: there this does nothing.
"""

from __future__ import annotations

import ctypes
import functools

import jax

LARGE_BYTES = 64 << 20
"""A KV cache of at least this many bytes is made after the heap's free pages went back to the OS
(``KVCache.init``), and a generate with one hands its own back at the end (``gemma3.generation``). Freed
buffers stay resident in glibc's heap otherwise: XLA allocates on whichever of its threads runs a program,
each thread's arena keeps what was freed into it, and a new cache may come from another arena. At gemma-3-1b
float32 batch 8 (a 109 MB cache) a prefill after a generate, and a generate after it, peaked 100-140 MB higher
(4,446-4,497 MiB against 4,350-4,354 with the trim, bench/model.py's worker, session 25); a generate's
end kept 105 MB. The trim takes about 10 ms there, next to seconds of prefill; below the threshold it would
be a noticeable share of a short call (0.5 ms of the demo model's 8 ms)."""

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""What jax records once per program it compiles or loads from its persistent cache
(jax._src.dispatch.BACKEND_COMPILE_EVENT); a failed compile records it too."""


@functools.cache
def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's, without a lookup
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release() -> None:
    """Return the heap's free pages to the OS now (nothing where the C library cannot)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def release_for(nbytes: int) -> None:
    """``release`` when a cache of ``nbytes`` is made or freed and that is LARGE_BYTES or more."""
    if nbytes >= LARGE_BYTES:
        release()


def _after(event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
        release()


@functools.cache
def trim_after_compiles() -> bool:
    """Return the heap to the OS after every XLA compile in this process (once; idempotent). Whether
    this C library can."""
    if _malloc_trim() is None:
        return False
    jax.monitoring.register_event_duration_secs_listener(_after)
    return True
