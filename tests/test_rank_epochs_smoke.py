"""bench/rank_epochs.py runs end to end in its smoke mode on the real MiniLM weights (seconds)."""

import json
import subprocess
import sys

from shared_paths import REPO_ROOT, require_shared
from test_replicate_minilm_smoke import require_minilm


def test_rank_epochs_smoke(tmp_path):
    require_minilm()
    require_shared("glue_sst2", "train.tsv")
    require_shared("glue_sst2", "dev.tsv")
    out = tmp_path / "rank_epochs"
    cmd = [sys.executable, "bench/rank_epochs.py", "--out-dir", str(out), "--smoke"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = sorted((out / "cells" / "sst2").glob("e2_r*/*/seed0_lr0.002.json"))
    assert [(c.parent.parent.name, c.parent.name) for c in cells] == [
        ("e2_r2", "lora"), ("e2_r2", "lorasc_auto"), ("e2_r4", "lora"), ("e2_r4", "lorasc_auto")]
    for path in cells:
        r = json.loads(path.read_text())
        assert not r["diverged"] and r["lora_alpha"] == 2 * r["rank"]
        for split in ("train", "validation", "test"):
            assert 0 <= r[split]["acc"] <= 100
        assert r["experts"] == (1 if r["method"] == "lora" else 2)
    auto = json.loads(cells[-1].read_text())
    assert auto["lorasc"]["slow_alpha"] == "auto" and auto["lorasc"]["noise_lambda"] == "auto"
    # Nothing to compare for expert 1, so α falls back to 0.5 and the first noise to λ 1.
    assert auto["auto_alpha_mean_per_expert"]["1"] == 0.5
    assert auto["auto_lambda_mean_per_expert"] == {"2": 1.0}
    assert auto["noise_width_mean_per_expert"]["2"] > 0
    table = (out / "table.md").read_text()
    assert "Status: complete" in table and "| LoRASC (α, λ auto) |" in table and "[" in table
    png = out / "sst2_rank_epochs.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already finished" in again.stdout and "[1/4]" not in again.stdout
