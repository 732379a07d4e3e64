"""Reproduce the paper's Table 1: a resumable sweep over tasks x methods x seeds x learning rates.

    python recipes/paper_table1.py --sweep-dir runs/table1                      # the whole table
    python recipes/paper_table1.py --sweep-dir runs/table1 --tasks sst2,rte \\
        --variants lora,lorasc_lora --seeds 0 --lrs 1e-4 --dry-run             # show the plan

A *cell* is one (task, method, seed, learning rate). For each cell the script

1. trains with ``tune run lorasc_tune/recipes/lorasc_lora.py --config
   configs/paper/llama2_7b_<task>.yaml <method overrides> seed=<k> optimizer.lr=<lr>
   output_dir=<sweep_dir>/runs/...`` (the exact command is printed and logged to ``train.log``);
2. scores the final merged model ``epoch_{epochs-1}`` on the validation and the test split
   (``recipes/paper_scoring.py``: MeZO's rules, in-process);
3. writes ``<sweep_dir>/cells/<task>/<method>/seed<k>_lr<lr>.json`` atomically and deletes the
   cell's checkpoints (``--keep-checkpoints`` keeps them).

A rerun skips every cell whose JSON exists. A cell that crashed has no JSON and runs again,
resuming its training from the last saved epoch and skipping training when the final model
was already written. A JSON written under a different config (another ``--override``, an edited
YAML) is refused rather than mixed into the table.

The table: for each (task, method, seed) the learning rate with the best **validation** score is
selected (ties go to the smaller rate) and its **test** score is reported; entries are mean ± std
over seeds (sample std; 0 for one seed). Metrics in percent: accuracy for the classification and
multiple-choice tasks, F1 for SQuAD and DROP, exact match for GSM8K. The table is printed and
written to ``<sweep_dir>/table1.md`` and ``table1.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args

from lorasc_tune.config import LoRASCConfig
from lorasc_tune.data import MissingDataError
from lorasc_tune.data.mezo import resolve_file
from lorasc_tune.data.mezo import load_split
from lorasc_tune.plan import steps_per_epoch
from lorasc_tune.io import atomic_write_text

# This folder is on sys.path when the script runs (and the tests put it there): it has no
# __init__.py on purpose, because torchtune installs a top-level package named `recipes`.
from make_ablation_configs import ROWS, VARIANTS as ADAPTERS  # noqa: E402
from paper_scoring import primary_metric, score_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# `tune run` imports a custom recipe by module path (lorasc_tune.recipes.lorasc_lora).
RECIPE = "lorasc_tune/recipes/lorasc_lora.py"
DEFAULT_CONFIG_DIR = REPO_ROOT / "configs" / "paper"

# Table 1's columns, in the paper's (MeZO's) order, with their display names.
TASK_LABELS = {
    "sst2": "SST-2", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC",
    "multirc": "MultiRC", "copa": "COPA", "record": "ReCoRD", "squad": "SQuAD", "drop": "DROP",
    "gsm8k": "GSM8K",
}
DEFAULT_SEEDS = (0, 1, 2)
# The paper's exact grid could not be verified; this one brackets the usual LoRA rates for a 7B
# model at batch 4. Override with --lrs.
DEFAULT_LRS = (1e-4, 3e-4, 1e-3)

# Keys each cell sets itself; a user --override of them would silently change the grid.
CELL_KEYS = ("seed", "optimizer.lr", "output_dir", "resume_from_checkpoint")
# Bumped when the scoring rules change, so old cell results are not mixed with new ones.
SCORER_VERSION = 1


# ---- methods (table rows) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A row of Table 1: a display label and the overrides that turn the task config into it."""

    name: str
    label: str
    overrides: tuple


