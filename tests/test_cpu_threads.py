"""XLA's CPU thread pool per worker: one thread for a small model (--cpu-threads auto), else XLA's own."""

import argparse
import os
import subprocess
import sys

import pytest

from serving.settings import SMALL_MODEL_BYTES, cpu_threads_flag, use_cpu_threads


def _model(path, size: int) -> str:
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(size)  # only its size is read
    return str(path)


def test_auto_gives_a_small_model_one_thread_and_leaves_a_large_one_to_xla(tmp_path, monkeypatch):
    monkeypatch.delenv("NPROC", raising=False)
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    assert use_cpu_threads("auto", _model(tmp_path / "large", SMALL_MODEL_BYTES)) is None
    assert "NPROC" not in os.environ
    assert use_cpu_threads("auto", str(tmp_path / "nothing-here")) is None
    assert "NPROC" not in os.environ
    assert use_cpu_threads("auto", _model(tmp_path / "small", 7 << 20)) == 1
    assert os.environ["NPROC"] == "1"


def test_an_nproc_already_set_wins_over_auto_but_not_over_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("NPROC", "2")
    small = _model(tmp_path, 1 << 20)
    assert use_cpu_threads("auto", small) is None
    assert os.environ["NPROC"] == "2"
    assert use_cpu_threads("3", small) == 3
    assert os.environ["NPROC"] == "3"


@pytest.mark.parametrize("value", ["0", "-1", "many", ""])
def test_the_flag_takes_auto_or_a_positive_number(value, monkeypatch):
    monkeypatch.delenv("GEMMA3_LM_CPU_THREADS", raising=False)
    p = argparse.ArgumentParser()
    cpu_threads_flag(p, "GEMMA3_LM")
    assert p.parse_args([]).cpu_threads == "auto"
    assert p.parse_args(["--cpu-threads", "4"]).cpu_threads == "4"
    with pytest.raises(SystemExit):
        p.parse_args(["--cpu-threads", value])


def _xla_threads(pid: int) -> int:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names.count("tf_XLAEigen")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux's /proc")
def test_the_workers_run_the_small_served_model_on_one_xla_thread(lm_worker, vision_worker):
    """The test checkpoint is a few MB: both workers' pools hold one thread, where a JAX process of its own
    has one per core."""
    assert _xla_threads(lm_worker[0].pid) == 1
    assert _xla_threads(vision_worker[0].pid) == 1
    plain = subprocess.run([sys.executable, "-c", "import os, sys, jax.numpy as jnp; jnp.ones(1).block_until_ready(); "
                            "sys.stdout.write(str(sum(open(f'/proc/self/task/{t}/comm').read().strip() == "
                            "'tf_XLAEigen' for t in os.listdir('/proc/self/task'))))"],
                           env={**{k: v for k, v in os.environ.items() if k != "NPROC"}, "XLA_FLAGS": ""},
                           capture_output=True, text=True, check=True)
    assert int(plain.stdout) == len(os.sched_getaffinity(0))  # (2 on this project's machines)
