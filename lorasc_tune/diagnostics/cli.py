"""``python -m lorasc_tune.diagnostics``: the command line over :mod:`.report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from lorasc_tune.diagnostics.errors import DiagnosticsError
from lorasc_tune.diagnostics.report import collect, write_diagnostics
from lorasc_tune.diagnostics.run_folder import CONFIG_FILE


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lorasc_tune.diagnostics",
        description="Plot a LoRASC run: loss and LR across experts, the spectrum of W_T - W_0, "
                    "the noise width per expert; the same numbers as diagnostics.json.")
    p.add_argument("output_dir", help="the run's output_dir (holds logs/, epoch_N/, "
                                      f"{CONFIG_FILE})")
    p.add_argument("--out", help="where to write (default: OUTPUT_DIR/diagnostics)")
    p.add_argument("--matrices", help="comma-separated modules for the spectrum, e.g. "
                                      "q_proj,v_proj (default: the adapted ones)")
    p.add_argument("--layers", help="comma-separated layer indices, or 'all' (default: all for "
                                    "<= 4 layers, else first, middle, last)")
    p.add_argument("--base", help="base checkpoint folder for W_0 (default: the config's "
                                  "checkpointer)")
    p.add_argument("--top-k", type=int, default=64, help="singular values kept per matrix")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="numerical rank counts σ_i > rtol·σ_1 (default 1e-4)")
    p.add_argument("--log-dir", help="metric log folder (default: the config's "
                                     "metric_logger.log_dir, else OUTPUT_DIR/logs)")
    p.add_argument("--no-spectrum", action="store_true",
                   help="plot the logs only (no checkpoints needed)")
    args = p.parse_args(argv)
    layers: Optional[List[int] | str] = args.layers
    if args.layers and args.layers != "all":
        try:
            layers = [int(x) for x in _csv(args.layers) or []]
        except ValueError:
            p.error(f"--layers: expected integers or 'all', got {args.layers!r}")
    try:
        data = collect(args.output_dir, matrices=_csv(args.matrices), layers=layers,
                       base=args.base, top_k=args.top_k, rtol=args.rtol, log_dir=args.log_dir,
                       with_spectrum=not args.no_spectrum)
        written = write_diagnostics(data, args.out or Path(args.output_dir) / "diagnostics")
    except DiagnosticsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    return 0