def _override_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _variant(name: str, label: str, row: str, adapter: str) -> Variant:
    """``row`` is an ablation row of make_ablation_configs.ROWS (lora = no cascade, cola, noise =
    full LoRASC); ``adapter`` picks LoRA / LoRA+ (lr_ratio_B 16) / DoRA. Every ``lorasc`` key is
    set, so a row never depends on what the task config happens to say."""
    ratio, dora = ADAPTERS[adapter]
    lorasc = dict(ROWS[row], num_experts=None, lr_ratio_B=ratio)
    overrides = [f"lorasc.{k}={_override_value(v)}" for k, v in lorasc.items()]
    overrides.append(f"model.use_dora={_override_value(dora)}")
    return Variant(name, label, tuple(overrides))


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    _variant("lora", "LoRA", "lora", "lora"),
    _variant("cola", "COLA", "cola", "lora"),
    _variant("lorasc_lora", "LoRA + LoRASC", "noise", "lora"),
    _variant("loraplus", "LoRA+", "lora", "loraplus"),
    _variant("lorasc_loraplus", "LoRA+ + LoRASC", "noise", "loraplus"),
    _variant("dora", "DoRA", "lora", "dora"),
    _variant("lorasc_dora", "DoRA + LoRASC", "noise", "dora"),
)}
# The sweep's default: Table 1's rows.
DEFAULT_VARIANTS = tuple(VARIANTS)

# Table 4's cascade frequency: LoRA + LoRASC with T experts spread evenly over the whole run
# (5 epochs) instead of one per epoch. The paper spans 2 to 1250 experts; the values between are
# our choice. Not in the default sweep: name them in --variants, e.g. lorasc_lora_T2,...
EXPERT_COUNTS = (2, 5, 10, 50, 250, 1250)
for _t in EXPERT_COUNTS:
    _base = VARIANTS["lorasc_lora"]
    VARIANTS[f"lorasc_lora_T{_t}"] = Variant(
        f"lorasc_lora_T{_t}", f"LoRA + LoRASC, T = {_t}",
        tuple(o for o in _base.overrides if not o.startswith("lorasc.num_experts="))
        + (f"lorasc.num_experts={_t}",))


# ---- cells ------------------------------------------------------------------------------------


class SweepError(RuntimeError):
    """A bad sweep input, or a cell that could not be finished; the message says which."""


class CellDiverged(SweepError):
    """Training stopped on a non-finite loss: a result of the grid (that rate is too high)."""


def format_lr(lr: float) -> str:
    """Short, exact-enough text for file names and the table: 0.0001 -> ``0.0001``."""
    return f"{lr:g}"


@dataclass(frozen=True)
class Cell:
    task: str
    variant: str
    seed: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}_lr{format_lr(self.lr)}"

    def result_path(self, sweep_dir: Path) -> Path:
        return sweep_dir / "cells" / f"{self.name}.json"

    def run_dir(self, sweep_dir: Path) -> Path:
        return sweep_dir / "runs" / self.name


@dataclass
class Sweep:
    """Everything that defines the sweep, from the command line."""

    sweep_dir: Path
    tasks: Sequence[str] = tuple(TASK_LABELS)
    variants: Sequence[str] = DEFAULT_VARIANTS
    seeds: Sequence[int] = DEFAULT_SEEDS
    lrs: Sequence[float] = DEFAULT_LRS
    config_dir: Path = DEFAULT_CONFIG_DIR
    overrides: Sequence[str] = ()
    max_new_tokens: int = 50
    eval_batch_size: int = 8
    keep_checkpoints: bool = False
    keep_going: bool = False

    def cells(self) -> List[Cell]:
        return [Cell(t, v, s, lr) for t in self.tasks for v in self.variants
                for s in self.seeds for lr in self.lrs]

    def config_path(self, task: str) -> Path:
        return Path(self.config_dir).resolve() / f"llama2_7b_{task}.yaml"

    def train_overrides(self, cell: Cell) -> List[str]:
        """User overrides, then the method's, then the cell's own keys (never overlapping)."""
        run_dir = cell.run_dir(Path(self.sweep_dir).resolve())
        return [*self.overrides, *VARIANTS[cell.variant].overrides,
                f"seed={cell.seed}", f"optimizer.lr={cell.lr!r}", f"output_dir={run_dir}"]


def load_train_config(config_path: Path, overrides: Sequence[str]) -> DictConfig:
    """The config ``tune run --config <config_path> <overrides>`` would hand the recipe."""
    if not config_path.is_file():
        raise SweepError(f"config not found: {config_path} (see --config-dir; "
                         f"recipes/make_paper_configs.py writes configs/paper/)")
    parser = TuneRecipeArgumentParser(add_help=False)
    yaml_args, cli_args = parser.parse_known_args(["--config", str(config_path), *overrides])
    return _merge_yaml_and_cli_args(yaml_args, cli_args)


