"""bench/serving.py end to end on a tiny run: the demo model through its own stack, concurrency 1 and 2,
one Poisson rate and requests paired with the library's generate, 4 new tokens each. Checks structure
and correctness, not timings."""

import importlib.util
import json
import os
import subprocess
import sys

from tests.services import REDIS_URL, ROOT


def test_tiny_serving_run(tmp_path):
    out, png = tmp_path / "serving.json", tmp_path / "serving.png"
    plotting = importlib.util.find_spec("matplotlib") is not None  # the optional "bench" extra
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one CPU device, as the services run
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "serving.py"), "--models", "demo", "--concurrencies", "1,2",
         "--requests", "3", "--rate-fractions", "0.5", "--max-new-tokens", "4", "--image-pool", "2",
         "--prompt-words", "4,8", "--num-slots", "4", "--paired-requests", "4", "--workdir", str(tmp_path / "work"),
         "--redis-url", REDIS_URL,  # the tests' Redis (the run's images are its own: no stale hits)
         "--json", str(out), "--plot", str(png) if plotting else ""],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "| concurrency 1 |" in proc.stdout and "| workload |" in proc.stdout

    (result,) = json.loads(out.read_text())["results"]
    assert result["model"] == "demo" and result["num_slots"] == 4
    names = [w["workload"] for w in result["workloads"]]
    assert names[:2] == ["concurrency 1", "concurrency 2"] and names[2].startswith("Poisson ")
    for w in result["workloads"]:
        assert w["completed"] == w["requests"] == 3, w
        assert w["failed"] == {} and w["short"] == 0
        assert w["output_tokens"] == 3 * 4
        assert w["output_tok_s"] > 0 and w["req_s"] > 0
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert 0 < w[metric]["p50"] <= w[metric]["p99"], (metric, w[metric])
        assert w["ttft_s"]["p50"] <= w["e2e_s"]["p50"]
    records = result["concurrency_1_records"]
    assert len(records) == 3
    for r in records:
        assert r["status"] == "OK" and r["tokens"] == 4 and r["ttft"] <= r["e2e"]
        assert len(r["gaps"]) == r["messages"] - 1
    paired = result["paired"]  # each through the library, the service, the library again
    assert len(paired) == 4 and [r["index"] for r in paired] == [0, 1, 2, 3]
    for r in paired:
        assert r["status"] == "OK" and r["tokens"] == 4 and len(r["library_s"]) == 2 and min(r["library_s"]) > 0
        assert r["library_prompt_tokens"] == r["prompt_tokens"], "the library and the service saw other prompts"
    groups = result["ratio"]
    assert sum(g["requests"] for g in groups.values()) == 4
    assert set(groups) <= {"text", "image, cache hit", "image, cache miss"}
    for g in groups.values():
        assert g["min"] <= g["ci95"][0] <= g["median"] <= g["ci95"][1] <= g["max"]
        assert g["library_tok_s"] > 0 and g["service_tok_s"] > 0
    assert "service ÷ library, paired requests" in proc.stdout
    if plotting:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
