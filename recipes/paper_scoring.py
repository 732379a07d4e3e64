"""Score a merged checkpoint on a MeZO split, in-process: the evaluation of the Table 1 sweep.

Used by ``recipes/paper_table1.py`` (this folder is on ``sys.path`` when that script runs). The
rows are the ones the training config's ``dataset:`` builder holds out (``split: validation`` or
``test``), tokenized by the training tokenizer, so the scores follow the data pipeline that trained
the model. The scoring rules are MeZO's:

* classification / multiple choice: each candidate's log-probability, **averaged over its tokens**
  (MeZO's rule; lm-eval's ``acc`` sums instead), argmax = prediction; accuracy. ReCoRD counts a
  prediction as right when it is any gold entity.
* SQuAD, DROP: greedy decoding up to the first newline (at most ``max_new_tokens``), then SQuAD
  F1 (and exact match) against the gold answers.
* GSM8K: the same greedy answer, scored by exact match of its last number. Zero-shot, in the
  ``Question: ...\\nAnswer: <number>`` format the model was fine-tuned on (the lm-eval task
  ``mezo_gsm8k`` is 8-shot, meant for models that were not).

Why not lm-eval here: the ``mezo_<task>`` lm-eval tasks read only the test split, while the sweep
selects the learning rate on the validation split; one scorer for both keeps the two comparable.
The log-likelihood, decoding and checkpoint-loading code is the project's (``evals/``).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torchtune import config as tt_config

from evals.decoding import greedy_generate
from evals.model_loading import load_model, resolve_device, resolve_dtype
from evals.scoring import score_requests
from lorasc_tune.data import Example, tokenize_example
from lorasc_tune.data.metrics import gsm8k_exact_match, max_exact_match, max_f1

# The score each task is reported (and selected) by, in percent.
GENERATION_METRIC = {"squad": "f1", "drop": "f1", "gsm8k": "em"}


def primary_metric(task: str) -> str:
    """``acc`` for classification / multiple choice, ``f1`` for SQuAD and DROP, ``em`` for GSM8K."""
    return GENERATION_METRIC.get(task, "acc")


def build_split(cfg: Any, tokenizer: Any, split: str):
    """The config's ``dataset:`` builder with ``split`` swapped in (same seed and sizes)."""
    return tt_config.instantiate(cfg.dataset, tokenizer, split=split)


def choice_accuracy(model, tokenizer, examples: Sequence[Example], *, max_length: int,
                    batch_size: int) -> float:
    """Accuracy of the highest mean-token-log-probability candidate."""
    requests, owners = [], []
    for i, ex in enumerate(examples):
        for choice in ex.choices:
            # MeZO's token split: the candidate's tokens are those ``prompt + choice`` has
            # beyond ``prompt`` (tokenize_example counts them that way), so the boundary is
            # tokenized jointly.
            row = tokenize_example(tokenizer, Example(prompt=ex.prompt, target=choice))
            n_prompt = sum(1 for label in row["labels"] if label < 0)
            requests.append((row["tokens"][:n_prompt], row["tokens"][n_prompt:]))
            owners.append(i)
    scored = score_requests(model, requests, max_length=max_length, batch_size=batch_size,
                            pad_id=tokenizer.pad_id)
    per_example: List[List[float]] = [[] for _ in examples]
    for (logprob, _), (_, cont), i in zip(scored, requests, owners):
        per_example[i].append(logprob / len(cont))
    correct = 0
    for ex, scores in zip(examples, per_example):
        pred = max(range(len(scores)), key=scores.__getitem__)
        gold = ex.gold if isinstance(ex.gold, list) else [ex.gold]
        correct += pred in gold
    return correct / len(examples)


def generate_answers(model, tokenizer, examples: Sequence[Example], *, max_length: int,
                     max_new_tokens: int, batch_size: int) -> List[str]:
    """Greedy answer to each prompt, cut at the first newline and stripped."""
    budget = max_length - max_new_tokens
    prompts = []
    for ex in examples:
        ids = tokenizer.encode(ex.prompt, add_bos=True, add_eos=False)
        # Left-truncate after BOS, as training does, so the question at the end survives.
        prompts.append(ids if len(ids) <= budget else ids[:1] + ids[-(budget - 1):])

    def stop_at_newline(_row: int, generated: List[int]) -> bool:
        return "\n" in tokenizer.decode(generated)

    answers = []
    for start in range(0, len(prompts), batch_size):
        outs = greedy_generate(model, prompts[start:start + batch_size],
                               max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                               stop_ids=[tokenizer.eos_id], stop_fn=stop_at_newline)
        answers += [tokenizer.decode(ids).split("\n")[0].strip() for ids in outs]
    return answers


def score_split(model, tokenizer, task: str, examples: Sequence[Example], *, max_length: int,
                max_new_tokens: int, batch_size: int) -> Dict[str, float]:
    """Metrics of one split in percent: ``{"acc"}``, ``{"f1", "em"}`` or ``{"em"}``."""
    if not examples:
        raise ValueError(f"{task}: the split to score is empty (num_dev / num_eval set to 0?)")
    if task not in GENERATION_METRIC:
        acc = choice_accuracy(model, tokenizer, examples, max_length=max_length,
                              batch_size=batch_size)
        return {"acc": 100.0 * acc}
    answers = generate_answers(model, tokenizer, examples, max_length=max_length,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    if task == "gsm8k":
        em = [gsm8k_exact_match(a, ex.answers[0]) for a, ex in zip(answers, examples)]
        return {"em": 100.0 * sum(em) / len(em)}
    f1 = [max_f1(a, ex.answers) for a, ex in zip(answers, examples)]
    em = [max_exact_match(a, ex.answers) for a, ex in zip(answers, examples)]
    return {"f1": 100.0 * sum(f1) / len(f1), "em": 100.0 * sum(em) / len(em)}


def score_checkpoint(checkpoint_dir: Path, cfg: Any, task: str, splits: Sequence[str], *,
                     max_new_tokens: int = 50, batch_size: int = 8) -> Dict[str, Dict[str, float]]:
    """Load ``checkpoint_dir`` (a merged ``epoch_N`` folder) and score it on each of ``splits``.

    ``cfg`` is the training config: its tokenizer, ``dataset:`` block, ``device`` and ``dtype``
    are reused. Returns ``{split: metrics}``; the model is freed before returning.
    """
    tokenizer = tt_config.instantiate(cfg.tokenizer)
    max_length = int(cfg.tokenizer.get("max_seq_len") or 2048)
    device = resolve_device(cfg.get("device"))
    model = load_model(checkpoint_dir, max_seq_len=max_length, device=device,
                       dtype=resolve_dtype(cfg.get("dtype"), device))
    try:
        return {
            split: score_split(model, tokenizer, task, build_split(cfg, tokenizer, split).examples,
                               max_length=max_length, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
            for split in splits
        }
    finally:
        # The next cell trains in a fresh process; give the GPU memory back first.
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