def fingerprint(cfg: DictConfig, sweep: Sweep) -> str:
    """Hash of what determines a cell's numbers: the training config (minus where it is
    written) and the scoring settings. Interpolations stay unresolved, so moving the sweep
    folder keeps the hash."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("output_dir", "resume_from_checkpoint"):
        plain.pop(key, None)
    payload = json.dumps({"config": plain, "scorer": SCORER_VERSION,
                          "max_new_tokens": sweep.max_new_tokens}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tune_executable() -> str:
    """``tune`` next to this Python (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "tune"
    found = str(beside) if beside.exists() else shutil.which("tune")
    if found is None:
        raise SweepError("the `tune` command was not found; install torchtune in this environment")
    return found


# ---- running one cell -------------------------------------------------------------------------


def _log_tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def train_command(cell: Cell, sweep: Sweep, resume: bool = False) -> List[str]:
    """The ``tune run`` command line that trains the cell."""
    overrides = sweep.train_overrides(cell) + (["resume_from_checkpoint=true"] if resume else [])
    return [tune_executable(), "run", RECIPE, "--config", str(sweep.config_path(cell.task)),
            *overrides]


def train_cell(cell: Cell, sweep: Sweep, run_dir: Path, final_dir: Path) -> None:
    """Run ``tune run`` for the cell, resuming from the saved training state if there is one."""
    resume = (run_dir / "lorasc_state" / "training_state.pt").is_file()
    command = train_command(cell, sweep, resume=resume)
    log = run_dir / "train.log"
    print(f"  $ {shlex.join(command)}", flush=True)
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        # Same working directory as the scorer, so relative paths in configs and overrides mean
        # the same file in both; `tune run` finds the recipe as the installed module.
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode == 0 and (final_dir / "config.json").is_file():
        return
    # The recipe raises NonFiniteLossError when the loss becomes NaN/Inf: the learning rate
    # diverged, which is an outcome for the grid to record, not a crash to retry.
    error = CellDiverged if "NonFiniteLossError" in _log_tail(log) else SweepError
    raise error(f"training failed for {cell.name} (exit code {proc.returncode}); "
                f"log: {log}\n{_log_tail(log)}")


def prepare_run_dir(run_dir: Path, fp: str) -> None:
    """Reuse a crashed cell's folder (its saved state or final model) only if it was made with
    the same config; otherwise start it over."""
    marker = run_dir / "fingerprint.txt"
    if run_dir.exists() and (not marker.is_file() or marker.read_text().strip() != fp):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp + "\n")


def remove_checkpoints(run_dir: Path) -> None:
    """Delete the merged models and training state (GBs for a 7B model); keep the logs."""
    for path in [*run_dir.glob("epoch_*"), run_dir / "lorasc_state", run_dir / ".staging"]:
        if path.is_dir():
            shutil.rmtree(path)


def run_cell(cell: Cell, sweep: Sweep, cfg: DictConfig, fp: str,
             score_fn: Callable = score_checkpoint) -> dict:
    """Train (unless the final model exists), score, and write the cell's JSON. Returns it.

    A diverged run (non-finite loss) is recorded with ``"diverged": true`` and no scores, so the
    learning-rate selection passes over it and a rerun does not repeat it.
    """
    sweep_dir = Path(sweep.sweep_dir).resolve()
    run_dir = cell.run_dir(sweep_dir)
    final_dir = run_dir / f"epoch_{int(cfg.epochs) - 1}"
    t0 = time.perf_counter()
    prepare_run_dir(run_dir, fp)
    diverged = False
    if not (final_dir / "config.json").is_file():
        try:
            train_cell(cell, sweep, run_dir, final_dir)
        except CellDiverged:
            diverged = True
    t1 = time.perf_counter()
    scores = {"validation": None, "test": None} if diverged else score_fn(
        final_dir, cfg, cell.task, ("validation", "test"),
        max_new_tokens=sweep.max_new_tokens, batch_size=sweep.eval_batch_size)
    result = {
        "task": cell.task, "variant": cell.variant, "seed": cell.seed, "lr": cell.lr,
        "metric": primary_metric(cell.task), "diverged": diverged,
        "validation": scores["validation"], "test": scores["test"],
        "fingerprint": fp,
        "config": str(sweep.config_path(cell.task)),
        "overrides": sweep.train_overrides(cell),
        "checkpoint": final_dir.name,
        "train_seconds": round(t1 - t0, 1),
        "score_seconds": round(time.perf_counter() - t1, 1),
    }
    # Written last and atomically: a crash anywhere above leaves no JSON, so the cell reruns.
    atomic_write_text(cell.result_path(sweep_dir), json.dumps(result, indent=1) + "\n")
    if not sweep.keep_checkpoints:
        remove_checkpoints(run_dir)
    return result


