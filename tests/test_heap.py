"""After each XLA compile the library hands the freed heap back to the OS (gemma3/heap.py)."""

import platform

import jax
import numpy as np
import pytest

import gemma3  # noqa: F401 - importing the library installs the hook
from gemma3 import heap


def test_the_hook_is_installed_where_the_c_library_can_trim():
    if platform.libc_ver()[0] == "glibc":
        assert heap._malloc_trim() is not None and heap.trim_after_compiles()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the hook needs glibc's malloc_trim")
def test_every_compile_trims_once_and_a_cached_call_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    assert heap.trim_after_compiles()
    f = jax.jit(lambda x: x * 3.25 + 1.5)  # a program no other test compiled
    f(np.float32(1)).block_until_ready()
    assert calls == [0]
    f(np.float32(2)).block_until_ready()
    assert calls == [0]
    f(np.ones(3, np.float32)).block_until_ready()  # a new shape compiles
    assert calls == [0, 0]
