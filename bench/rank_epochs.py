"""Where does LoRASC help? LoRA rank x training length on real weights (all-MiniLM-L6-v2, CPU).

    python bench/rank_epochs.py                      # the sweep into bench/results/rank_epochs
    python bench/rank_epochs.py --table              # only table.md and the plots
    python bench/rank_epochs.py --out-dir /tmp/s --smoke   # seconds, for tests

Why this exists: the paper's Fig. 2 says LoRASC's advantage over LoRA and COLA grows with the
LoRA rank and the number of epochs, because there LoRA overfits and LoRASC does not. Our
rank-8, 5-epoch replication (bench/replicate_minilm.py, BENCHMARKS §4) found no advantage; this
asks whether one appears at higher ranks and longer training, and shows train accuracy beside
test so that overfitting is visible rather than assumed.

Everything but the grid comes from bench/replicate_minilm.py (model, data protocol, pooling,
driver loop, batch sizes): ranks {8, 32, 128} x epochs {5, 20}, on the two tasks the small
model learns above the majority class there (SST-2, CB). One expert per epoch, so a 20-epoch
LoRASC run is a 20-expert cascade. The LoRA alpha is 2 x rank, i.e. the scale alpha/r = 2 of
§4's rank 8 / alpha 16 at every rank, so a higher rank adds capacity (and, at a fixed learning
rate, a larger step) instead of shrinking the update.

Methods: the ablation rows ``lora``, ``cola``, ``slow`` (++Slow) and ``noise`` (LoRASC at the
fixed alpha 0.5, lambda 1) of ``recipes/make_ablation_configs.ROWS``, plus ``lorasc_auto``: the
same row with ``slow_alpha: auto`` and ``noise_lambda: auto`` (lorasc_tune/cascade.py).

``--search`` adds the paper's searched LoRASC (§4.1: alpha in {0.5, 0.6, 0.8}, lambda in
{0.1, 1, 10}) as a coordinate search, because the paper's joint search (9 pairs x 3 rates) would
multiply the LoRASC cost by 9: the learning rate is the one validation chose for the fixed
LoRASC (``noise``) in that (task, epochs, rank, seed), and the 8 other (alpha, lambda) pairs run
at that rate. Validation then picks among the 9 pairs. The table counts that row's search:
4 + 8 = 12 trained configurations per seed against 4 (the rates) for every other row. Search
cells exist only once their fixed-LoRASC group is finished, so run ``--search`` after (or
beside) the main grid.

Selection: per (task, epochs, rank, method, seed), the learning rate with the best validation
accuracy (ties to the smaller rate, recipes/paper_selection.select_best); the table reports that
rate's test accuracy and its train accuracy (the model at the end of training, on its own
training rows), mean ± std over seeds.

Cells: ``cells/<task>/e<epochs>_r<rank>/<method>/seed<k>_lr<x>.json``, written atomically and
skipped when present. The order is task, seed, epochs, rank, method, rate: one seed of the whole
rank x epochs grid (the shape Fig. 2 is about) lands before the next seed tightens it, and each
(seed, epochs, rank) comparison of every method at every rate completes before the next begins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import replicate_minilm as rm  # noqa: E402  (puts the repo and recipes/ on sys.path)
from lorasc_tune.config import LoRASCConfig  # noqa: E402
from lorasc_tune.io import atomic_write_text  # noqa: E402
from make_ablation_configs import ROWS  # noqa: E402
from paper_cells import format_value as format_lr  # noqa: E402
from paper_grids import (FIXED_NOISE_LAMBDA, FIXED_SLOW_ALPHA, NOISE_LAMBDAS,  # noqa: E402
                         SLOW_ALPHAS)
from paper_methods import TASK_LABELS  # noqa: E402
from paper_selection import select_best  # noqa: E402
from paper_tables import mean_std  # noqa: E402

# name -> (label, lorasc block)
METHODS: Dict[str, tuple] = {
    "lora": ("LoRA", ROWS["lora"]),
    "cola": ("COLA", ROWS["cola"]),
    "slow": ("++Slow (α 0.5)", ROWS["slow"]),
    "noise": ("LoRASC (α 0.5, λ 1)", ROWS["noise"]),
    "lorasc_auto": ("LoRASC (α, λ auto)", dict(ROWS["noise"], slow_alpha="auto",
                                               noise_lambda="auto")),
}
# The searched LoRASC's cells: one pseudo-method per (alpha, lambda) pair of §4.1's grid (the
# fixed pair is the ``noise`` method's own cell).
SEARCH_PAIRS = [(a, lam) for a in SLOW_ALPHAS for lam in NOISE_LAMBDAS]
FIXED_PAIR = (FIXED_SLOW_ALPHA, FIXED_NOISE_LAMBDA)
SEARCH_METHODS: Dict[str, tuple] = {
    f"search_a{a:g}_l{lam:g}": (f"LoRASC (α {a:g}, λ {lam:g})",
                                dict(ROWS["noise"], slow_alpha=a, noise_lambda=lam))
    for a, lam in SEARCH_PAIRS if (a, lam) != FIXED_PAIR}
SEARCHED = "lorasc_searched"  # the table row: validation's pick over the 9 pairs
SEARCHED_LABEL = "LoRASC (α, λ searched)"
TASKS = ("sst2", "cb")
RANKS = (8, 32, 128)
EPOCHS = (5, 20)
# Sizes from one measured cell (SST-2, LoRASC, rank 128, 20 epochs, 256 rows: see BENCHMARKS
# §6): about 70 s of CPU on one thread. 256 SST-2 rows (twice §4's) make the test accuracy less
# noisy while 20 epochs (640 steps) still drive LoRA to 100% train accuracy; CB's train file
# holds 250 rows, of which 100 go to validation, so it keeps 150.
DEFAULTS = dict(rm.DEFAULTS, num_train={"sst2": 256, "cb": 150})
del DEFAULTS["epochs"], DEFAULTS["lora_rank"], DEFAULTS["lora_alpha"]  # they are the grid
SMOKE = dict(DEFAULTS, num_train={"sst2": 24, "cb": 24}, num_dev=8, num_eval=16, max_seq_len=32)
ALPHA_PER_RANK = 2.0  # lora_alpha = 2 x rank: scale 2 at every rank, as §4's rank 8 / alpha 16
# Seeds are §4's; the rates are §4's {5e-4, 2e-3, 8e-3} (replicate_minilm.DEFAULT_LRS) plus 1e-4
# below them. With scale 2 the step grows with rank, and 20 epochs favour smaller rates: with
# §4's three rates, validation chose the bottom one in 9 of LoRA's 10 finished SST-2 selections
# (and in most 20-epoch ones of every method), so the optimum could lie below the grid. 1e-4 was
# added on 2026-11-30, after 218 cells; cells are per rate, so none was retrained.
LRS = (1e-4, 5e-4, 2e-3, 8e-3)
RESULT_VERSION = 1


@dataclass(frozen=True)
class Cell:
    task: str
    epochs: int
    rank: int
    method: str
    seed: int
    lr: float

    def path(self, out_dir: Path) -> Path:
        return (out_dir / "cells" / self.task / f"e{self.epochs}_r{self.rank}" / self.method
                / f"seed{self.seed}_lr{format_lr(self.lr)}.json")


def all_cells(tasks, epochs, ranks, methods, seeds, lrs) -> List[Cell]:
    """Task, seed, epochs, rank, method, rate: whole comparisons land first (module doc)."""
    return [Cell(t, e, r, m, k, lr) for t in tasks for k in seeds for e in epochs
            for r in ranks for m in methods for lr in lrs]


def search_cells(out_dir: Path, tasks, epochs, ranks, seeds, lrs) -> List[Cell]:
    """The searched LoRASC's cells whose rate is known: for each (task, epochs, rank, seed)
    whose fixed-LoRASC cells are all finished, the 8 other (α, λ) pairs at the rate validation
    chose for the fixed pair (module doc)."""
    out = []
    for t in tasks:
        for k in seeds:
            for e in epochs:
                for r in ranks:
                    group = [Cell(t, e, r, "noise", k, lr) for lr in lrs]
                    if not all(c.path(out_dir).is_file() for c in group):
                        continue
                    best = select_best(json.loads(c.path(out_dir).read_text()) for c in group)
                    if best is not None:
                        out += [Cell(t, e, r, m, k, best["lr"]) for m in SEARCH_METHODS]
    return out


def method_spec(name: str) -> tuple:
    """(label, lorasc block) of a main-grid method or a search pair."""
    return METHODS[name] if name in METHODS else SEARCH_METHODS[name]


def task_sizes(s: dict, task: str) -> dict:
    return dict(s, num_train=s["num_train"][task])


def run_cell(cell: Cell, s: dict, base_state: dict, factory, data: Dict[str, list]) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = LoRASCConfig.from_config(method_spec(cell.method)[1])
    model = rm.build_classifier(cell.task, cell.seed, base_state, factory, cell.rank,
                                ALPHA_PER_RANK * cell.rank, dora=False)
    cascade, diverged = rm.train_cascade(model, cfg, cell.seed, cell.lr,
                                         dict(s, epochs=cell.epochs), data["train"])
    engine = cascade.engine
    result = {
        "version": RESULT_VERSION, "task": cell.task, "epochs": cell.epochs, "rank": cell.rank,
        "lora_alpha": ALPHA_PER_RANK * cell.rank, "method": cell.method,
        "label": method_spec(cell.method)[0], "seed": cell.seed, "lr": cell.lr,
        "lorasc": cfg.to_dict(), "metric": "acc", "diverged": diverged,
        "sizes": {k: len(v) for k, v in data.items()}, "optimizer_steps": cascade.global_step,
        "experts": engine.expert, "train_loss_per_expert": cascade.expert_losses,
        "noise_width_mean_per_expert": {t: statistics.fmean(w)
                                        for t, w in engine.noise_widths.items()},
    }
    if cfg.slow_alpha == "auto" or cfg.noise_lambda == "auto":
        # What the rule chose, per expert, averaged over the 12 adapted matrices.
        result["auto_alpha_mean_per_expert"] = {t: statistics.fmean(a) for t, a in
                                                engine.auto_alpha.items()}
        result["auto_lambda_mean_per_expert"] = {t: statistics.fmean(v) for t, v in
                                                 engine.auto_lambda.items()}
    if not diverged:
        for split in ("train", "validation", "test"):
            result[split] = {"acc": rm.accuracy(model, data[split], s["eval_batch_size"])}
    result["seconds"] = {"total": round(time.perf_counter() - t0, 2),
                         "cpu": round(time.process_time() - c0, 2)}
    return result


def sweep(out_dir: Path, cells: List[Cell], s: dict) -> None:
    def describe(c: Cell, res: dict) -> str:
        acc = ("diverged" if res["diverged"] else
               f"train {res['train']['acc']:.1f} val {res['validation']['acc']:.1f} "
               f"test {res['test']['acc']:.1f}")
        return f"{c.task} e{c.epochs} r{c.rank} {c.method} seed{c.seed} lr{format_lr(c.lr)}: {acc}"

    rm.run_pending(out_dir, cells, s,
                   splits=lambda task, seed: rm.task_splits(task, seed, task_sizes(s, task)),
                   train=lambda c, base, tok, factory, data: run_cell(c, s, base, factory, data),
                   describe=describe)


# ---- table and plot ---------------------------------------------------------------------------


def load_results(out_dir: Path, cells: List[Cell]) -> Dict[Cell, dict]:
    return {c: json.loads(c.path(out_dir).read_text()) for c in cells if c.path(out_dir).is_file()}


def search_results(out_dir: Path, tasks, epochs, ranks, seeds, lrs) -> Dict[Cell, dict]:
    return load_results(out_dir, search_cells(out_dir, tasks, epochs, ranks, seeds, lrs))


def summarize(results: Dict[Cell, dict], tasks, epochs, ranks, methods, seeds, lrs) -> dict:
    """``{(task, epochs, rank, method): {"test", "train": mean_std, "lrs": chosen rates}}``.

    A seed counts once all its rates are finished and at least one did not diverge.
    """
    out = {}
    for t in tasks:
        for e in epochs:
            for r in ranks:
                for m in methods:
                    chosen = []
                    for k in seeds:
                        group = [Cell(t, e, r, m, k, lr) for lr in lrs]
                        if all(c in results for c in group):
                            best = select_best(results[c] for c in group)
                            if best is not None:
                                chosen.append(best)
                    if chosen:
                        out[(t, e, r, m)] = summary_entry(chosen)
    return out


def summary_entry(chosen: List[dict]) -> dict:
    """Test and train accuracy (mean ± std) of the selected runs, one per seed."""
    return {"test": mean_std([b["test"]["acc"] for b in chosen]),
            "train": mean_std([b["train"]["acc"] for b in chosen]),
            "lrs": [b["lr"] for b in chosen], "seeds": [b["seed"] for b in chosen],
            "chosen": chosen}


def with_pair(result: dict) -> dict:
    """The cell with its (α, λ) at the top level, where select_best breaks ties on them (ties go
    to the smaller α, then the smaller λ, as in recipes/paper_table1.py)."""
    return dict(result, slow_alpha=result["lorasc"]["slow_alpha"],
                noise_lambda=result["lorasc"]["noise_lambda"])


def add_searched(summary: dict, searched: Dict[Cell, dict], tasks, epochs, ranks) -> None:
    """Add the searched LoRASC's rows from ``searched`` (:func:`search_results`): per seed,
    validation's pick among the 9 (α, λ) pairs at the fixed LoRASC's chosen rate, once all 9
    are finished (a seed counts only then)."""
    for t in tasks:
        for e in epochs:
            for r in ranks:
                fixed = summary.get((t, e, r, "noise"))
                if fixed is None:
                    continue
                chosen = []
                for b in fixed["chosen"]:
                    group = [Cell(t, e, r, m, b["seed"], b["lr"]) for m in SEARCH_METHODS]
                    if all(c in searched for c in group):
                        best = select_best(with_pair(cell) for cell in
                                           [b] + [searched[c] for c in group])
                        if best is not None:
                            chosen.append(best)
                if chosen:
                    summary[(t, e, r, SEARCHED)] = dict(
                        summary_entry(chosen),
                        pairs=[(b["lorasc"]["slow_alpha"], b["lorasc"]["noise_lambda"])
                               for b in chosen])


def label(method: str) -> str:
    return SEARCHED_LABEL if method == SEARCHED else method_spec(method)[0]


def differences(summary: dict, tasks, epochs, ranks, method: str,
                base: str = "lora") -> Dict[tuple, float]:
    """``{(task, epochs, rank, seed): test accuracy of method − base}``, same seed and split."""
    out = {}
    for t in tasks:
        for e in epochs:
            for r in ranks:
                if (t, e, r, method) not in summary or (t, e, r, base) not in summary:
                    continue
                base_acc = {b["seed"]: b["test"]["acc"]
                            for b in summary[(t, e, r, base)]["chosen"]}
                out.update({(t, e, r, b["seed"]): b["test"]["acc"] - base_acc[b["seed"]]
                            for b in summary[(t, e, r, method)]["chosen"]
                            if b["seed"] in base_acc})
    return out


def shared_keys(diffs: Dict[str, Dict[tuple, float]]) -> set:
    """The (task, epochs, rank, seed) every method in ``diffs`` has, so that the columns of a
    pooled table average over the same runs."""
    keys = [set(d) for d in diffs.values()]
    return set.intersection(*keys) if keys else set()


def unit_means(values: Dict[tuple, float]) -> List[float]:
    """One value per (task, seed), the mean over its (epochs, rank) blocks. The blocks of one
    (task, seed) share their data split, so they are not independent; (task, seed) pairs are,
    and a standard error is taken over them."""
    by_unit: Dict[tuple, List[float]] = {}
    for (t, _, _, seed), v in sorted(values.items()):
        by_unit.setdefault((t, seed), []).append(v)
    return [statistics.fmean(v) for v in by_unit.values()]


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean; 0 for a single value (nothing to estimate it from)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def mean_se(values: Sequence[float]) -> str:
    """``mean ± standard error (n=k)``; the error is left out for a single value."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    text = f"{mean if round(mean, 1) else 0.0:+.1f}"  # no "-0.0" for a float-sum residue
    if len(values) > 1:
        text += f" ± {standard_error(values):.1f}"
    return f"{text} (n={len(values)})"


