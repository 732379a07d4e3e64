"""Everything the demo run needs, built locally so that it runs with no download.

    python -m lorasc_tune.demo            # = tune run ... --config configs/demo_tiny.yaml, scored

The demo config (``configs/demo_tiny.yaml``) names these factories as ordinary torchtune
components. Each one creates its files under a cache folder on first use and reuses them
afterwards:

* :func:`demo_task_dataset`: the demo's task, "Say the word before the last: <3 to 6 words>."
  (answer: the second-to-last word), 1024 rows from a fixed seed, through torchtune's stock
  ``instruct_dataset``; :func:`demo_heldout_rows` are 50 more, none of whose word lists is in
  the training rows.
* :func:`demo_tokenizer`: a SentencePiece BPE model trained on a small instruction set
  (:func:`write_demo_data`), with Llama-2's special ids (unk 0, bos 1, eos 2), wrapped in
  torchtune's ``Llama2Tokenizer``.
* :func:`demo_checkpointer`: a tiny Llama-2-shaped model written as a Hugging Face checkpoint
  (``config.json`` + safetensors), opened with torchtune's stock ``FullModelHFCheckpointer``,
  so the demo exercises the same loading and saving path a real Llama-2-7B run does. With
  ``pretrain_steps: N`` (the demo config) the random model is first trained in full for N steps
  to answer "Say the last word: ..." (:func:`write_demo_base_checkpoint`): a base that knows
  the prompt format and how to answer with a word of the list, but not the demo's task, so
  it scores 0 on it. LoRA then has something to adapt: rank-8 q/v LoRA on the random model
  learns next to nothing in the demo's few hundred steps.

:func:`score_heldout` is the held-out exact match (greedy decoding) the demo prints before
and after training; :func:`main` is ``python -m lorasc_tune.demo``.
:func:`write_tiny_llama2_hf_checkpoint` is public because tests and benchmarks use it too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from lorasc_tune.io import atomic_write_bytes, atomic_write_text

# A Llama-2 shape, scaled down: ~1.2M parameters with the demo vocabulary.
DEMO_MODEL_ARGS: Dict[str, Any] = dict(
    vocab_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    embed_dim=128,
    intermediate_dim=344,
    max_seq_len=256,
    norm_eps=1e-5,
)

_WORDS = (
    "apple river stone cloud green quick seven table light music paper north "
    "tiger orange silver window garden bread ocean pencil summer winter yellow"
).split()


def _demo_examples(n: int, seed: int) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            words = rng.sample(_WORDS, rng.randint(3, 5))
            rows.append(
                dict(instruction="Reverse the order of the words.",
                     input=" ".join(words), output=" ".join(reversed(words)))
            )
        elif kind == 1:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            rows.append(dict(instruction="Add the two numbers.",
                             input=f"{a} and {b}", output=str(a + b)))
        elif kind == 2:
            words = rng.sample(_WORDS, rng.randint(2, 6))
            rows.append(dict(instruction="How many words are there?",
                             input=" ".join(words), output=str(len(words))))
        else:
            words = rng.sample(_WORDS, rng.randint(3, 5))
            rows.append(dict(instruction="Sort the words alphabetically.",
                             input=" ".join(words), output=" ".join(sorted(words))))
    return rows


def _cache_dir(cache_dir: Optional[str]) -> Path:
    path = Path(cache_dir or os.environ.get("LORASC_DEMO_CACHE", "/tmp/lorasc_demo_assets"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_demo_data(cache_dir: Optional[str] = None, num_examples: int = 512, seed: int = 0) -> Path:
    """Write the demo instruction set as Alpaca-style JSON; returns its path."""
    path = _cache_dir(cache_dir) / f"demo_instruct_{num_examples}_{seed}.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(_demo_examples(num_examples, seed), indent=1))
    return path


def write_demo_tokenizer(cache_dir: Optional[str] = None, vocab_size: int = 512) -> Path:
    """Train (once) a SentencePiece BPE model on the demo data; returns the ``.model`` path."""
    import sentencepiece as spm

    path = _cache_dir(cache_dir) / f"demo_spm_{vocab_size}.model"
    if path.exists():
        return path
    rows = json.loads(write_demo_data(cache_dir).read_text())
    lines = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    # Alpaca's prompt scaffolding is part of every training sequence, so the tokenizer sees it.
    lines += ["Below is an instruction that describes a task, paired with an input that "
              "provides further context. Write a response that appropriately completes "
              "the request. ### Instruction: ### Input: ### Response:"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    atomic_write_bytes(path, model.getvalue())
    return path


def hf_llama_config(model_args: Dict[str, Any]) -> Dict[str, Any]:
    """The ``config.json`` a Hugging Face ``LlamaForCausalLM`` needs for these torchtune args."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model_args["embed_dim"],
        "intermediate_size": model_args["intermediate_dim"],
        "num_attention_heads": model_args["num_heads"],
        "num_key_value_heads": model_args["num_kv_heads"],
        "num_hidden_layers": model_args["num_layers"],
        "vocab_size": model_args["vocab_size"],
        "max_position_embeddings": model_args["max_seq_len"],
        "rms_norm_eps": model_args.get("norm_eps", 1e-5),
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_tiny_llama2_hf_checkpoint(
    checkpoint_dir: str | Path,
    model_args: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random Llama-2-shaped model and write it as an HF checkpoint folder.

    Writes ``config.json``, ``model-00001-of-00001.safetensors`` and the safetensors index,
    the layout ``tune download meta-llama/Llama-2-7b-hf`` produces. Existing folders are reused.
    """
    args = dict(DEMO_MODEL_ARGS if model_args is None else model_args)
    out = Path(checkpoint_dir)
    weights = out / "model-00001-of-00001.safetensors"
    if weights.exists() and (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = _random_tiny_llama2(args, seed)
    _write_hf_checkpoint(out, model.state_dict(), args, dtype)
    return out


def _random_tiny_llama2(args: Dict[str, Any], seed: int) -> torch.nn.Module:
    """torchtune's ``llama2(**args)`` with every matrix drawn from N(0, 0.02²), from ``seed``
    (the global RNG is left as it was)."""
    from torchtune.models.llama2 import llama2

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = llama2(**args)
        # torchtune initialises norms to one and linears uniformly; give the output layer and
        # embeddings Llama-like scale so the logits are not degenerate.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def _write_hf_checkpoint(out: Path, tune_state: Dict[str, torch.Tensor], args: Dict[str, Any],
                         dtype: torch.dtype = torch.float32) -> None:
    """``tune_state`` (torchtune keys) as an HF folder: safetensors, its index, ``config.json``."""
    from safetensors.torch import save_file
    from torchtune.models import convert_weights

    weights = out / "model-00001-of-00001.safetensors"
    hf_state = convert_weights.tune_to_hf(
        {k: v.to(dtype).contiguous() for k, v in tune_state.items()},
        num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"],
    )
    tmp = weights.with_suffix(f".safetensors.{os.getpid()}.tmp")
    save_file(hf_state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in hf_state.values())},
        "weight_map": {k: weights.name for k in hf_state},
    }
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=1))
    cfg = hf_llama_config(args)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=1))


# ---- torchtune components named by configs/demo_tiny.yaml -------------------------------


def demo_tokenizer(cache_dir: Optional[str] = None, max_seq_len: Optional[int] = 256):
    """torchtune ``Llama2Tokenizer`` over the demo SentencePiece model (no chat template)."""
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(write_demo_tokenizer(cache_dir)), max_seq_len=max_seq_len,
                            prompt_template=None)


def demo_instruct_dataset(tokenizer, cache_dir: Optional[str] = None, num_examples: int = 512,
                          train_on_input: bool = False, packed: bool = False):
    """The demo instruction set through torchtune's own ``alpaca_dataset`` (local JSON)."""
    from torchtune.datasets import alpaca_dataset

    path = write_demo_data(cache_dir, num_examples=num_examples)
    return alpaca_dataset(tokenizer, source="json", data_files=str(path), split="train",
                          train_on_input=train_on_input, packed=packed)


def write_hf_tokenizer_files(folder: Path, spm_model: Path, max_seq_len: int = 256) -> None:
    """The tokenizer and generation files of a Hugging Face Llama folder, for a SentencePiece
    model: ``AutoTokenizer`` then gives the ids torchtune's ``llama2_tokenizer`` does (BOS
    first), and greedy generation stops at EOS. Existing files are kept."""
    folder = Path(folder)
    if not (folder / "tokenizer.model").exists():
        atomic_write_bytes(folder / "tokenizer.model", Path(spm_model).read_bytes())
    files = {
        "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                  "add_eos_token": False, "bos_token": "<s>",
                                  "eos_token": "</s>", "unk_token": "<unk>",
                                  "model_max_length": max_seq_len},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>",
                                    "unk_token": "<unk>"},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False,
                                   "max_length": max_seq_len},
    }
    for name, content in files.items():
        if not (folder / name).exists():
            atomic_write_text(folder / name, json.dumps(content, indent=1))


