"""GSM8K, 8-shot direct: the protocol of open-instruct's ``eval/gsm/run_eval.py --n_shot 8 --no_cot``.

The paper evaluates GSM8K this way (Table 2). What the protocol fixes, and this module reproduces:

* **Prompt.** ``"Answer the following questions.\\n\\n"``, then the 8 exemplars of Wei et al.'s
  chain-of-thought paper (Table 20), each as ``"Quesion: <question>\\nAnswer: <short answer>"``
  (``Quesion`` is misspelt in open-instruct's source and kept), joined by blank lines, then
  ``"\\n\\nQuestion: <question, stripped>\\nAnswer:"``. With 8 exemplars and ``--n_shot 8`` the
  script keeps them all in their published order (it samples only when it has more than it needs).
* **Decoding.** Greedy, at most 512 new tokens, stopping at the first newline.
* **Answer.** Digit-grouping commas are removed (``(\\d),(\\d)`` -> ``\\1\\2``, applied left to right
  once, as ``re.sub`` does); the prediction is the last match of ``[-+]?\\d*\\.\\d+|\\d+``, or the
  whole output when there is no number. The gold answer is the text after ``####``, stripped, with
  the same comma removal.
* **Metric.** Exact match after lower-casing and deleting ASCII punctuation from both sides
  (Hugging Face ``evaluate``'s ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``);
  so ``"-3.5"`` and ``"35"`` compare equal, as they do there.
* **Rows.** All 1319 test problems, in file order.

Source read for this protocol: allenai/open-instruct, ``eval/gsm/run_eval.py`` and
``eval/gsm/examplars.py``; the exemplar questions and answers below are the data of the latter
(Wei et al., 2022, arXiv:2201.11903, Table 20). The code is our own.
"""

from __future__ import annotations

import re
import string
from typing import Any, Dict, List, Optional, Sequence

#: (question, short answer) of the 8 exemplars, in the published order.
EXEMPLARS: Sequence[tuple] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
     "are done, there will be 21 trees. How many trees did the grove workers plant today?", "6"),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking "
     "lot?", "5"),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left "
     "in total?", "39"),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?", "8"),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does "
     "he have now?", "9"),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?", "29"),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How "
     "many golf balls did he have at the end of wednesday?", "33"),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?", "8"),
)

HEADER = "Answer the following questions.\n\n"
#: Generation settings of the protocol.
MAX_NEW_TOKENS = 512
STOP = "\n"

_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def prompt_prefix(exemplars: Sequence[tuple] = EXEMPLARS) -> str:
    """The header and the solved exemplars, ending in the blank line before the test question."""
    shots = [f"Quesion: {question}\nAnswer: {answer}" for question, answer in exemplars]
    return HEADER + "\n\n".join(shots) + "\n\n"


def build_prompt(question: str, prefix: Optional[str] = None) -> str:
    """The full prompt for one test question (the model continues after ``Answer:``)."""
    return (prompt_prefix() if prefix is None else prefix) + f"Question: {question.strip()}\nAnswer:"


def drop_digit_commas(text: str) -> str:
    """``"1,234"`` -> ``"1234"``: a comma between two digits goes (one non-overlapping pass)."""
    return _DIGIT_COMMA.sub(r"\1\2", text)


def gold_answer(answer_field: str) -> str:
    """The gold answer of a GSM8K ``answer`` field: the text after ``####``, without digit commas."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' final answer: {answer_field[-80:]!r}")
    return drop_digit_commas(answer_field.split("####")[1].strip())


def extract_prediction(output: str) -> str:
    """The prediction open-instruct takes from a generation: its last number once digit commas are
    removed, else the whole (comma-stripped) generation."""
    cleaned = drop_digit_commas(output)
    numbers = _NUMBER.findall(cleaned)
    return numbers[-1] if numbers else cleaned


def normalise(text: str) -> str:
    """Lower case, ASCII punctuation deleted (nothing else: whitespace is kept)."""
    return text.lower().translate(_NO_PUNCT)


def exact_match(output: str, gold: str) -> bool:
    """Whether a generation scores under the protocol against a gold answer from :func:`gold_answer`."""
    return normalise(extract_prediction(output)) == normalise(gold)


def docs(test_rows: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """lm-eval documents for GSM8K test rows: ``prompt``, ``question`` and ``target`` (gold)."""
    prefix = prompt_prefix()
    return [{"prompt": build_prompt(r["question"], prefix), "question": r["question"],
             "target": gold_answer(r["answer"])} for r in test_rows]


def load(**options: Any):
    """``datasets.DatasetDict`` with the ``test`` docs of the GSM8K test file (``gsm8k_path`` /
    ``$LORASC_EVAL_GSM8K_PATH`` / ``<data root>/gsm8k``; see :mod:`evals.instructeval.paths`)."""
    from evals.instructeval.data import _dataset_dict, read_jsonl
    from evals.instructeval.paths import dataset_path

    return _dataset_dict({"test": docs(read_jsonl(dataset_path("gsm8k", options) / "test.jsonl"))})
