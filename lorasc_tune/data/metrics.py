"""Answer scoring for the generation tasks, shared by the lm-eval tasks and any in-recipe evaluation.

* SQuAD / DROP: SQuAD-style token F1 and exact match after normalization (lower case, no
  punctuation, no articles, single spaces), max over the gold answers, as MeZO scores both.
* GSM8K: exact match of the last number in the generation against the final answer.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Optional, Sequence

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, then the articles a/an/the, and collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 between two normalized strings (0 when they share no token)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def max_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best :func:`token_f1` over the gold answers."""
    return max(token_f1(prediction, g) for g in golds)


def max_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def last_number(text: str) -> Optional[str]:
    """The last number in ``text``, commas removed and a trailing ``.0...`` dropped; ``None`` if none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return canonical_number(found[-1])


def canonical_number(text: str) -> str:
    """``"1,000.00"`` -> ``"1000"``; non-numbers are returned stripped."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_exact_match(generation: str, final_answer: str) -> float:
    """1.0 when the last number in ``generation`` equals ``final_answer`` numerically."""
    pred = last_number(generation)
    return float(pred is not None and pred == canonical_number(final_answer))