def demo_checkpointer(output_dir: str, cache_dir: Optional[str] = None, pretrain_steps: int = 0,
                      **kwargs):
    """torchtune's stock ``FullModelHFCheckpointer`` over a tiny Llama-2 written on first use
    (random, or with ``pretrain_steps`` > 0 the pre-trained demo base of
    :func:`write_demo_base_checkpoint`), whose folder also holds the demo tokenizer in Hugging
    Face's layout: torchtune copies those files into every exported epoch, which transformers
    and ``lm_eval --model hf`` then load as is."""
    from torchtune.training import FullModelHFCheckpointer

    ckpt_dir = demo_base_dir(cache_dir, pretrain_steps)
    return FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA2",
        output_dir=output_dir,
        **kwargs,
    )


def demo_base_dir(cache_dir: Optional[str] = None, pretrain_steps: int = 0) -> Path:
    """The base checkpoint folder :func:`demo_checkpointer` opens, built if missing."""
    if pretrain_steps:
        ckpt_dir = write_demo_base_checkpoint(cache_dir, pretrain_steps)
    else:
        ckpt_dir = write_tiny_llama2_hf_checkpoint(_cache_dir(cache_dir) / "tiny_llama2_hf")
    write_hf_tokenizer_files(ckpt_dir, write_demo_tokenizer(cache_dir))
    return ckpt_dir