def finished_result(cell: Cell, sweep_dir: Path, fp: str) -> Optional[dict]:
    """The cell's stored result, ``None`` if it has none; refuses one made under another config."""
    path = cell.result_path(sweep_dir)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("fingerprint") != fp:
        raise SweepError(
            f"{path} was computed with a different config or scorer (fingerprint "
            f"{result.get('fingerprint')} != {fp}): the --override list or configs/paper changed. "
            f"Use a new --sweep-dir, or delete the old results to recompute them.")
    return result


# ---- the sweep --------------------------------------------------------------------------------


def check_sweep(sweep: Sweep) -> None:
    """Validate every input before any training: bad names, a missing config or data file, an
    override that clashes with a cell or method key, or an invalid ``lorasc`` block fail here,
    naming the culprit."""
    unknown = [t for t in sweep.tasks if t not in TASK_LABELS]
    if unknown:
        raise SweepError(f"unknown task(s) {unknown}; known: {', '.join(TASK_LABELS)}")
    unknown = [v for v in sweep.variants if v not in VARIANTS]
    if unknown:
        raise SweepError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if not (sweep.tasks and sweep.variants and sweep.seeds and sweep.lrs):
        raise SweepError("the sweep is empty: --tasks, --variants, --seeds and --lrs each "
                         "need a value")
    # A repeated value would make two cells one, and no seed would ever count as complete.
    for flag, values in (("--tasks", sweep.tasks), ("--variants", sweep.variants),
                         ("--seeds", [str(x) for x in sweep.seeds]),
                         ("--lrs", [format_lr(x) for x in sweep.lrs])):
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise SweepError(f"{flag} repeats {', '.join(map(str, repeated))}")
    variant_keys = {o.split("=")[0] for v in VARIANTS.values() for o in v.overrides}
    for override in sweep.overrides:
        if "=" not in override and not override.startswith("~"):
            raise SweepError(f"--override {override!r} must be key=value (or ~key to delete)")
        key = override.split("=")[0].lstrip("~")
        if key in CELL_KEYS or key in variant_keys:
            raise SweepError(f"--override {override!r} sets {key}, which the sweep sets per cell "
                             f"or per method (use --seeds / --lrs / --sweep-dir / --variants)")
    for task in sweep.tasks:
        num_experts = {}
        for variant in sweep.variants:
            cfg = load_train_config(sweep.config_path(task), [*sweep.overrides,
                                                              *VARIANTS[variant].overrides])
            try:
                lorasc = LoRASCConfig.from_config(cfg.get("lorasc"))
            except ValueError as e:
                raise SweepError(f"{task} / {variant}: {e}") from e
            if lorasc.num_experts is not None:
                num_experts[variant] = lorasc.num_experts
        check_data_files(task, cfg.dataset)
        if num_experts:  # Table 4: every expert needs at least one step of the task's run
            steps = run_steps(task, cfg)
            for variant, t in num_experts.items():
                if t > steps:
                    raise SweepError(
                        f"{task} / {variant}: lorasc.num_experts={t}, but a {task} run has only "
                        f"{steps} optimizer steps; every expert needs one")


def run_steps(task: str, cfg: DictConfig) -> int:
    """Optimizer steps of one run of ``task`` under ``cfg``: its MeZO train split's size (read
    from the data file; the same for every seed) in whole batches, times the epochs."""
    ds = cfg.dataset
    rows = load_split(task, "train", seed=0, num_train=ds.num_train, num_dev=ds.get("num_dev"),
                      num_eval=ds.num_eval, data_dir=ds.get("data_dir"),
                      train_file=ds.get("train_file"))
    per_epoch = steps_per_epoch(len(rows) // cfg.batch_size, cfg.gradient_accumulation_steps,
                                cfg.get("max_steps_per_epoch"))
    return per_epoch * cfg.epochs


def check_data_files(task: str, cfg_dataset: DictConfig) -> None:
    """Fail now, not hours into the sweep, when a task's original files are missing."""
    for which, explicit in (("train", "train_file"), ("valid", "valid_file")):
        try:
            resolve_file(task, which, cfg_dataset.get("data_dir"), cfg_dataset.get(explicit))
        except MissingDataError as e:
            raise SweepError(f"{e} (for the sweep: --override dataset.data_dir=<root holding "
                             f"the files in that layout>, or set $LORASC_SHARED_DATA)") from e


