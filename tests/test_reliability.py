"""Load and faults through the whole stack on the demo model (bench/reliability.py, run as users run it):
200 concurrent streams with cancels and short deadlines, then Redis, the vision worker and one LM worker
killed under load. Nothing may be lost, no answer may differ from the same request's answer alone,
every slot comes back and the workers' memory returns to its baseline."""

import json
import os
import subprocess
import sys

from tests.services import ROOT


def test_load_and_faults_lose_nothing(tmp_path):
    out = tmp_path / "reliability.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per worker, as deployed
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "reliability.py"), "--requests", "200",
                           "--fault-requests", "48", "--hang-seconds", "60", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    failed_checks = [name for name, ok in result["checks"].items() if not ok]
    assert not failed_checks, (failed_checks, result["notes"], proc.stdout[-3000:])
    assert proc.returncode == 0
    phases = {p["phase"]: p for p in result["phases"]}
    load = phases["load"]
    assert load["sent"] == 200 and load["lost"] == 0
    assert load["completed"] + sum(load["failed"].values()) == 200
    assert load["completed"] >= 100  # cancels and short deadlines are 30% of the requests
    assert all(p["lost"] == 0 and p["completed"] + sum(p["failed"].values()) == p["sent"] for p in phases.values())
    assert phases["lm worker killed"]["failed"].keys() <= {"UNAVAILABLE", "ABORTED"}