# ---- the demo's task ---------------------------------------------------------------------

#: What the demo fine-tunes: answer with the second-to-last word of the list.
DEMO_TASK = "Say the word before the last"
#: What the demo's base model is pre-trained on: answer with the last word of the list.
BASE_TASK = "Say the last word"
_ANSWERS = {DEMO_TASK: lambda words: words[-2], BASE_TASK: lambda words: words[-1]}
# Held-out word lists are drawn first, from their own seed, and no training or pre-training
# row uses one of them (whatever the number of training rows).
_HELDOUT_POOL, _HELDOUT_SEED, _TRAIN_SEED, _BASE_SEED = 200, 1, 0, 2
# Pre-training of the base (full fine-tune of the random model on BASE_TASK): a short run,
# chosen so that the base answers BASE_TASK (100% on held-out lists) while its attention is
# still soft enough for LoRA to move: in trials (plain LoRA, 300 steps) a base trained for 400
# steps stayed near 0 on DEMO_TASK where one trained for 120 reached 100%.
_BASE_ROWS, _BASE_BATCH, _BASE_LR, _BASE_WARMUP = 2000, 16, 3e-3, 20


def task_rows(n: int, seed: int, task: str = DEMO_TASK,
              exclude: Sequence[Sequence[str]] = ()) -> List[Dict[str, str]]:
    """``n`` rows ``{"input": "<task>: w1 ... wk.", "output": <answer>}``, k from 3 to 6
    distinct words; no word list twice, none of ``exclude``."""
    answer = _ANSWERS[task]
    rng = random.Random(seed)
    seen = {tuple(words) for words in exclude}
    rows = []
    while len(rows) < n:
        words = tuple(rng.sample(_WORDS, rng.randint(3, 6)))
        if words in seen:
            continue
        seen.add(words)
        rows.append({"input": f"{task}: {' '.join(words)}.", "output": answer(words)})
    return rows


def row_words(row: Dict[str, str]) -> List[str]:
    """The word list of a :func:`task_rows` row, read back from its prompt."""
    return row["input"].split(":", 1)[1].strip().rstrip(".").split()


def _heldout_pool() -> List[Dict[str, str]]:
    return task_rows(_HELDOUT_POOL, _HELDOUT_SEED)


def demo_heldout_rows(cache_dir: Optional[str] = None, n: int = 50) -> List[Dict[str, str]]:
    """The first ``n`` (at most 200) held-out rows of the demo task; also written, all 200, to
    ``<cache>/demo_task_heldout.json`` for inspection."""
    if not 0 < n <= _HELDOUT_POOL:
        raise ValueError(f"held-out rows: 1 to {_HELDOUT_POOL}, got {n}")
    pool = _heldout_pool()
    path = _cache_dir(cache_dir) / "demo_task_heldout.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(pool, indent=1))
    return pool[:n]


def write_demo_task_data(cache_dir: Optional[str] = None, num_examples: int = 1024) -> Path:
    """The demo task's training rows as JSON (``input``/``output``); returns the path."""
    path = _cache_dir(cache_dir) / f"demo_task_train_{num_examples}.json"
    if not path.exists():
        heldout = [row_words(r) for r in _heldout_pool()]
        atomic_write_text(path, json.dumps(
            task_rows(num_examples, _TRAIN_SEED, exclude=heldout), indent=1))
    return path