def fig2_summary(d: Dict[tuple, float], keys: set, epochs, ranks) -> dict:
    """Fig. 2's question for one method, from its differences ``d`` against a base, over the
    (task, epochs, rank, seed) in ``keys``.

    Returns ``{"cells": {(epochs, rank): [...]}, "longer": [...], "wider": [...]}``: per
    (epochs, rank), the differences (one per (task, seed)); "longer", per (task, seed), the
    mean over ranks of how much the difference grows from the fewest to the most epochs;
    "wider", per (task, seed), the mean over epoch counts of its growth from the smallest to
    the largest rank. Fig. 2 predicts positive differences and positive growth.
    """
    lo_e, hi_e, lo_r, hi_r = min(epochs), max(epochs), min(ranks), max(ranks)
    cells = {(e, r): [d[k] for k in sorted(keys) if k[1:3] == (e, r)]
             for e in epochs for r in ranks}
    longer = {k: d[(k[0], hi_e, k[2], k[3])] - d[k] for k in keys
              if k[1] == lo_e and (k[0], hi_e, k[2], k[3]) in keys} if hi_e > lo_e else {}
    wider = {k: d[(k[0], k[1], hi_r, k[3])] - d[k] for k in keys
             if k[2] == lo_r and (k[0], k[1], hi_r, k[3]) in keys} if hi_r > lo_r else {}
    return {"cells": cells, "longer": unit_means(longer), "wider": unit_means(wider)}


