"""One cell of the Table 1 sweep: what it is, the ``tune run`` that trains it, and its result.

A cell is one (task, method, seed, learning rate), and for a LoRASC method also one (α, λ).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _merge_yaml_and_cli_args

from lorasc_tune.checkpoint import training_state_path
from lorasc_tune.errors import DIVERGED_EXIT_CODE
from lorasc_tune.io import atomic_write_text

from paper_grids import IN_DOMAIN_LRS, NOISE_LAMBDAS, SEEDS, SLOW_ALPHAS  # noqa: E402
from paper_methods import DEFAULT_VARIANTS, TASK_LABELS, VARIANTS  # noqa: E402
from paper_scoring import primary_metric, score_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# `tune run` imports a custom recipe by module path (lorasc_tune.recipes.lorasc_lora).
RECIPE = "lorasc_tune/recipes/lorasc_lora.py"
DEFAULT_CONFIG_DIR = REPO_ROOT / "configs" / "paper"

# Keys each cell sets itself, and the option that sets them: a user --override of one would
# silently change the grid.
CELL_KEYS = {"seed": "--seeds", "optimizer.lr": "--lrs", "output_dir": "--sweep-dir",
             "resume_from_checkpoint": "nothing: the sweep resumes a crashed cell itself",
             "lorasc.slow_alpha": "--alphas", "lorasc.noise_lambda": "--lambdas"}
# Bumped when the scoring rules change, so old cell results are not mixed with new ones.
SCORER_VERSION = 1


class SweepError(RuntimeError):
    """A bad sweep input, or a cell that could not be finished; the message says which."""


class CellDiverged(SweepError):
    """Training stopped on a non-finite loss: a result of the grid (that rate is too high)."""


def format_value(x: float) -> str:
    """Short, exact-enough text for file names and the table: 0.0001 -> ``0.0001``."""
    return f"{x:g}"


@dataclass(frozen=True)
class Cell:
    """``slow_alpha`` and ``noise_lambda`` are set for a LoRASC method's cells, else None."""

    task: str
    variant: str
    seed: int
    lr: float
    slow_alpha: Optional[float] = None
    noise_lambda: Optional[float] = None

    @property
    def name(self) -> str:
        name = f"{self.task}/{self.variant}/seed{self.seed}_lr{format_value(self.lr)}"
        if self.slow_alpha is not None:
            name += (f"_alpha{format_value(self.slow_alpha)}"
                     f"_lambda{format_value(self.noise_lambda)}")
        return name

    def result_path(self, sweep_dir: Path) -> Path:
        return sweep_dir / "cells" / f"{self.name}.json"

    def run_dir(self, sweep_dir: Path) -> Path:
        return sweep_dir / "runs" / self.name

    def overrides(self) -> List[str]:
        """The cell's own ``tune run`` overrides (seed, learning rate, and α, λ if searched)."""
        out = [f"seed={self.seed}", f"optimizer.lr={self.lr!r}"]
        if self.slow_alpha is not None:
            out += [f"lorasc.slow_alpha={self.slow_alpha!r}",
                    f"lorasc.noise_lambda={self.noise_lambda!r}"]
        return out


@dataclass
class Sweep:
    """Everything that defines the sweep, from the command line."""

    sweep_dir: Path
    tasks: Sequence[str] = tuple(TASK_LABELS)
    variants: Sequence[str] = DEFAULT_VARIANTS
    seeds: Sequence[int] = SEEDS
    lrs: Sequence[float] = IN_DOMAIN_LRS
    alphas: Sequence[float] = SLOW_ALPHAS
    lambdas: Sequence[float] = NOISE_LAMBDAS
    config_dir: Path = DEFAULT_CONFIG_DIR
    overrides: Sequence[str] = ()
    max_new_tokens: int = 50
    eval_batch_size: int = 8
    keep_checkpoints: bool = False
    keep_going: bool = False

    def seed_cells(self, task: str, variant: str, seed: int,
                   alphas: Optional[Sequence[float]] = None,
                   lambdas: Optional[Sequence[float]] = None) -> List[Cell]:
        """The cells one (task, method, seed) selects among: every learning rate, times every
        (α, λ) for a LoRASC method (``alphas`` / ``lambdas`` narrow the sweep's grid)."""
        if not VARIANTS[variant].searches_slow_noise:
            return [Cell(task, variant, seed, lr) for lr in self.lrs]
        alphas = self.alphas if alphas is None else alphas
        lambdas = self.lambdas if lambdas is None else lambdas
        return [Cell(task, variant, seed, lr, a, lam)
                for lr in self.lrs for a in alphas for lam in lambdas]

    def cells(self) -> List[Cell]:
        return [c for t in self.tasks for v in self.variants for s in self.seeds
                for c in self.seed_cells(t, v, s)]

    def config_path(self, task: str) -> Path:
        return Path(self.config_dir).resolve() / f"llama2_7b_{task}.yaml"

    def train_overrides(self, cell: Cell) -> List[str]:
        """User overrides, then the method's, then the cell's own keys (never overlapping)."""
        run_dir = cell.run_dir(Path(self.sweep_dir).resolve())
        return [*self.overrides, *VARIANTS[cell.variant].overrides, *cell.overrides(),
                f"output_dir={run_dir}"]


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


def log_tail(log: Path, lines: int = 25) -> str:
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
    resume = training_state_path(run_dir) is not None
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
    # The recipe exits with DIVERGED_EXIT_CODE when the loss or a gradient norm became NaN/Inf:
    # the learning rate diverged, which is an outcome for the grid to record, not a crash to
    # retry. Any other failure reruns next time.
    error = CellDiverged if proc.returncode == DIVERGED_EXIT_CODE else SweepError
    raise error(f"training failed for {cell.name} (exit code {proc.returncode}); "
                f"log: {log}\n{log_tail(log)}")


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

    A diverged run (exit code ``DIVERGED_EXIT_CODE``) is recorded with ``"diverged": true`` and
    no scores, so the selection passes over it and a rerun does not repeat it.
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
        "slow_alpha": cell.slow_alpha, "noise_lambda": cell.noise_lambda,
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
