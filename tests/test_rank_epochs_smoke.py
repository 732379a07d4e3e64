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
    assert "Fig. 2's question" in table and "| growth, rank 2 → 4 |" in table
    # One epoch count and no search: the prose names no growth over epochs and no searched row.
    assert "its growth from rank 2 to 4 (mean over epoch counts)" in table
    assert "epochs (mean over ranks)" not in table and "searched" not in table
    for png in (out / "sst2_rank_epochs.png", out / "advantage_over_lora.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already finished" in again.stdout and "[1/4]" not in again.stdout


def test_rank_epochs_search_smoke(tmp_path):
    """--search trains the 8 other (α, λ) pairs of §4.1 at the rate validation chose for the
    fixed LoRASC, and the table picks among all 9 on validation."""
    require_minilm()
    require_shared("glue_sst2", "train.tsv")
    out = tmp_path / "rank_epochs"
    base = [sys.executable, "bench/rank_epochs.py", "--out-dir", str(out), "--smoke",
            "--ranks", "2", "--methods", "noise"]
    for extra in ([], ["--search"]):
        proc = subprocess.run(base + extra, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {c.parent.name: json.loads(c.read_text())
             for c in (out / "cells" / "sst2" / "e2_r2").glob("*/seed0_lr*.json")}
    pairs = {(r["lorasc"]["slow_alpha"], r["lorasc"]["noise_lambda"]) for r in cells.values()}
    assert pairs == {(a, lam) for a in (0.5, 0.6, 0.8) for lam in (0.1, 1.0, 10.0)}
    assert {r["lr"] for r in cells.values()} == {cells["noise"]["lr"]}
    best = max(cells.values(), key=lambda r: (r["validation"]["acc"],
                                              -r["lorasc"]["slow_alpha"],
                                              -r["lorasc"]["noise_lambda"]))
    row = next(line for line in (out / "table.md").read_text().splitlines()
               if line.startswith("| LoRASC (α, λ searched) |"))
    # | label | runs per seed | rank 2 entry: test accuracy, then [train accuracy] |
    assert row.split("|")[2].strip() == "9"
    assert row.split("|")[3].strip().strip("*").startswith(f"{best['test']['acc']:.1f}")
    assert "9 trained configurations per seed" in (out / "table.md").read_text()


def test_fig2_summary_pools_pairs_and_averages_per_task_and_seed():
    """Fig. 2's summary: differences against LoRA pair by seed within a block; only the runs
    every main-grid method has enter the pooled table; the growth contrasts pair the two ends
    of an axis within a (task, seed) and average over the other axis before the standard
    error. Checked against sums written out by hand."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import rank_epochs

    def block(accs):  # {seed: test acc}, the shape summarize() gives the table
        return {"chosen": [{"seed": s, "test": {"acc": a}} for s, a in accs.items()]}

    # The method is LoRA + an offset: for SST-2 e/5 + r/8 − 2 + seed (it grows along both
    # axes), for CB −1 (it does not). COLA is LoRA + 1 everywhere except CB seed 1 at
    # (20, 128), which it has not finished, so that run leaves every column of the pool.
    summary = {}
    for t in ("sst2", "cb"):
        for e in (5, 20):
            for r in (8, 32, 128):
                lora = {0: 70.0 + r / 100, 1: 60.0 + e}
                summary[(t, e, r, "lora")] = block(lora)
                off = ({s: e / 5 + r / 8 - 2 + s for s in lora} if t == "sst2"
                       else {s: -1.0 for s in lora})
                summary[(t, e, r, "noise")] = block({s: lora[s] + off[s] for s in lora})
                seeds = [0] if (t, e, r) == ("cb", 20, 128) else [0, 1]
                summary[(t, e, r, "cola")] = block({s: lora[s] + 1 for s in seeds})
    tasks, epochs, ranks = ["sst2", "cb"], [5, 20], [8, 32, 128]
    d = {m: rank_epochs.differences(summary, tasks, epochs, ranks, m) for m in ("noise", "cola")}
    assert d["noise"][("sst2", 20, 32, 1)] == 20 / 5 + 32 / 8 - 2 + 1
    keys = rank_epochs.shared_keys(d)
    assert len(keys) == 2 * 2 * 3 * 2 - 1 and ("cb", 20, 128, 1) not in keys
    got = rank_epochs.fig2_summary(d["noise"], keys, epochs, ranks)
    sst2 = lambda e, r, s: e / 5 + r / 8 - 2 + s  # noqa: E731
    assert sorted(got["cells"][(5, 8)]) == sorted([sst2(5, 8, 0), sst2(5, 8, 1), -1.0, -1.0])
    assert sorted(got["cells"][(20, 128)]) == sorted([sst2(20, 128, 0), sst2(20, 128, 1), -1.0])
    # 5 -> 20 epochs, mean over ranks per (task, seed): SST-2 grows by 20/5 − 5/5 = 3; CB by 0
    # (seed 1 from ranks 8 and 32 only). One value per (task, seed): 4 in all.
    assert sorted(got["longer"]) == [0.0, 0.0, 3.0, 3.0]
    # rank 8 -> 128, mean over epoch counts: SST-2 grows by 128/8 − 8/8 = 15; CB by 0.
    assert sorted(got["wider"]) == [0.0, 0.0, 15.0, 15.0]
    # The per-(task, seed) mean pools blocks before the error; blocks are not independent.
    assert rank_epochs.unit_means({("cb", 5, 8, 0): 1.0, ("cb", 20, 8, 0): 3.0,
                                   ("sst2", 5, 8, 0): -4.0}) == [2.0, -4.0]
    assert rank_epochs.mean_se([1.0, 3.0]) == "+2.0 ± 1.0 (n=2)"
    assert rank_epochs.mean_se([-0.5]) == "-0.5 (n=1)" and rank_epochs.mean_se([]) == "—"
    assert rank_epochs.mean_se([78.6 - 78.7 + 0.1]) == "+0.0 (n=1)"  # -1.4e-14, not "-0.0"


def narrowed_table(tmp_path, script: str, grid: dict, narrowing: list) -> str:
    """table.md of ``bench/<script> --table <narrowing>`` in a folder whose settings.json
    records ``grid`` (no cells finished)."""
    out = tmp_path / "sweep"
    out.mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"sizes": {}, "grid": grid}))
    proc = subprocess.run([sys.executable, f"bench/{script}", "--out-dir", str(out), "--table",
                           *narrowing], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "table.md").read_text()


def test_a_narrowed_run_keeps_the_whole_table(tmp_path):
    """table.md covers the folder's recorded grid (settings.json), not the part one run was
    narrowed to: a per-seed or per-task sub-run once overwrote the whole table with its part."""
    grid = {"tasks": ["sst2", "cb"], "epochs": [20, 5], "ranks": [8], "methods": ["lora", "noise"],
            "seeds": [1, 0], "lrs": [2e-3, 1e-4]}
    table = narrowed_table(tmp_path, "rank_epochs.py", grid,
                           ["--tasks", "cb", "--epochs", "5", "--seeds", "0"])
    # 2 tasks x 2 epoch counts x 1 rank x 2 methods x 2 seeds x 2 rates, none finished yet.
    assert table.startswith("Status: PARTIAL: 0 of 32 cells finished")
    assert [line for line in table.splitlines() if line.startswith("### ")] == [
        "### SST-2, 5 epochs", "### SST-2, 20 epochs", "### CB, 5 epochs", "### CB, 20 epochs"]
    assert "{0.0001, 0.002}" in table and "seeds 0, 1" in table


def test_a_grid_with_nothing_to_compare_prints_no_comparison_tables(tmp_path):
    """LoRA alone has no difference against LoRA; COLA and LoRA alone, none against COLA."""
    grid = {"tasks": ["sst2"], "epochs": [20], "ranks": [8, 32], "methods": ["lora"],
            "seeds": [0], "lrs": [1e-4]}
    table = narrowed_table(tmp_path / "a", "rank_epochs.py", grid, [])
    assert "### SST-2, 20 epochs" in table
    assert "Paired test-accuracy difference" not in table and "Fig. 2's question" not in table
    table = narrowed_table(tmp_path / "b", "rank_epochs.py", dict(grid, methods=["lora", "cola"]),
                           [])
    assert "| Task, epochs, rank | COLA |" in table
    assert "Fig. 2's question against LoRA" in table
    assert "Fig. 2's question against COLA" not in table


def test_searched_ties_go_to_the_smaller_pair_whatever_the_cell_version():
    """Cells keep α and λ in their ``lorasc`` block (older ones have nothing at the top level);
    a validation tie among the 9 pairs goes to the smaller α, then the smaller λ."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import rank_epochs
    from paper_selection import select_best

    def cell(alpha, lam):
        return {"lr": 2e-3, "metric": "acc", "validation": {"acc": 80.0}, "diverged": False,
                "lorasc": {"slow_alpha": alpha, "noise_lambda": lam}}

    cells = [cell(0.5, 1.0), cell(0.8, 0.1), cell(0.5, 0.1), cell(0.6, 10.0)]
    best = select_best(rank_epochs.with_pair(c) for c in cells)
    assert (best["slow_alpha"], best["noise_lambda"]) == (0.5, 0.1)


def test_shards_split_the_grid_once_and_a_bad_shard_is_refused():
    """--shard i/n: the n shards of one grid are disjoint and together are the whole grid, in
    the grid's order; a malformed or out-of-range shard stops before anything is trained."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import rank_epochs
    import replicate_minilm

    cells = rank_epochs.all_cells(["sst2", "cb"], [5, 20], [8, 32], ["lora", "noise"], [0, 1],
                                  [1e-4, 2e-3])
    shards = [replicate_minilm.shard_cells(cells, (i, 3)) for i in range(3)]
    assert sorted(map(len, shards)) == [21, 21, 22]  # 64 cells
    for i, part in enumerate(shards):
        assert part == cells[i::3]
    assert replicate_minilm.shard_cells(cells, (0, 1)) == cells
    for bad in ("2/2", "1", "a/b", "-1/2"):
        proc = subprocess.run([sys.executable, "bench/rank_epochs.py", "--shard", bad,
                               "--out-dir", "/nonexistent/never-written"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "--shard" in proc.stderr, (bad, proc.stderr[-500:])


def test_a_narrowed_replication_run_keeps_the_whole_table(tmp_path):
    """The same rule for bench/replicate_minilm.py, which shares ``recorded_grid``."""
    grid = {"tasks": ["sst2", "cb"], "methods": ["lora", "noise"], "seeds": [1, 0],
            "lrs": [2e-3, 5e-4]}
    table = narrowed_table(tmp_path, "replicate_minilm.py", grid,
                           ["--tasks", "cb", "--methods", "lora", "--seeds", "0"])
    assert table.splitlines()[0] == "| Method | SST-2 | CB | Avg. |"
    assert [line.split(" |")[0] for line in table.splitlines()[2:4]] == [
        "| LoRA", "| +++Noise (= LoRA + LoRASC)"]
    # 2 tasks x 2 methods x 2 seeds x 2 rates
    assert "Status: PARTIAL: 0 of 16 cells finished" in table and "{0.0005, 0.002}" in table
