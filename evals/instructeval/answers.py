"""Answer extraction and metrics for the InstructEval tasks.

* MMLU, BBH and DROP (InstructEval): a prediction is right when, stripped, it starts with the
  gold answer. For DROP this is InstructEval's ``score``; exact match and bag-of-words F1 after
  DROP's answer normalisation (lower case, no punctuation or articles, numbers canonicalised, best
  over the gold answers, multi-span answers aligned one-to-one) are reported beside it.
  Differences from the official DROP script are noted where they occur.
* HumanEval (InstructEval): the completion is cleaned as InstructEval does before it is run.
* GSM8K: the final number of the generation (the one after ``####`` when the model writes one,
  else the last number), compared numerically with the gold number.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation
from typing import List, Optional, Sequence, Tuple

# ---- MMLU / BBH / DROP (InstructEval's rule) ----------------------------------------------


def starts_with_answer(prediction: str, gold: str) -> bool:
    """InstructEval's check for MMLU, BBH and DROP: ``prediction.strip().startswith(gold)``."""
    return prediction.strip().startswith(gold.strip())


# ---- HumanEval ------------------------------------------------------------------------------


def _even_indent(line: str) -> str:
    """``line`` with one more leading space when its leading spaces are odd in number."""
    indent = len(line) - len(line.lstrip(" "))
    return " " + line if indent % 2 else line


def humaneval_completion(generation: str) -> str:
    """The code InstructEval keeps from a HumanEval generation: every line's indentation padded to
    an even number of spaces, leading newlines removed, then everything from the first blank line
    (``"\n\n"``) on dropped, because a model tends to go on with tests or a second function."""
    code = "\n".join(_even_indent(line) for line in generation.split("\n"))
    return code.lstrip("\n").split("\n\n", 1)[0]


# ---- numbers (GSM8K) ------------------------------------------------------------------------

# An optional sign and dollar sign, then either comma-grouped thousands (1,234,567) or plain digits,
# then optional decimals. "1,2" is two numbers, not 12: only groups of exactly three digits join.
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def canonical_number(text: str) -> Optional[str]:
    """``"$1,200.50"`` -> ``"1200.5"``, ``"-3"`` -> ``"-3"``, ``"72."`` -> ``"72"``; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # normalize() drops trailing zeros; quantize avoids "1E+2" for integral values.
    value = value.normalize()
    if value == value.to_integral_value():
        value = value.quantize(Decimal(1))
    return str(value)


def find_numbers(text: str) -> List[str]:
    """Numbers in ``text``, in order, canonicalised. A minus sign counts only when it does not
    follow a letter or digit, so "pages 3-4" gives 3 and 4, not 3 and -4."""
    found = []
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        start = match.start()
        if token.startswith("-") and start > 0 and text[start - 1].isalnum():
            token = token[1:]
        number = canonical_number(token)
        if number is not None:
            found.append(number)
    return found


def gsm8k_final_number(generation: str) -> Optional[str]:
    """The answer a GSM8K generation commits to: the first number after ``####`` if present, else
    the last number in the text; None when there is no number."""
    if "####" in generation:
        after = find_numbers(generation.split("####", 1)[1])
        if after:
            return after[0]
    numbers = find_numbers(generation)
    return numbers[-1] if numbers else None


def gsm8k_exact_match(generation: str, gold: str) -> bool:
    predicted = gsm8k_final_number(generation)
    return predicted is not None and predicted == canonical_number(gold)


# ---- DROP -----------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}
_PUNCT = set(string.punctuation)
_HYPHEN_IN_WORD = re.compile(r"(?<=[^\s-])-(?=[^\s-])")


def _normalize_token(token: str) -> str:
    number = canonical_number(token.strip("".join(_PUNCT - {"-", "."})).rstrip("."))
    if number is not None:
        # Numbers compare by value: "1,000", "1000.0" and "$1000" all become "1000".
        return number
    token = "".join(ch for ch in token if ch not in _PUNCT)
    return "" if token in _ARTICLES else token


def drop_normalize(text: str) -> str:
    """Lower-case, split hyphenated words, drop punctuation and articles, canonicalise numbers.

    Unlike the official script, a leading minus sign is kept (-5 and 5 differ) because the split
    on hyphens only applies between two non-space characters."""
    words = _HYPHEN_IN_WORD.sub(" ", text.lower()).split()
    return " ".join(t for t in (_normalize_token(w) for w in words) if t)


def _bag(text: str) -> List[str]:
    return drop_normalize(text).split()


def _span_f1(pred: str, gold: str) -> float:
    p, g = _bag(pred), _bag(gold)
    gold_numbers = {t for t in g if canonical_number(t) is not None}
    # A gold span that names numbers is only matched by a prediction naming one of them.
    if gold_numbers and not gold_numbers & {t for t in p if canonical_number(t) is not None}:
        return 0.0
    common = sum(min(p.count(t), g.count(t)) for t in set(p) & set(g))
    if not p and not g:
        return 1.0
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _spans_f1(pred_spans: Sequence[str], gold_spans: Sequence[str]) -> float:
    """Mean F1 of a one-to-one alignment of predicted and gold spans (maximum total F1),
    divided by the larger of the two counts so missing or extra spans cost."""
    from scipy.optimize import linear_sum_assignment
    import numpy as np

    scores = np.array([[_span_f1(p, g) for p in pred_spans] for g in gold_spans])
    rows, cols = linear_sum_assignment(-scores)
    return float(scores[rows, cols].sum()) / max(len(pred_spans), len(gold_spans))


def drop_em_f1(prediction: str | Sequence[str], golds: Sequence[Sequence[str]]) -> Tuple[float, float]:
    """``(exact match, F1)`` of a prediction (a string, or a list of spans) against DROP gold
    answers, each the best over ``golds``."""
    pred_spans = [prediction] if isinstance(prediction, str) else list(prediction)
    best_em, best_f1 = 0.0, 0.0
    for gold in golds:
        em = float(sorted(map(drop_normalize, pred_spans)) == sorted(map(drop_normalize, gold)))
        f1 = _spans_f1(pred_spans, list(gold))
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


def drop_prediction(generation: str) -> str:
    """The answer in a DROP generation: its first non-empty line, stripped."""
    for line in generation.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""
