"""Smoke test of bench/lm_eval_throughput.py: both models answer the same requests with the same token
ids and the same scores, and the report has the ratio BENCHMARKS.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_throughput_bench_smoke(shared_data, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="lm-eval's stock hf model imports accelerate "
                                              "(pip install accelerate to run the benchmark)")
    shared_data("llama2_tokenizer", "tokenizer.model")
    shared_data("superglue", "CB")
    out = tmp_path / "tput.json"
    proc = subprocess.run([sys.executable, "bench/lm_eval_throughput.py", "--smoke", "--repeats", "1",
                           "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 4 * 3 + 6 * 2  # CB has 3 choices, COPA 2
    assert report["token_id_mismatches"] == 0
    assert report["max_abs_logprob_diff"] < 1e-4
    assert report["greedy_flags_equal"] == f"{report['requests']}/{report['requests']}"
    med = report["median_seconds"]
    assert report["throughput_ratio_lorasc_over_hf"] == pytest.approx(med["hf"] / med["lorasc"])