def demo_task_dataset(tokenizer, cache_dir: Optional[str] = None, num_examples: int = 1024,
                      packed: bool = False):
    """The demo task through torchtune's stock ``instruct_dataset`` (local JSON): the prompt is
    the user turn, the loss is on the answer and EOS only."""
    from torchtune.datasets import instruct_dataset

    path = write_demo_task_data(cache_dir, num_examples=num_examples)
    return instruct_dataset(tokenizer, source="json", data_files=str(path), split="train",
                            train_on_input=False, packed=packed)


def _tokenize(tokenizer, row: Dict[str, str]):
    """(tokens, mask) of a row exactly as ``instruct_dataset`` tokenizes it."""
    from torchtune.data import InputOutputToMessages

    messages = InputOutputToMessages(train_on_input=False)(row)["messages"]
    return tokenizer.tokenize_messages(messages)


def prompt_ids(tokenizer, row: Dict[str, str]) -> List[int]:
    """The token ids a trained model sees before its answer: the training sequence of ``row``
    up to its first trained (unmasked) token."""
    tokens, mask = _tokenize(tokenizer, row)
    return list(tokens[: mask.index(False)])


def write_demo_base_checkpoint(cache_dir: Optional[str] = None, pretrain_steps: int = 120,
                               seed: int = 0) -> Path:
    """The demo's base model: the random tiny Llama-2 of :func:`write_tiny_llama2_hf_checkpoint`
    trained in full for ``pretrain_steps`` steps (batch 16, AdamW 3e-3, one CPU thread, seeded)
    on :data:`BASE_TASK` rows, written as an HF folder ``<cache>/tiny_llama2_hf_last_word_<N>``.

    Built once (a few seconds on one CPU core for 120 steps) and reused. A concurrent builder
    (the ranks of a distributed run) writes its own staging folder; the first to finish wins.
    """
    from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

    cache = _cache_dir(cache_dir)
    out = cache / f"tiny_llama2_hf_last_word_{pretrain_steps}"
    if (out / "config.json").exists():
        return out
    tokenizer = demo_tokenizer(cache_dir)
    heldout = [row_words(r) for r in _heldout_pool()]
    samples = []
    for row in task_rows(_BASE_ROWS, _BASE_SEED, task=BASE_TASK, exclude=heldout):
        tokens, mask = _tokenize(tokenizer, row)
        samples.append({"tokens": tokens, "labels": [CROSS_ENTROPY_IGNORE_IDX if m else t
                                                     for t, m in zip(tokens, mask)]})
    model = _random_tiny_llama2(DEMO_MODEL_ARGS, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same result whatever the caller's setting; fastest here
    try:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=_BASE_LR, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / _BASE_WARMUP) * max(0.0, 1 - s / pretrain_steps))
        for _ in range(pretrain_steps):
            picks = torch.randint(len(samples), (_BASE_BATCH,), generator=generator).tolist()
            batch = padded_collate_sft([samples[i] for i in picks], padding_idx=tokenizer.pad_id,
                                       ignore_idx=CROSS_ENTROPY_IGNORE_IDX)
            logits = model(batch["tokens"])
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                ignore_index=CROSS_ENTROPY_IGNORE_IDX)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{out.name}."))
    try:
        _write_hf_checkpoint(staging, model.state_dict(), DEMO_MODEL_ARGS)
        os.rename(staging, out)  # atomic; fails if another builder got there first
    except OSError:
        if not (out / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ---- held-out score ----------------------------------------------------------------------


@dataclass
class HeldOutScore:
    """Exact-match count of greedy answers on held-out rows, and the answers."""

    correct: int
    total: int
    predictions: List[str] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return f"{self.correct}/{self.total} ({100 * self.correct / self.total:.0f}%)"


def exact_match(prediction: str, reference: str) -> bool:
    """Equal up to surrounding and repeated whitespace."""
    return prediction.split() == reference.split()


def score_heldout(model: torch.nn.Module, tokenizer, rows: Sequence[Dict[str, str]],
                  max_new_tokens: int = 8, use_cache: bool = True) -> HeldOutScore:
    """Greedy-decode each row's prompt (:func:`prompt_ids`) until EOS or ``max_new_tokens``
    and count the answers equal to ``row["output"]`` (:func:`exact_match`)."""
    from evals.decoding import greedy_generate

    outputs = greedy_generate(model, [prompt_ids(tokenizer, r) for r in rows],
                              max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                              stop_ids=[tokenizer.eos_id], use_cache=use_cache)
    predictions = [tokenizer.decode(ids) for ids in outputs]
    correct = sum(exact_match(p, r["output"]) for p, r in zip(predictions, rows))
    return HeldOutScore(correct, len(rows), predictions)


def score_checkpoint(checkpoint_dir: str | Path, tokenizer,
                     rows: Sequence[Dict[str, str]]) -> HeldOutScore:
    """:func:`score_heldout` on the model of an HF checkpoint folder (an ``epoch_N/``)."""
    from evals.model_loading import load_model

    return score_heldout(load_model(checkpoint_dir), tokenizer, rows)


# ---- python -m lorasc_tune.demo ------------------------------------------------------------

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_tiny.yaml"
DEMO_RECIPE = "lorasc_tune/recipes/lorasc_lora.py"


def demo_config(overrides: Sequence[str] = (), config_path: Optional[str | Path] = None):
    """The config ``tune run <recipe> --config <config_path> <overrides>`` would give."""
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    path = Path(config_path) if config_path else DEMO_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"demo config not found: {path}")
    parser = TuneRecipeArgumentParser(add_help=False)
    yaml_args, cli_args = parser.parse_known_args(["--config", str(path), *overrides])
    return _merge_yaml_and_cli_args(yaml_args, cli_args)


