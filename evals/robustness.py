"""Top-1 of a fine-tuned CLIP classifier on ImageNet and its robustness benchmarks.

    python -m evals.robustness --checkpoint OUTPUT_DIR/merged \\
        --set imagenet_val=/data/imagenet/val --set imagenet_v2=/data/imagenetv2-matched-frequency \\
        --set imagenet_c=/data/imagenet-c --set imagenet_r=/data/imagenet-r \\
        --set imagenet_a=/data/imagenet-a --set imagenet_sketch=/data/imagenet-sketch \\
        --set stylized_imagenet=/data/stylized-imagenet --json robustness.json

Prints a markdown table (ImageNet-C as its mean over corruptions x severities, then one row per
corruption) and writes the same numbers as JSON. Set kinds and folder layouts are described in
:mod:`lorasc_tune.vision.robustness`; IN-R and IN-A are scored over their 200-class subsets using
the wnid lists in ``--imagenet-index`` (default ``../shared/data/imagenet_index``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, List, Optional

import torch


def _parse_sets(items: List[str]) -> Dict[str, str]:
    from lorasc_tune.vision.robustness import SET_KINDS

    sets: Dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--set expects NAME=PATH, got {item!r}")
        if name.split(":", 1)[0] not in SET_KINDS:
            raise SystemExit(f"--set {name}: unknown set; kinds are {', '.join(SET_KINDS)} "
                             f"(use kind:label to evaluate two folders of one kind)")
        if name in sets:
            raise SystemExit(f"--set {name} given twice")
        sets[name] = path
    return sets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="folder written by the vision recipe (holds vision_meta.json)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=PATH",
                   help="an evaluation set; repeat for several")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--imagenet-index", help="folder with imagenet_class_index.json and the "
                   "IN-R/IN-A wnid lists")
    p.add_argument("--limit", type=int, help="at most this many images per set (per IN-C "
                   "cell), evenly spaced; for quick checks only")
    p.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sets = _parse_sets(args.sets)
    if not sets:
        raise SystemExit("give at least one --set NAME=PATH")

    from lorasc_tune.vision.data import eval_transform
    from lorasc_tune.vision.export import load_classifier
    from lorasc_tune.vision.robustness import evaluate_sets, format_table, write_json

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    model, meta = load_classifier(args.checkpoint, device=device, dtype=dtype)
    results = evaluate_sets(
        model, sets, meta["class_ids"], eval_transform(meta["arch"]["image_size"]), device,
        batch_size=args.batch_size, num_workers=args.num_workers,
        index_dir=args.imagenet_index, limit=args.limit, on_bad_file=args.on_bad_file)
    print(format_table(results))
    if args.json:
        write_json(results, args.json, extra={"checkpoint": str(args.checkpoint),
                                              "limit": args.limit})
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
