"""bench/vision.py at tiny shapes, run as users run it: both libraries give the same image embeddings, and
through the real stack a new image is a cache miss, the same image again a hit, and both are answered."""

import json
import os
import subprocess
import sys

from tests.services import ROOT

TINY = ["--layers", "1", "--image-size", "28", "--mm-tokens", "4", "--text-hidden", "64",
        "--vision-override", "hidden_size=32", "--vision-override", "intermediate_size=48",
        "--vision-override", "num_attention_heads=4"]


def test_bench_vision_tiny(tmp_path):
    out = tmp_path / "vision.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process, as deployed
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "vision.py"), *TINY, "--dtypes", "float32",
                           "--repeats", "1", "--pairs", "1", "--text-layers", "1", "--request-image-px", "32",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())

    (lib,) = result["library"]
    assert lib["shape"] == [1, 4, 64]
    assert lib["ours"]["finite"] and lib["hf"]["finite"]
    assert lib["max_rel_diff"] < 1e-4, lib  # float32: the same embeddings up to rounding
    assert lib["ours"]["images_s"] > 0 and lib["hf"]["images_s"] > 0

    services = result["services"]
    requests = services["requests"]
    assert [r["kind"] for r in requests] == ["miss", "hit"]
    assert [r["cache_hits"] for r in requests] == [0, 1]
    assert all(r["tokens"] >= 1 and r["ttft_s"] > 0 for r in [*requests, services["warmup"]])
    assert requests[0]["key"] == requests[1]["key"] != ""
    assert (services["vision_cache_hits"], services["vision_cache_misses"]) == (1, 1)
    assert "Hit / miss TTFT (p50)" in proc.stdout
