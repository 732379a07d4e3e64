"""Choosing, per (task, method, seed), the configuration with the best validation score.

The rows without LoRASC choose among the learning rates; a LoRASC row chooses among every
(learning rate, α, λ) of the sweep's grid (§4.1 of the paper), and a second row for the same
method reports the fixed α and λ the configs ship with, chosen among the learning rates only
from the same runs. The size of each row's search is kept with it, so the table can say how
many more configurations a LoRASC score was picked from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from paper_cells import Cell, Sweep, format_value  # noqa: E402
from paper_grids import FIXED_NOISE_LAMBDA, FIXED_SLOW_ALPHA  # noqa: E402
from paper_methods import VARIANTS  # noqa: E402


@dataclass(frozen=True)
class TableRow:
    """One row of the table: a method, and for a LoRASC method the (α, λ) it chooses among
    (``None`` for a method without LoRASC)."""

    name: str
    label: str
    variant: str
    alphas: Optional[Tuple[float, ...]] = None
    lambdas: Optional[Tuple[float, ...]] = None

    def seed_cells(self, sweep: Sweep, task: str, seed: int) -> List[Cell]:
        return sweep.seed_cells(task, self.variant, seed, self.alphas, self.lambdas)

    def configs_per_seed(self, sweep: Sweep) -> int:
        """How many configurations one (task, seed) entry of this row is chosen among."""
        grid = len(self.alphas) * len(self.lambdas) if self.alphas is not None else 1
        return len(sweep.lrs) * grid


def grid_point_label(alpha: float, lam: float) -> str:
    return f"α {format_value(alpha)}, λ {format_value(lam)}"


def table_rows(sweep: Sweep) -> List[TableRow]:
    """The table's rows, in the order of ``sweep.variants``.

    A LoRASC method whose grid has one (α, λ) gets one row, labelled with that point. With a
    larger grid it gets the searched row and, when the grid holds the fixed point
    (``FIXED_SLOW_ALPHA``, ``FIXED_NOISE_LAMBDA``), a row at that point named ``<method>_fixed``.
    """
    rows = []
    for name in sweep.variants:
        variant = VARIANTS[name]
        if not variant.searches_slow_noise:
            rows.append(TableRow(name, variant.label, name))
            continue
        alphas, lambdas = tuple(sweep.alphas), tuple(sweep.lambdas)
        if len(alphas) * len(lambdas) == 1:
            point = grid_point_label(alphas[0], lambdas[0])
            rows.append(TableRow(name, f"{variant.label} ({point})", name, alphas, lambdas))
            continue
        rows.append(TableRow(name, variant.label, name, alphas, lambdas))
        if FIXED_SLOW_ALPHA in alphas and FIXED_NOISE_LAMBDA in lambdas:
            rows.append(TableRow(
                f"{name}_fixed",
                f"{variant.label} ({grid_point_label(FIXED_SLOW_ALPHA, FIXED_NOISE_LAMBDA)})",
                name, (FIXED_SLOW_ALPHA,), (FIXED_NOISE_LAMBDA,)))
    return rows


def select_best(results: Iterable[dict]) -> Optional[dict]:
    """The result whose validation score is best. A tie goes to the smaller learning rate, then
    the smaller α, then the smaller λ. Diverged runs are passed over; ``None`` when every run
    diverged."""
    scored = [r for r in results if not r.get("diverged")]
    if not scored:
        return None
    return min(scored, key=lambda r: (-r["validation"][r["metric"]], r["lr"],
                                      r.get("slow_alpha") or 0.0, r.get("noise_lambda") or 0.0))


def selections(results: Dict[Cell, dict], sweep: Sweep, task: str, row: TableRow
               ) -> Dict[int, dict]:
    """``{seed: the validation-selected result}`` for one (task, row).

    A seed counts only once every configuration the row chooses among has a result, so a
    partly finished sweep never reports a selection made over fewer of them; a seed whose
    every run diverged has no selection either.
    """
    chosen = {}
    for seed in sweep.seeds:
        cells = row.seed_cells(sweep, task, seed)
        if not all(c in results for c in cells):
            continue
        best = select_best(results[c] for c in cells)
        if best is not None:
            chosen[seed] = best
    return chosen
