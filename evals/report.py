"""A one-line-per-task markdown table from lm-eval's results JSON.

    python -m evals.report results_2025-01-01T00-00-00.json            # print the table
    python -m evals.report results.json --out table.md                 # also write it

Rows are the suite's top-level tasks (MMLU, BBH, DROP, HumanEval, GSM8K = ``openinstruct_gsm8k``)
when present, then any other top-level task or group in the file. Scores are percentages with two decimals, the way the
paper's Table 2 prints them; ``N`` is the number of scored examples (after ``--limit``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from lorasc_tune.io import atomic_write_text

# Top-level task -> (display name, metrics in display order).
KNOWN_ROWS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "instructeval_mmlu": ("MMLU", ("acc",)),
    "instructeval_bbh": ("BBH", ("exact_match",)),
    "instructeval_drop": ("DROP", ("score", "em", "f1")),  # score: InstructEval's startswith
    "instructeval_humaneval": ("HumanEval", ("pass@1",)),
    "openinstruct_gsm8k": ("GSM8K", ("exact_match",)),  # the paper's: open-instruct 8-shot direct
    "instructeval_gsm8k": ("GSM8K (train-rationale shots)", ("exact_match",)),
    "mezo_gsm8k": ("GSM8K (MeZO format, in-domain)", ("exact_match",)),
}


def _metric_values(entry: Dict[str, Any]) -> Dict[str, float]:
    """``{"acc": 0.41, ...}`` from a results entry keyed like ``"acc,none"`` (stderr dropped)."""
    values = {}
    for key, value in entry.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        values.setdefault(key.split(",", 1)[0], float(value))
    return values


def _leaves(name: str, group_subtasks: Dict[str, List[str]]) -> List[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for sub in group_subtasks[name] for leaf in _leaves(sub, group_subtasks)]


def _top_level(results: Dict[str, Any]) -> List[str]:
    groups: Dict[str, List[str]] = results.get("group_subtasks", {})
    members = {t for subs in groups.values() for t in subs}
    names = list(results.get("results", {}))
    # Umbrella groups without metrics of their own (e.g. "instructeval") are expanded.
    ordered: List[str] = []
    for name in names:
        if name in members:
            continue
        if name in groups and not _metric_values(results["results"][name]):
            ordered.extend(s for s in groups[name] if s in results["results"])
        else:
            ordered.append(name)
    known = [n for n in KNOWN_ROWS if n in ordered]
    return known + [n for n in ordered if n not in KNOWN_ROWS]


def _shots(name: str, results: Dict[str, Any], leaves: Iterable[str]) -> str:
    configs = results.get("configs", {})
    for leaf in leaves:
        meta = (configs.get(leaf) or {}).get("metadata") or {}
        if "shots" in meta:
            return str(meta["shots"])
        if leaf in results.get("n-shot", {}):
            return str(results["n-shot"][leaf])
    return "?"


def table_rows(results: Dict[str, Any]) -> List[Tuple[str, str, str, str, str]]:
    """``(task, shots, metric, score, n)`` per top-level task."""
    groups = results.get("group_subtasks", {})
    rows = []
    for name in _top_level(results):
        values = _metric_values(results["results"][name])
        display, preferred = KNOWN_ROWS.get(name, (results["results"][name].get("alias", name).strip(), ()))
        metrics = [m for m in preferred if m in values] + sorted(m for m in values if m not in preferred)
        leaves = _leaves(name, groups)
        n_samples = results.get("n-samples", {})
        n = sum(int((n_samples.get(leaf) or {}).get("effective", 0)) for leaf in leaves)
        metric_label = " / ".join(metrics)
        if len(leaves) > 1:
            metric_label += f" (mean of {len(leaves)})"
        score = " / ".join(f"{100 * values[m]:.2f}" for m in metrics)
        rows.append((display, _shots(name, results, leaves), metric_label, score, str(n)))
    return rows


#: How many of HumanEval's canonical solutions InstructEval's cut at the first blank line breaks, and
#: so what a model that wrote every canonical solution scores (checked by executing them in
#: tests/eval_suite/test_evals_humaneval.py: 35 contain a blank line, one still passes when cut).
HUMANEVAL_BROKEN_BY_CUT = 34
HUMANEVAL_PROBLEMS = 164
HUMANEVAL_CEILING = (HUMANEVAL_PROBLEMS - HUMANEVAL_BROKEN_BY_CUT) / HUMANEVAL_PROBLEMS

HUMANEVAL_NOTE = (
    f"HumanEval: as in InstructEval, a completion is cut at its first blank line, which breaks "
    f"{HUMANEVAL_BROKEN_BY_CUT} of the {HUMANEVAL_PROBLEMS} canonical solutions: a model that wrote "
    f"every canonical solution would score {100 * HUMANEVAL_CEILING:.2f} here.")


def markdown_table(results: Dict[str, Any]) -> str:
    """The table, then a note under it when a row needs one (HumanEval's ceiling)."""
    rows = table_rows(results)
    lines = ["| Task | Shots | Metric | Score | N |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if any(row[0] == KNOWN_ROWS["instructeval_humaneval"][0] for row in rows):
        lines += ["", HUMANEVAL_NOTE]
    return "\n".join(lines) + "\n"


def find_results(output_path: str | Path, newer_than: float = 0.0) -> Optional[Path]:
    """The newest ``results_*.json`` lm-eval wrote under ``output_path`` after ``newer_than``."""
    root = Path(output_path)
    if root.is_file():
        return root
    candidates = [p for p in root.rglob("results*.json") if p.stat().st_mtime >= newer_than]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def write_table(results_json: Path) -> Path:
    """Write ``<results>.md`` beside ``results_json``; returns its path."""
    table = markdown_table(json.loads(Path(results_json).read_text()))
    out = Path(results_json).with_suffix(".md")
    atomic_write_text(out, table)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="markdown table from lm-eval results JSON")
    parser.add_argument("results", help="lm-eval results JSON, or the --output_path folder")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    path = find_results(args.results)
    if path is None:
        print(f"no results*.json under {args.results}", file=sys.stderr)
        return 1
    table = markdown_table(json.loads(path.read_text()))
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
