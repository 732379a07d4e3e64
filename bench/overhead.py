"""Training overhead of LoRASC against torchtune's stock single-device LoRA recipe.

    python bench/overhead.py --pairs 3 --max-steps-per-epoch 10 --out bench/results/overhead.json
    python bench/overhead.py --smoke                                      # seconds, for CI

Both recipes are launched with ``tune run`` on the *same* YAML (the stock recipe ignores the
``lorasc:`` block), alternating stock/LoRASC so that machine drift hits both alike. Reported:
median over pairs of the ratios LoRASC/stock for wall time (the whole ``tune run`` process),
training tokens/s (the recipes' own ``tokens_per_second_per_gpu`` metric, first step of each
epoch excluded) and peak RSS (``/usr/bin/time -f %M``).

The model is Llama-2-shaped with random weights (no download): vocab 32000, dim 512, 4 layers,
8 heads, MLP 1376 — about 45M parameters — LoRA rank 8 on q and v, fp32 on CPU, batch 4,
sequences cut at 256 tokens of the real Alpaca sample, 4 epochs = 4 experts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lorasc_tune._paths import shared_data_dir  # noqa: E402
from lorasc_tune.demo import write_tiny_llama2_hf_checkpoint  # noqa: E402

MODEL_45M = dict(vocab_size=32000, num_layers=4, num_heads=8, num_kv_heads=8, embed_dim=512,
                 intermediate_dim=1376, max_seq_len=512, norm_eps=1e-5)
MODEL_SMOKE = dict(MODEL_45M, num_layers=1, embed_dim=64, num_heads=4, num_kv_heads=4,
                   intermediate_dim=128)
STOCK = "lora_finetune_single_device"
LORASC = "lorasc_tune/recipes/lorasc_lora.py"


def bench_config(workdir: Path, model_args: dict, epochs: int, max_steps: int | None):
    data = shared_data_dir()
    tokenizer, alpaca = data / "llama2_tokenizer" / "tokenizer.model", data / "alpaca" / "alpaca_tiny_100.json"
    for f in (tokenizer, alpaca):
        if not f.is_file():
            raise FileNotFoundError(f"benchmark input missing: {f} (set LORASC_SHARED_DATA)")
    ckpt = write_tiny_llama2_hf_checkpoint(workdir / "base_45m", model_args)
    return OmegaConf.create({
        "output_dir": str(workdir / "out"),
        "model": {"_component_": "torchtune.models.llama2.lora_llama2",
                  "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
                  "apply_lora_to_output": False, "lora_rank": 8, "lora_alpha": 16,
                  "lora_dropout": 0.0, **model_args},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": str(tokenizer), "max_seq_len": 256},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(ckpt),
                         "checkpoint_files": ["model-00001-of-00001.safetensors"],
                         "model_type": "LLAMA2", "output_dir": "${output_dir}"},
        "resume_from_checkpoint": False, "save_adapter_weights_only": False,
        "dataset": {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
                    "data_files": str(alpaca), "split": "train", "packed": False},
        "seed": 0, "shuffle": True, "batch_size": 4,
        "lorasc": {"cascade": True, "steps_per_expert": None, "slow_alpha": 0.5,
                   "noise_lambda": 1.0, "lr_ratio_B": 1.0},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "lorasc_tune.plan.get_linear_schedule_with_warmup",
                         "num_warmup_steps": 4},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "epochs": epochs, "max_steps_per_epoch": max_steps, "gradient_accumulation_steps": 1,
        "clip_grad_norm": None, "compile": False, "device": "cpu", "dtype": "fp32",
        "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": "${output_dir}/logs"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
    })


def run_once(recipe: str, cfg_path: Path, out_dir: Path) -> dict:
    tune = Path(sys.executable).parent / "tune"
    rss_file = out_dir.parent / f"rss_{out_dir.name}.txt"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), str(tune), "run", recipe,
           "--config", str(cfg_path), f"output_dir={out_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} failed:\n{proc.stderr[-3000:]}")
    tps = []
    for log in (out_dir / "logs").glob("log_*.txt"):
        for line in log.read_text().splitlines():
            m = re.search(r"Step (\d+) \|.*tokens_per_second_per_gpu:([0-9.e+-]+)", line)
            if m:
                tps.append((int(m.group(1)), float(m.group(2))))
    return {"wall_s": wall, "peak_rss_mb": int(rss_file.read_text().split()[-1]) / 1024,
            "tokens_per_s": [v for _, v in sorted(tps)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None,
                        help="cap each epoch (the Alpaca sample gives 25 steps of batch 4)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 epochs x 2 steps, 1 pair")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, epochs, max_steps, pairs = MODEL_45M, args.epochs, args.max_steps_per_epoch, args.pairs
    if args.smoke:
        model, epochs, max_steps, pairs = MODEL_SMOKE, 2, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg_path = work / "bench.yaml"
        OmegaConf.save(bench_config(work, model, epochs, max_steps), cfg_path)
        results = {"stock": [], "lorasc": []}
        for i in range(pairs):
            for name, recipe in (("stock", STOCK), ("lorasc", LORASC)):
                r = run_once(recipe, cfg_path, work / f"{name}_{i}")
                results[name].append(r)
                print(f"pair {i} {name:6s} wall {r['wall_s']:.1f}s rss {r['peak_rss_mb']:.0f} MB "
                      f"tok/s {statistics.median(r['tokens_per_s'] or [0]):.0f}", flush=True)
    steps_per_epoch = len(results["stock"][0]["tokens_per_s"]) // epochs

    def steady_tps(r):  # drop each epoch's first step (data loading, expert boundary)
        v = r["tokens_per_s"]
        return statistics.median([x for i, x in enumerate(v) if i % steps_per_epoch] or v)

    ratio = lambda key: statistics.median(
        key(l) / key(s) for s, l in zip(results["stock"], results["lorasc"]))
    summary = {
        "pairs": pairs, "epochs": epochs, "model": model,
        "wall_ratio": ratio(lambda r: r["wall_s"]),
        "tokens_per_s_ratio": ratio(steady_tps),
        "peak_rss_ratio": ratio(lambda r: r["peak_rss_mb"]),
        "stock_wall_s_median": statistics.median(r["wall_s"] for r in results["stock"]),
        "lorasc_wall_s_median": statistics.median(r["wall_s"] for r in results["lorasc"]),
        "stock_peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in results["stock"]),
        "lorasc_peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in results["lorasc"]),
        "runs": results,
    }
    report(summary, args.out)


def report(summary: dict, out: Path | None) -> None:
    """Print the summary without the per-run records; write all of it to ``out`` if given."""
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