def pooled_table(diffs: Dict[str, Dict[tuple, float]], tasks, epochs, ranks,
                 base: str) -> List[str]:
    """Fig. 2's table against ``base`` from ``diffs`` (method → its ``differences`` against
    ``base``): the differences per (epochs, rank) and their growth along both axes, every
    column over the same (task, seed) runs (those all the main-grid methods have; the
    searched row, which lags, over its share of them)."""
    methods = list(diffs)
    keys = shared_keys({m: d for m, d in diffs.items() if m != SEARCHED})
    stats = {m: fig2_summary(d, keys & set(d), epochs, ranks) for m, d in diffs.items()}
    task_names = " and ".join(TASK_LABELS[t] for t in tasks)
    # A grid narrowed to one epoch count or one rank has no growth along that axis.
    longer, wider = max(epochs) > min(epochs), max(ranks) > min(ranks)
    growth = ([f"from {min(epochs)} to {max(epochs)} epochs (mean over ranks)"] if longer
              else []) + ([f"from rank {min(ranks)} to {max(ranks)} (mean over epoch counts)"]
                          if wider else [])
    growth_text = (f"; then its growth {' and '.join(growth)}, per (task, seed), then mean ± "
                   f"standard error" if growth else "")
    lagging = " (the searched row, which lags: its share of them)" if SEARCHED in diffs else ""
    lines = [f"Fig. 2's question against {label(base)}, pooled over {task_names}: the "
             f"difference per (epochs, rank), mean ± standard error over (task, seed) pairs "
             f"(n){growth_text}. Every column uses the same runs: those all the main-grid rows "
             f"have finished{lagging}. Fig. 2 predicts positive entries that grow"
             f"{', i.e. positive growth rows' if growth else ''}.", "",
             "| Epochs, rank | " + " | ".join(label(m) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for e in epochs:
        for r in ranks:
            lines.append(f"| {e}, {r} | " + " | ".join(mean_se(stats[m]["cells"][(e, r)])
                                                      for m in methods) + " |")
    if longer:
        lines.append(f"| growth, {min(epochs)} → {max(epochs)} epochs | "
                     + " | ".join(mean_se(stats[m]["longer"]) for m in methods) + " |")
    if wider:
        lines.append(f"| growth, rank {min(ranks)} → {max(ranks)} | "
                     + " | ".join(mean_se(stats[m]["wider"]) for m in methods) + " |")
    return lines + [""]


def auto_choices(chosen: List[dict]) -> tuple:
    """Mean α and λ the auto rule set in the selected runs, where it had something to measure:
    α after experts 2..T (expert 1 has no predecessor: 0.5) and λ before experts 3..T (before
    expert 2 only one expert exists: 1)."""
    alphas = [a for b in chosen for t, a in b["auto_alpha_mean_per_expert"].items() if t != "1"]
    lams = [v for b in chosen for t, v in b["auto_lambda_mean_per_expert"].items() if t != "2"]
    return (statistics.fmean(alphas) if alphas else math.nan,
            statistics.fmean(lams) if lams else math.nan)


@dataclass
class Loaded:
    """A folder's finished cells, read once for both table.md and the plots."""
    results: Dict[Cell, dict]  # main-grid cells
    searched: Dict[Cell, dict]  # the search's cells
    summary: dict  # :func:`summarize`, plus the searched row (:func:`add_searched`)
    methods: List[str]  # the grid's methods, plus the searched row where it has entries


def load(out_dir: Path, tasks, epochs, ranks, methods, seeds, lrs) -> Loaded:
    """Every finished cell of the grid and of the search, read from disk once."""
    results = load_results(out_dir, all_cells(tasks, epochs, ranks, methods, seeds, lrs))
    summary = summarize(results, tasks, epochs, ranks, methods, seeds, lrs)
    searched = search_results(out_dir, tasks, epochs, ranks, seeds, lrs)
    add_searched(summary, searched, tasks, epochs, ranks)
    methods = list(methods) + ([SEARCHED] if any(k[3] == SEARCHED for k in summary) else [])
    return Loaded(results, searched, summary, methods)


def build_table(out_dir: Path, loaded: Loaded, tasks, epochs, ranks, methods, seeds,
                lrs) -> str:
    cells = all_cells(tasks, epochs, ranks, methods, seeds, lrs)  # the grid's, not the rows'
    results, searched, summary, methods = (loaded.results, loaded.searched, loaded.summary,
                                           loaded.methods)
    cpu_h = sum(r["seconds"]["cpu"] for r in [*results.values(), *searched.values()]) / 3600
    status = ("complete" if len(results) == len(cells) else
              f"PARTIAL: {len(results)} of {len(cells)} cells finished")
    if searched:
        total = len(SEARCH_METHODS) * len(tasks) * len(epochs) * len(ranks) * len(seeds)
        status += f"; searched LoRASC: {len(searched)} of {total} search cells"
    s = json.loads((out_dir / "settings.json").read_text())["sizes"] \
        if (out_dir / "settings.json").is_file() else {}
    lines = [f"Status: {status}; {cpu_h:.2f} CPU-hours in the finished cells (one thread each).",
             "",
             f"all-MiniLM-L6-v2, LoRA on query/value of all 6 layers, lora_alpha = 2 x rank; "
             f"one expert per epoch; train rows {s.get('num_train')}, validation "
             f"{s.get('num_dev')}, test up to {s.get('num_eval')} (MeZO sampling per seed), "
             f"batch {s.get('batch_size')}, max_seq_len {s.get('max_seq_len')}, AdamW, linear "
             f"schedule with {s.get('warmup_ratio')} warmup. Learning rate selected on "
             f"validation per task, epochs, rank, method and seed from "
             f"{{{', '.join(format_lr(x) for x in lrs)}}} (ties to the smaller rate). "
             f"Entries: test accuracy mean ± std over seeds {', '.join(map(str, seeds))}, then "
             f"[train accuracy mean] of the same selected runs. (k/{len(seeds)}): only k seeds "
             f"have every rate finished. Bold: best test mean in the column (over the seeds "
             f"each row has finished). Runs per seed: the configurations each entry was "
             f"selected among.", ""]
    if SEARCHED in methods:
        lines += [
            f"{SEARCHED_LABEL}: §4.1's α {{{', '.join(f'{a:g}' for a in SLOW_ALPHAS)}}} x λ "
            f"{{{', '.join(f'{v:g}' for v in NOISE_LAMBDAS)}}} at the rate validation chose for "
            f"LoRASC (α 0.5, λ 1), validation choosing the pair: {len(lrs) + len(SEARCH_METHODS)}"
            f" trained configurations per seed, against {len(lrs)} for every other row (the "
            f"paper's joint search would be {len(lrs) * len(SEARCH_PAIRS)}).", ""]
    for t in tasks:
        for e in epochs:
            lines += [f"### {TASK_LABELS[t]}, {e} epochs", "",
                      "| Method | runs per seed | " + " | ".join(f"r={r}" for r in ranks) + " |",
                      "|---|---|" + "---|" * len(ranks)]
            best = {r: max((summary[(t, e, r, m)]["test"]["mean"] for m in methods
                            if (t, e, r, m) in summary), default=None) for r in ranks}
            for m in methods:
                entries = []
                for r in ranks:
                    st = summary.get((t, e, r, m))
                    if st is None:
                        entries.append("—")
                        continue
                    text = f"{st['test']['mean']:.1f}"
                    if st["test"]["n"] > 1:
                        text += f" ± {st['test']['std']:.1f}"
                    if st["test"]["n"] < len(seeds):
                        text += f" ({st['test']['n']}/{len(seeds)})"
                    if math.isclose(st["test"]["mean"], best[r]):
                        text = f"**{text}**"
                    entries.append(f"{text} [{st['train']['mean']:.1f}]")
                runs = len(lrs) + len(SEARCH_METHODS) if m == SEARCHED else len(lrs)
                lines.append(f"| {label(m)} | {runs} | " + " | ".join(entries) + " |")
            lines.append("")
    others = [m for m in methods if m != "lora"]
    if "lora" in methods and others:  # a grid narrowed to one method has nothing to pair
        d_lora = {m: differences(summary, tasks, epochs, ranks, m) for m in others}
        lines += ["Paired test-accuracy difference against LoRA (points; per seed on the same "
                  "split, then mean ± standard error over the seeds both have):", "",
                  "| Task, epochs, rank | " + " | ".join(label(m) for m in others) + " |",
                  "|---|" + "---|" * len(others)]
        for t in tasks:
            for e in epochs:
                for r in ranks:
                    lines.append(f"| {TASK_LABELS[t]}, {e}, {r} | " + " | ".join(
                        mean_se([v for (t2, e2, r2, _), v in sorted(d_lora[m].items())
                                 if (t2, e2, r2) == (t, e, r)]) for m in others) + " |")
        lines.append("")
        lines += pooled_table(d_lora, tasks, epochs, ranks, "lora")
    cascades = [m for m in others if m != "cola"]
    if "cola" in methods and cascades:  # Fig. 2 also compares the cascade to COLA's
        lines += pooled_table({m: differences(summary, tasks, epochs, ranks, m, "cola")
                               for m in cascades}, tasks, epochs, ranks, "cola")
    # The keep-or-drop question for `auto`, and what the search buys: paired per seed, pooled
    # over every finished (task, epochs, rank, seed); the error over (task, seed) means.
    for m, base in (("lorasc_auto", "noise"), (SEARCHED, "noise"), ("lorasc_auto", SEARCHED)):
        d = differences(summary, tasks, epochs, ranks, m, base)
        if d:
            wins = sum(v > 0 for v in d.values())
            losses = sum(v < 0 for v in d.values())
            lines += [f"{label(m)} minus {label(base)}, test accuracy paired per seed over all "
                      f"blocks both have: mean {statistics.fmean(d.values()):+.2f} points over "
                      f"{len(d)} (task, epochs, rank, seed) blocks, higher in {wins}, lower in "
                      f"{losses}, equal in {len(d) - wins - losses}; over (task, seed) means "
                      f"{mean_se(unit_means(d))}.", ""]
    auto_rows = [(k, v) for k, v in summary.items() if k[3] == "lorasc_auto"]
    if auto_rows:
        lines += ["What the auto rule chose in the selected runs (mean over matrices, experts "
                  "and seeds, leaving out the fallbacks: α after experts 2..T, λ before experts "
                  "3..T; fixed LoRASC uses α 0.5, λ 1):", ""]
        for (t, e, r, _), st in auto_rows:
            mean_alpha, mean_lambda = auto_choices(st["chosen"])
            lines.append(f"- {TASK_LABELS[t]} e{e} r{r}: α {mean_alpha:.3f}, λ {mean_lambda:.3f}")
        lines.append("")
    # The rates validation chose: tells whether the grid's ends cut the search short.
    lines += ["Selected learning rates (per seed, in seed order):", ""]
    for key, st in summary.items():
        t, e, r, m = key
        pairs = (" (α, λ: " + ", ".join(f"{a:g}/{v:g}" for a, v in st["pairs"]) + ")"
                 if "pairs" in st else "")
        lines.append(f"- {TASK_LABELS[t]} e{e} r{r} {label(m)}: "
                     f"{', '.join(format_lr(x) for x in st['lrs'])}{pairs}")
    return "\n".join(lines) + "\n"


def plot(out_dir: Path, loaded: Loaded, tasks, epochs, ranks, seeds) -> List[Path]:
    """One PNG per task: test (top) and train (bottom) accuracy against rank, per epoch count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, methods = loaded.summary, loaded.methods
    paths = []
    for t in tasks:
        if not any(k[0] == t for k in summary):
            continue
        # At least 7.5 inches wide, so that one column still shows the whole title.
        fig, axes = plt.subplots(2, len(epochs), figsize=(max(4.5 * len(epochs), 7.5), 7),
                                 squeeze=False, sharex=True)
        for j, e in enumerate(epochs):
            for i, split in enumerate(("test", "train")):
                ax = axes[i][j]
                for m in methods:
                    pts = [(r, summary[(t, e, r, m)][split]) for r in ranks
                           if (t, e, r, m) in summary]
                    if pts:
                        ax.errorbar([r for r, _ in pts], [st["mean"] for _, st in pts],
                                    yerr=[st["std"] for _, st in pts], marker="o", capsize=3,
                                    label=label(m))
                ax.set_xscale("log", base=2)
                ax.set_xticks(list(ranks), [str(r) for r in ranks])
                ax.set_title(f"{TASK_LABELS[t]}, {e} epochs: {split} accuracy")
                ax.grid(alpha=0.3)
                if i == 1:
                    ax.set_xlabel("LoRA rank")
                if j == 0:
                    ax.set_ylabel(f"{split} accuracy (%), mean ± std over seeds")
        axes[0][0].legend(fontsize=8)
        counts = [st["test"]["n"] for k, st in summary.items() if k[0] == t]
        seeds_note = (f"{min(counts)}" if min(counts) == max(counts)
                      else f"{min(counts)}-{max(counts)}")
        fig.suptitle(f"all-MiniLM-L6-v2, {TASK_LABELS[t]}: learning rate selected on validation "
                     f"per point; {seeds_note} of {len(seeds)} seeds per point", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{t}_rank_epochs.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    paths += plot_advantage(out_dir, summary, tasks, epochs, ranks, methods, plt)
    return paths


def plot_advantage(out_dir: Path, summary: dict, tasks, epochs, ranks, methods, plt) -> List[Path]:
    """``advantage_over_lora.png``: Fig. 2's shape, each method's per-seed test-accuracy
    difference against LoRA against rank (mean ± standard error over seeds), one line per
    epoch count, one row of panels per task."""
    others = [m for m in methods if m != "lora"]
    tasks = [t for t in tasks if any(k[0] == t for k in summary)]
    if not tasks or not others:
        return []
    fig, axes = plt.subplots(len(tasks), len(others), figsize=(max(3.2 * len(others), 12),
                             2.9 * len(tasks)), squeeze=False, sharex=True, sharey="row")
    diffs = {m: differences(summary, tasks, epochs, ranks, m) for m in others}
    for i, t in enumerate(tasks):
        for j, m in enumerate(others):
            ax = axes[i][j]
            for e in epochs:
                pts = [(r, [v for k, v in diffs[m].items() if k[:3] == (t, e, r)])
                       for r in ranks]
                pts = [(r, d) for r, d in pts if d]
                if pts:
                    ax.errorbar([r for r, _ in pts], [statistics.fmean(d) for _, d in pts],
                                yerr=[standard_error(d) for _, d in pts],
                                marker="o", capsize=3, label=f"{e} epochs")
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(ranks), [str(r) for r in ranks])
            ax.set_title(f"{TASK_LABELS[t]}: {label(m)}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(tasks) - 1:
                ax.set_xlabel("LoRA rank")
            if j == 0:
                ax.set_ylabel("test acc. minus LoRA (points)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Difference against LoRA, same seed and split (mean ± s.e. over seeds); "
                 "Fig. 2 predicts lines above 0 that rise with rank and epochs", fontsize=10)
    fig.tight_layout()
    path = out_dir / "advantage_over_lora.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


# ---- command line -----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=rm.REPO / "bench" / "results" / "rank_epochs")
    p.add_argument("--tasks", type=rm._csv(str), default=list(TASKS))
    p.add_argument("--epochs", type=rm._csv(int), default=list(EPOCHS))
    p.add_argument("--ranks", type=rm._csv(int), default=list(RANKS))
    rm.add_grid_arguments(p, METHODS, "tiny sizes: SST-2, ranks 2 and 4, 2 epochs, LoRA and "
                          "LoRASC auto", "only write table.md and the plots; they always cover the "
                          "folder's whole grid (settings.json), whatever this run narrows")
    p.set_defaults(lrs=list(LRS))
    p.add_argument("--search", action="store_true",
                   help="run the searched LoRASC's cells (α, λ of §4.1 at the fixed LoRASC's "
                        "chosen rate) whose rate is known, instead of the main grid")
    a = p.parse_args(argv)
    s = dict(SMOKE if a.smoke else DEFAULTS)
    if a.smoke:  # the smoke grid, except where an option narrows it further
        a.tasks, a.epochs, a.seeds, a.lrs = ["sst2"], [2], [0], [2e-3]
        if a.ranks == list(RANKS):
            a.ranks = [2, 4]
        if a.methods == list(METHODS):
            a.methods = ["lora", "lorasc_auto"]
    for name, given, known in (("task", a.tasks, TASKS), ("method", a.methods, METHODS)):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {name}(s) {bad}; known: {', '.join(known)}")
    grid = (a.tasks, a.epochs, a.ranks, a.methods, a.seeds, a.lrs)
    if not a.table:
        rm.check_settings(a.out_dir, s, {"tasks": a.tasks, "epochs": a.epochs,
                                         "ranks": a.ranks, "methods": a.methods,
                                         "seeds": a.seeds, "lrs": a.lrs})
        cells = (search_cells(a.out_dir, a.tasks, a.epochs, a.ranks, a.seeds, a.lrs)
                 if a.search else all_cells(*grid))
        sweep(a.out_dir, rm.shard_cells(cells, a.shard), s)
    # table.md and the plots cover every cell this folder was asked for, not this run's part.
    g = rm.recorded_grid(a.out_dir, {"tasks": a.tasks, "epochs": a.epochs, "ranks": a.ranks,
                                     "methods": a.methods, "seeds": a.seeds, "lrs": a.lrs})
    ordered = ([t for t in TASKS if t in g["tasks"]], sorted(g["epochs"]), sorted(g["ranks"]),
               [m for m in METHODS if m in g["methods"]], sorted(g["seeds"]), sorted(g["lrs"]))
    loaded = load(a.out_dir, *ordered)
    table = build_table(a.out_dir, loaded, *ordered)
    atomic_write_text(a.out_dir / "table.md", table)
    tasks, epochs, ranks, _, seeds, _ = ordered
    plot(a.out_dir, loaded, tasks, epochs, ranks, seeds)
    print(table)


if __name__ == "__main__":
    main()