def run_sweep(sweep: Sweep, dry_run: bool = False, score_fn: Callable = score_checkpoint) -> dict:
    """Run every unfinished cell, then build, print and write the table. Returns the table."""
    check_sweep(sweep)
    sweep_dir = Path(sweep.sweep_dir).resolve()
    cells = sweep.cells()
    done, ran, failed = 0, 0, []
    for i, cell in enumerate(cells, 1):
        cfg = load_train_config(sweep.config_path(cell.task), sweep.train_overrides(cell))
        fp = fingerprint(cfg, sweep)
        if finished_result(cell, sweep_dir, fp) is not None:
            done += 1
            continue
        if dry_run:
            print(f"[{i}/{len(cells)}] would run {cell.name}:\n"
                  f"  $ {shlex.join(train_command(cell, sweep))}")
            continue
        print(f"[{i}/{len(cells)}] {cell.name}", flush=True)
        try:
            result = run_cell(cell, sweep, cfg, fp, score_fn=score_fn)
        except Exception as e:  # noqa: BLE001 - with --keep-going any cell failure is reported
            if not sweep.keep_going:
                raise
            print(f"  FAILED ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
            failed.append(cell.name)
            continue
        ran += 1
        print(f"  {describe(result)} (train {result['train_seconds']}s, "
              f"score {result['score_seconds']}s)", flush=True)
    print(f"{len(cells)} cells: {done} already finished (skipped), {ran} run now, "
          f"{len(failed)} failed" + ("" if not dry_run else ", dry run: nothing trained"))
    table = build_table(load_results(sweep_dir, cells), sweep)
    table["failed_cells"] = failed
    write_table(table, sweep_dir)
    print(table["markdown"])
    return table


# ---- the table --------------------------------------------------------------------------------


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
        return "diverged (non-finite loss): recorded, excluded from the LR selection"
    metric = result["metric"]
    return (f"validation {metric} {result['validation'][metric]:.1f}, "
            f"test {metric} {result['test'][metric]:.1f}")


def select_lr(by_lr: Dict[float, dict]) -> Optional[dict]:
    """The result whose validation score is best; a tie goes to the smaller learning rate.
    Diverged runs are passed over; ``None`` when every rate diverged."""
    scored = {lr: r for lr, r in by_lr.items() if not r.get("diverged")}
    if not scored:
        return None
    best_lr = min(scored, key=lambda lr: (-scored[lr]["validation"][scored[lr]["metric"]], lr))
    return scored[best_lr]


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def selections(results: Dict[Cell, dict], sweep: Sweep, task: str, variant: str) -> Dict[int, dict]:
    """``{seed: the validation-selected result}`` for one (task, variant).

    A seed counts only once every learning rate of the grid has a result, so a partly finished
    sweep never reports a selection made over fewer rates; a seed whose every rate diverged has
    no selection either.
    """
    chosen = {}
    for seed in sweep.seeds:
        by_lr = {lr: results[Cell(task, variant, seed, lr)] for lr in sweep.lrs
                 if Cell(task, variant, seed, lr) in results}
        best = select_lr(by_lr) if len(by_lr) == len(sweep.lrs) else None
        if best is not None:
            chosen[seed] = best
    return chosen


def build_table(results: Dict[Cell, dict], sweep: Sweep) -> dict:
    """Table 1 as data: per method and task, the test score of the validation-selected learning
    rate, as mean ± std over seeds; ``avg`` is the per-seed mean over tasks, then mean ± std
    (over the seeds that have every task)."""
    rows = {}
    for variant in sweep.variants:
        row, per_seed = {}, {seed: [] for seed in sweep.seeds}
        for task in sweep.tasks:
            chosen = selections(results, sweep, task, variant)
            test = {seed: r["test"][r["metric"]] for seed, r in chosen.items()}
            for seed, score in test.items():
                per_seed[seed].append(score)
            row[task] = {**(mean_std(list(test.values())) if test else {"n": 0}),
                         "seeds": {seed: {"lr": r["lr"], "validation": r["validation"],
                                          "test": r["test"]} for seed, r in chosen.items()}}
        averages = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(sweep.tasks)]
        row["avg"] = mean_std(averages) if averages else {"n": 0}
        rows[variant] = row
    table = {
        "tasks": list(sweep.tasks), "variants": list(sweep.variants),
        "seeds": list(sweep.seeds), "lrs": list(sweep.lrs),
        "metrics": {t: primary_metric(t) for t in sweep.tasks}, "rows": rows,
    }
    table["markdown"] = table_markdown(table)
    return table


