"""The benchmark scripts run end to end in their smoke modes (tiny models, seconds)."""

import json
import subprocess
import sys

import pytest

from shared_paths import REPO_ROOT, require_shared


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_overhead_benchmark_smoke(tmp_path):
    require_shared("alpaca", "alpaca_tiny_100.json")
    out = tmp_path / "overhead.json"
    run("bench/overhead.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert len(result["runs"]["stock"]) == len(result["runs"]["lorasc"]) == 1
    # Both recipes trained the same number of logged steps on the same config.
    assert len(result["runs"]["stock"][0]["tokens_per_s"]) == len(result["runs"]["lorasc"][0]["tokens_per_s"]) == 4
    for key in ("wall_ratio", "tokens_per_s_ratio", "peak_rss_ratio"):
        assert result[key] > 0


def test_overhead_profile_smoke(tmp_path):
    """Both recipes profiled on one config; the model's work is found (not 0) and is the same
    order in both, and the parts add up."""
    require_shared("alpaca", "alpaca_tiny_100.json")
    out = tmp_path / "profile.json"
    run("bench/overhead_profile.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    stock, lorasc = result["runs"]["stock"][0], result["runs"]["lorasc"][0]
    for r in (stock, lorasc):
        assert 0 < r["decoder_forward"] and 0 < r["backward"] and 0 < r["loss"]
        assert r["model"] < r["recipe"] < r["total"]
        assert abs(r["recipe"] - r["model"] - r["recipe_outside_model"]) < 1e-9
        assert r["setup"] > 0 and r["save"] > 0
    assert 0.3 < lorasc["model"] / stock["model"] < 3


def test_boundary_cost_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    run("bench/boundary_cost.py", "scaling", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert [(p["d"], p["matrices"]) for p in result["points"]] == [(64, 1), (64, 2)]
    assert all(p["boundary_s"] > 0 and p["step_s"] > 0 for p in result["points"])


def test_boundary_cost_model_mode_smoke(tmp_path):
    out = tmp_path / "model.json"
    run("bench/boundary_cost.py", "model", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert [p["merge_precision"] for p in result["points"]] == ["nearest", "fp32_master"]
    for p in result["points"]:
        assert p["adapted_matrices"] == 4  # 2 layers x (q, v)
        assert p["step_s"] > 0 and p["boundary_s"] > 0
        assert p["tokens_per_s"] == pytest.approx(4 * 32 / p["step_s"])
    # bf16 by default, so the two rows really are two policies
    assert [p["master_kept"] for p in result["points"]] == [False, True]
