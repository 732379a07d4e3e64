"""Reproduce the paper's Table 1: a resumable sweep over tasks x methods x seeds x configurations.

    python recipes/paper_table1.py --sweep-dir runs/table1                      # the whole table
    python recipes/paper_table1.py --sweep-dir runs/table1 --tasks sst2,rte \\
        --variants lora,lorasc_lora --seeds 0 --lrs 1e-4 --dry-run             # show the plan

A *cell* is one (task, method, seed, learning rate), and for a LoRASC method also one (α, λ):
the paper chooses those on validation too (§4.1). For each cell the script

1. trains with ``tune run lorasc_tune/recipes/lorasc_lora.py --config
   configs/paper/llama2_7b_<task>.yaml <method overrides> seed=<k> optimizer.lr=<lr>
   [lorasc.slow_alpha=<α> lorasc.noise_lambda=<λ>] output_dir=<sweep_dir>/runs/...`` (the exact
   command is printed and logged to ``train.log``);
2. scores the final merged model ``epoch_{epochs-1}`` on the validation and the test split
   (``recipes/paper_scoring.py``: MeZO's rules, in-process);
3. writes ``<sweep_dir>/cells/<task>/<method>/seed<k>_lr<lr>[_alpha<α>_lambda<λ>].json``
   atomically and deletes the cell's checkpoints (``--keep-checkpoints`` keeps them).

A rerun skips every cell whose JSON exists. A cell that crashed has no JSON and runs again,
resuming its training from the last saved epoch and skipping training when the final model
was already written. A cell whose training exits with ``lorasc_tune.errors.DIVERGED_EXIT_CODE``
is recorded as diverged. A JSON written under a different config (another ``--override``, an
edited YAML) is refused rather than mixed into the table.

The table: for each (task, method, seed) the configuration with the best **validation** score
is selected and its **test** score is reported; entries are mean ± std over seeds. Each row
says how many configurations its entries were chosen among, and a LoRASC method is also
reported at the configs' fixed α 0.5, λ 1. The table is printed and written to
``<sweep_dir>/table1.md`` and ``table1.json``.

The code is split along those steps: ``paper_grids`` (the paper's grids), ``paper_methods``
(the rows), ``paper_cells`` (one cell), ``paper_checks`` (validation before any training),
``paper_selection`` and ``paper_tables``; this file runs the sweep and parses the command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

# This folder is on sys.path when the script runs (and the tests put it there): it has no
# __init__.py on purpose, because torchtune installs a top-level package named `recipes`.
from paper_cells import (DEFAULT_CONFIG_DIR, Sweep, SweepError, finished_result,  # noqa: E402
                         fingerprint, load_train_config, run_cell, train_command)
from paper_checks import check_sweep  # noqa: E402
from paper_grids import IN_DOMAIN_LRS, NOISE_LAMBDAS, SEEDS, SLOW_ALPHAS, lr_text  # noqa: E402
from paper_methods import DEFAULT_VARIANTS, TASK_LABELS, VARIANTS  # noqa: E402
from paper_scoring import score_checkpoint  # noqa: E402
from paper_tables import build_table, describe, load_results, write_table  # noqa: E402


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


def _csv(cast):
    def parse(text: str):
        try:
            return [cast(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {cast.__name__}: "
                                             f"{text!r}") from None
    return parse


def _listed(values, fmt=lambda v: f"{v:g}") -> str:
    return ",".join(fmt(v) for v in values)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    parser = argparse.ArgumentParser(
        description="Reproduce Table 1: train and score every (task, method, seed, lr[, α, λ]) "
                    "cell, resumably, and print mean ± std over seeds.")
    parser.add_argument("--sweep-dir", type=Path, required=True,
                        help="where cells/, runs/ and table1.{md,json} go; rerun to resume")
    parser.add_argument("--tasks", type=_csv(str), default=list(TASK_LABELS),
                        help=f"comma-separated, default all: {','.join(TASK_LABELS)}")
    parser.add_argument("--variants", type=_csv(str), default=list(DEFAULT_VARIANTS),
                        help=f"comma-separated; default Table 1's rows "
                             f"({','.join(DEFAULT_VARIANTS)}); also Table 4's cascade "
                             f"frequencies: {','.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)}")
    parser.add_argument("--seeds", type=_csv(int), default=list(SEEDS))
    parser.add_argument("--lrs", type=_csv(float), default=list(IN_DOMAIN_LRS),
                        help=f"learning-rate grid, selected per cell on validation (default the "
                             f"paper's, §4.2.1: {_listed(IN_DOMAIN_LRS, lr_text)})")
    parser.add_argument("--alphas", type=_csv(float), default=list(SLOW_ALPHAS),
                        help=f"slow-expert α grid of the LoRASC methods, selected on validation "
                             f"with the learning rate (default the paper's, §4.1: "
                             f"{_listed(SLOW_ALPHAS)})")
    parser.add_argument("--lambdas", type=_csv(float), default=list(NOISE_LAMBDAS),
                        help=f"noise λ grid of the LoRASC methods, likewise (default the "
                             f"paper's, §4.1: {_listed(NOISE_LAMBDAS)})")
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
                  seeds=args.seeds, lrs=args.lrs, alphas=args.alphas, lambdas=args.lambdas,
                  config_dir=args.config_dir, overrides=tuple(args.override),
                  max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
                  keep_checkpoints=args.keep_checkpoints, keep_going=args.keep_going)
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
