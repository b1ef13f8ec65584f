"""bench/serving.py as a user runs it (--quick on the CPU): every system serves the same requests, the figures are
there and consistent; and bench/run.py --suites serving carries them into results.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KOGPT_BACKEND")}


def test_serving_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serving.py"), "--quick", "--device", "cpu", "--rates", "inf,50",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "serving.json").read_text())
    results = report["results"]
    systems = {r["system"] for r in results}
    assert systems == {"engine", "generate-one-by-one", "generate-static-batch-4"}
    assert {r["rate"] for r in results} == {"inf", 50.0}
    for r in results:
        assert r["requests"] == 8 and r["output_tokens"] == results[0]["output_tokens"] > 0
        assert r["output_tokens_per_s"] > 0 and r["kv_blocks_peak"] > 0
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] and 0 < r["itl_ms_p50"] <= r["itl_ms_p99"]
    engine = [r for r in results if r["system"] == "engine"]
    assert all(r["kv_blocks_total"] >= r["kv_blocks_peak"] for r in engine)
    assert set(report["ratios"]) == {"inf", "50.0"}
    assert "engine" in proc.stdout and "TTFT" in proc.stdout


def test_run_py_serving_suite(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--device", "cpu", "--suites", "serving",
         "--no-plots", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["finished"] and len(data["serving"]["results"]) == 3
    assert "serving (bench/serving.py)" in proc.stdout
