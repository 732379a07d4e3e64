"""Table 1 from the cells' results: the data, its markdown, and the files it is written to."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, Iterable, Sequence

from lorasc_tune.io import atomic_write_text

from paper_cells import Cell, Sweep  # noqa: E402
from paper_grids import FIXED_NOISE_LAMBDA, FIXED_SLOW_ALPHA, grid_text, lr_text  # noqa: E402
from paper_methods import TASK_LABELS, VARIANTS  # noqa: E402
from paper_scoring import primary_metric  # noqa: E402
from paper_selection import grid_point_label, selections, table_rows  # noqa: E402


def load_results(sweep_dir: Path, cells: Iterable[Cell]) -> Dict[Cell, dict]:
    """The stored result of each cell that has one."""
    out = {}
    for cell in cells:
        path = cell.result_path(sweep_dir)
        if path.is_file():
            out[cell] = json.loads(path.read_text())
    return out


def describe(result: dict) -> str:
    if result["diverged"]:
        return "diverged (non-finite loss): recorded, excluded from the selection"
    metric = result["metric"]
    return (f"validation {metric} {result['validation'][metric]:.1f}, "
            f"test {metric} {result['test'][metric]:.1f}")


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def build_table(results: Dict[Cell, dict], sweep: Sweep) -> dict:
    """Table 1 as data: per row and task, the test score of the validation-selected
    configuration, as mean ± std over seeds; ``avg`` is the per-seed mean over tasks, then
    mean ± std (over the seeds that have every task). ``search`` says, per row, how many
    configurations each entry was chosen among and how many times a learning-rate-only
    search that is."""
    rows, search = {}, {}
    for table_row in table_rows(sweep):
        row, per_seed = {}, {seed: [] for seed in sweep.seeds}
        for task in sweep.tasks:
            chosen = selections(results, sweep, task, table_row)
            test = {seed: r["test"][r["metric"]] for seed, r in chosen.items()}
            for seed, score in test.items():
                per_seed[seed].append(score)
            row[task] = {**(mean_std(list(test.values())) if test else {"n": 0}),
                         "seeds": {seed: {"lr": r["lr"], "slow_alpha": r.get("slow_alpha"),
                                          "noise_lambda": r.get("noise_lambda"),
                                          "validation": r["validation"], "test": r["test"]}
                                   for seed, r in chosen.items()}}
        averages = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(sweep.tasks)]
        row["avg"] = mean_std(averages) if averages else {"n": 0}
        rows[table_row.name] = row
        configs = table_row.configs_per_seed(sweep)
        search[table_row.name] = {
            "label": table_row.label, "variant": table_row.variant,
            "alphas": list(table_row.alphas) if table_row.alphas is not None else None,
            "lambdas": list(table_row.lambdas) if table_row.lambdas is not None else None,
            "configs": configs, "times_lr_only": configs // len(sweep.lrs)}
    searched = any(VARIANTS[v].searches_slow_noise for v in sweep.variants)
    table = {
        "tasks": list(sweep.tasks), "variants": list(sweep.variants),
        "seeds": list(sweep.seeds), "lrs": list(sweep.lrs),
        "alphas": list(sweep.alphas) if searched else None,
        "lambdas": list(sweep.lambdas) if searched else None,
        "metrics": {t: primary_metric(t) for t in sweep.tasks},
        "row_names": list(rows), "rows": rows, "search": search,
    }
    table["markdown"] = table_markdown(table)
    return table


def _entry(stats: dict, n_seeds: int) -> str:
    if stats["n"] == 0:
        return "—"
    text = f"{stats['mean']:.1f} ± {stats['std']:.1f}"
    return text if stats["n"] == n_seeds else f"{text} ({stats['n']}/{n_seeds})"


def _configs(search: dict) -> str:
    times = search["times_lr_only"]
    return str(search["configs"]) + (f" ({times}×)" if times > 1 else "")


def table_markdown(table: dict) -> str:
    """Table 1's layout: methods as rows; how many configurations each was chosen among; the
    tasks; the average."""
    n_seeds = len(table["seeds"])
    header = ["Method", "Configs", *(TASK_LABELS[t] for t in table["tasks"]), "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in table["row_names"]:
        row, search = table["rows"][name], table["search"][name]
        cells = ([_configs(search)] + [_entry(row[t], n_seeds) for t in table["tasks"]]
                 + [_entry(row["avg"], n_seeds)])
        lines.append(f"| {search['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    caption = (
        f"Test score (%) of the configuration with the best validation score, chosen per task, "
        f"method and seed. Configs: how many configurations each choice was made among: the "
        f"learning rates {grid_text(table['lrs'], lr_text)}")
    if table["alphas"] is not None:
        caption += (f", and for a LoRASC row also every α in {grid_text(table['alphas'])} with "
                    f"every λ in {grid_text(table['lambdas'])}. (k×): k times as many "
                    f"configurations as a row without LoRASC, so that much more search went "
                    f"into the score. A row labelled with one α and λ chooses the learning rate "
                    f"only, at that point of the grid (the same runs)")
        fixed = (FIXED_SLOW_ALPHA in table["alphas"] and FIXED_NOISE_LAMBDA in table["lambdas"])
        if not fixed:
            caption += (f"; there is no row at the configs' "
                        f"{grid_point_label(FIXED_SLOW_ALPHA, FIXED_NOISE_LAMBDA)}, "
                        f"which the grid leaves out")
    caption += (
        f". Mean ± std over seeds {', '.join(map(str, table['seeds']))}. Accuracy, except F1 "
        f"for SQuAD/DROP and exact match for GSM8K. Diverged runs are never selected. "
        f"(k/{n_seeds}): only k seeds finished.")
    lines.append(caption)
    return "\n".join(lines) + "\n"


def write_table(table: dict, sweep_dir: Path) -> None:
    atomic_write_text(sweep_dir / "table1.md", table["markdown"])
    atomic_write_text(sweep_dir / "table1.json", json.dumps(table, indent=1) + "\n")