@dataclass
class DemoResult:
    before: HeldOutScore            # the base model
    epochs: Dict[str, HeldOutScore]  # "epoch_0", ... in order; the last is the final model
    rows: List[Dict[str, str]]
    base_dir: Path
    output_dir: Path

    @property
    def after(self) -> HeldOutScore:
        return list(self.epochs.values())[-1]


def run_demo(cfg, heldout: int = 50, log=print) -> DemoResult:
    """Score the base on the held-out rows, run the single-device recipe on ``cfg`` in this
    process (as ``tune run`` would), then score every ``epoch_N/`` it wrote."""
    from torchtune import config as tt_config

    from lorasc_tune import recipe_common as common
    from lorasc_tune.recipes.lorasc_lora import LoRASCRecipeSingleDevice

    tokenizer = tt_config.instantiate(cfg.tokenizer)
    rows = demo_heldout_rows(cfg.dataset.get("cache_dir"), heldout)
    base_dir = demo_base_dir(cfg.checkpointer.get("cache_dir"),
                             cfg.checkpointer.get("pretrain_steps", 0))
    task = f'"{DEMO_TASK}: ..."'
    before = score_checkpoint(base_dir, tokenizer, rows)
    log(f"LoRASC demo: before training, the base model answers {before} of the held-out "
        f"{task} rows (exact match, greedy decoding)")

    tt_config.log_config(recipe_name="LoRASCRecipeSingleDevice", cfg=cfg)
    common.run_recipe(LoRASCRecipeSingleDevice, cfg)

    output_dir = Path(cfg.output_dir)
    epochs = {f"epoch_{e}": score_checkpoint(output_dir / f"epoch_{e}", tokenizer, rows)
              for e in range(cfg.epochs) if (output_dir / f"epoch_{e}" / "config.json").exists()}
    if not epochs:
        raise RuntimeError(f"no epoch folder in {output_dir} to score")
    result = DemoResult(before, epochs, rows, base_dir, output_dir)
    log(f"LoRASC demo: held-out exact match on {len(rows)} {task} rows the run never saw:")
    labels = {"base (before training)": before,
              **{str(output_dir / name): score for name, score in epochs.items()}}
    width = max(map(len, labels)) + 2
    for label, score in labels.items():
        log(f"  {label:<{width}}{score}")
    row, pred, base_pred = rows[0], result.after.predictions[0], before.predictions[0]
    log(f'  e.g. "{row["input"]}" -> "{pred.strip()}" (base: "{base_pred.strip()}", '
        f'expected "{row["output"]}")')
    log(f"LoRASC demo: held-out exact match before {before} -> after {result.after}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lorasc_tune.demo",
        description=f"The LoRASC demo: tune run {DEMO_RECIPE} --config configs/demo_tiny.yaml "
                    "[key=value ...], with the held-out exact match of the base model and of "
                    "every epoch's merged model printed.")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, as with tune run (e.g. epochs=5)")
    parser.add_argument("--config", default=None, help=f"default: {DEMO_CONFIG}")
    parser.add_argument("--heldout", type=int, default=50, help="held-out rows (1 to 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: with another process on one of "
                             "2 cores, torch's default of 2 threads made this run ~30x slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = demo_config(args.overrides, args.config)
    run_demo(cfg, heldout=args.heldout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