def _entry(stats: dict, n_seeds: int) -> str:
    if stats["n"] == 0:
        return "—"
    text = f"{stats['mean']:.1f} ± {stats['std']:.1f}"
    return text if stats["n"] == n_seeds else f"{text} ({stats['n']}/{n_seeds})"


def table_markdown(table: dict) -> str:
    """Table 1's layout: methods as rows, tasks then the average as columns."""
    n_seeds = len(table["seeds"])
    header = ["Method", *(TASK_LABELS[t] for t in table["tasks"]), "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in table["variants"]:
        row = table["rows"][variant]
        cells = [_entry(row[t], n_seeds) for t in table["tasks"]] + [_entry(row["avg"], n_seeds)]
        lines.append(f"| {VARIANTS[variant].label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Test score (%) at the learning rate with the best validation score, selected per task, "
        f"method and seed from {{{', '.join(format_lr(lr) for lr in table['lrs'])}}}; mean ± std "
        f"over seeds {', '.join(map(str, table['seeds']))}. Accuracy, except F1 for SQuAD/DROP "
        f"and exact match for GSM8K. Diverged runs are never selected. (k/{n_seeds}): only k "
        f"seeds finished.")
    return "\n".join(lines) + "\n"


def write_table(table: dict, sweep_dir: Path) -> None:
    atomic_write_text(sweep_dir / "table1.md", table["markdown"])
    atomic_write_text(sweep_dir / "table1.json", json.dumps(table, indent=1) + "\n")


# ---- command line -----------------------------------------------------------------------------


def _csv(cast):
    def parse(text: str):
        try:
            return [cast(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {cast.__name__}: "
                                             f"{text!r}") from None
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    parser = argparse.ArgumentParser(
        description="Reproduce Table 1: train and score every (task, method, seed, lr) cell, "
                    "resumably, and print mean ± std over seeds.")
    parser.add_argument("--sweep-dir", type=Path, required=True,
                        help="where cells/, runs/ and table1.{md,json} go; rerun to resume")
    parser.add_argument("--tasks", type=_csv(str), default=list(TASK_LABELS),
                        help=f"comma-separated, default all: {','.join(TASK_LABELS)}")
    parser.add_argument("--variants", type=_csv(str), default=list(DEFAULT_VARIANTS),
                        help=f"comma-separated; default Table 1's rows "
                             f"({','.join(DEFAULT_VARIANTS)}); also Table 4's cascade "
                             f"frequencies: {','.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)}")
    parser.add_argument("--seeds", type=_csv(int), default=list(DEFAULT_SEEDS))
    parser.add_argument("--lrs", type=_csv(float), default=list(DEFAULT_LRS),
                        help="learning-rate grid, selected per cell on validation "
                             "(default 1e-4,3e-4,1e-3)")
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR,
                        help="holds llama2_7b_<task>.yaml (default configs/paper)")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra `tune run` overrides for every cell, e.g. checkpointer paths")
    parser.add_argument("--max-new-tokens", type=int, default=50,
                        help="answer length for SQuAD / DROP / GSM8K (MeZO: 50)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each cell's final merged model (about 13.5 GB for 7B)")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failed cell, go on with the others (it reruns next time)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands of the unfinished cells and the current table")
    args = parser.parse_args(argv)
    sweep = Sweep(sweep_dir=args.sweep_dir, tasks=args.tasks, variants=args.variants,
                  seeds=args.seeds, lrs=args.lrs, config_dir=args.config_dir,
                  overrides=tuple(args.override), max_new_tokens=args.max_new_tokens,
                  eval_batch_size=args.eval_batch_size, keep_checkpoints=args.keep_checkpoints,
                  keep_going=args.keep_going)
    return sweep, args.dry_run


def main(argv: Optional[Sequence[str]] = None) -> int:
    sweep, dry_run = parse_args(argv)
    try:
        table = run_sweep(sweep, dry_run=dry_run)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if table["failed_cells"] else 0


if __name__ == "__main__":
    sys.exit(main())
