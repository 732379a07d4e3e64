"""Where LoRASC's extra time would go: CPU seconds outside the model's own compute, against
torchtune's stock single-device LoRA recipe, on the same YAML and the same steps.

    python bench/overhead_profile.py --pairs 3 --out bench/results/overhead_profile.json
    python bench/overhead_profile.py --smoke

Why this exists: bench/overhead.py's wall-time ratio cannot be resolved to 2% on a shared
2-core machine (pair-to-pair spread of ±10% and more, BENCHMARKS §1). But the two recipes run
the same model on the same batches, so any overhead LoRASC adds lives *outside* the model's
forward, loss, backward and optimizer step: in set-up, the expert boundaries, the epoch saves,
logging and loop glue. This script measures exactly that part, in CPU seconds (``time.
process_time`` under cProfile, one thread, so another process on the machine changes it little).

Each recipe runs under ``tune run`` in a child process; the child profiles the whole command
and reports:

* ``total``: CPU seconds of the whole run, imports included;
* ``model``: the decoder's forward (``TransformerDecoder.forward``), the loss, ``Tensor.
  backward`` and the optimizer's ``step`` — the same work in both recipes;
* ``outside_model``: ``total - model``;
* ``recipe_outside_model``: the same without the imports (``recipe_main`` minus ``model``):
  what the recipe itself adds to the model's work, the number this script is for;
* the recipe's phases: ``setup`` and ``save`` (the epoch-end ``save_checkpoint``).

The model and data are bench/overhead.py's (45M Llama-2-shaped, random weights, Alpaca rows, 4
experts of ``--max-steps-per-epoch`` steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

RECIPES = {"stock": "lora_finetune_single_device", "lorasc": "lorasc_tune/recipes/lorasc_lora.py"}


def child(recipe: str, cfg_path: str, out_dir: str, report: str) -> None:
    """Run ``tune run recipe`` in this process under a CPU-time profiler; write the phases."""
    import cProfile
    import pstats
    import time

    sys.argv = ["tune", "run", recipe, "--config", cfg_path, f"output_dir={out_dir}"]
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    from torchtune._cli.tune import main

    try:
        main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}

    def cum(file_part: str, name: str) -> float:
        return sum(v[3] for (f, _, n), v in stats.items() if n == name and file_part in f)

    total = sum(v[2] for v in stats.values())
    # The outermost decoder forward (the layers' own forwards are inside it).
    decoder = max((v[3] for (f, _, n), v in stats.items()
                   if n == "forward" and f.endswith("torchtune/modules/transformer.py")), default=0.0)
    loss = cum("torchtune/modules/loss", "forward")
    backward = cum("torch/_tensor.py", "backward")
    optim = sum(v[3] for (f, _, n), v in stats.items()
                if n == "step" and "torch/optim/adam" in f)
    model = decoder + loss + backward + optim
    phase = {n: sum(v[3] for (f, _, name), v in stats.items() if name == n and "recipes" in f)
             for n in ("recipe_main", "setup", "save_checkpoint")}
    Path(report).write_text(json.dumps({
        "total": total, "model": model, "outside_model": total - model,
        "recipe": phase["recipe_main"], "recipe_outside_model": phase["recipe_main"] - model,
        "decoder_forward": decoder, "loss": loss, "backward": backward, "optimizer_step": optim,
        "setup": phase["setup"], "save": phase["save_checkpoint"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--max-steps-per-epoch", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs x 2 steps, 1 pair")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=4, metavar=("RECIPE", "CONFIG", "OUT_DIR", "REPORT"),
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    from omegaconf import OmegaConf
    from overhead import MODEL_45M, MODEL_SMOKE, bench_config, report

    model, epochs, steps, pairs = MODEL_45M, 4, a.max_steps_per_epoch, a.pairs
    if a.smoke:
        model, epochs, steps, pairs = MODEL_SMOKE, 2, 2, 1
    runs = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg_path = work / "bench.yaml"
        OmegaConf.save(bench_config(work, model, epochs, steps), cfg_path)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        for i in range(pairs):
            for name, recipe in RECIPES.items():  # alternated, so drift hits both alike
                record = work / f"{name}_{i}.json"
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", recipe, str(cfg_path),
                     str(work / f"{name}_{i}"), str(record)],
                    cwd=REPO, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
                runs[name].append(json.loads(record.read_text()))
                r = runs[name][-1]
                print(f"pair {i} {name:6s} total {r['total']:.1f}s CPU, model {r['model']:.1f}s, "
                      f"recipe outside the model {r['recipe_outside_model']:.2f}s (setup "
                      f"{r['setup']:.2f}, saves {r['save']:.2f})", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {
        "pairs": pairs, "epochs": epochs, "steps_per_epoch": steps, "model": model,
        "threads": 1, "unit": "CPU seconds (process_time), median over pairs",
        **{f"{name}_{key}": med(name, key) for name in RECIPES
           for key in ("total", "model", "outside_model", "recipe_outside_model", "setup",
                       "save")},
        "total_ratio": statistics.median(l["total"] / s["total"]
                                         for s, l in zip(runs["stock"], runs["lorasc"])),
        "recipe_outside_model_difference_s": statistics.median(
            l["recipe_outside_model"] - s["recipe_outside_model"]
            for s, l in zip(runs["stock"], runs["lorasc"])),
        "runs": runs,
    }
    # LoRASC's added work as a share of the stock run: the overhead the wall ratio tries to see.
    summary["added_share_of_stock_total"] = (
        summary["recipe_outside_model_difference_s"] / summary["stock_total"])
    report(summary, a.out)


if __name__ == "__main__":
    main()
