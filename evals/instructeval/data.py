"""Local-file loaders for the InstructEval tasks, with InstructEval's prompts baked in.

Each loader returns a ``datasets.DatasetDict`` whose ``test`` rows carry a ready ``prompt`` (the
few-shot examples, then the question) and the gold answer; the YAMLs use ``num_fewshot: 0`` and
``doc_to_text: prompt`` (HumanEval: ``model_input``, see :func:`load_humaneval`). Building the shots here, rather than through lm-eval's sampler, is what lets
us reproduce InstructEval's choices exactly: MMLU's first 5 dev rows under a subject header, BBH's
first 3 examples of each task (scored on the rest), DROP's 3 seeded random shots from other passages,
HumanEval's instruction line.

Loaders are called by lm-eval as ``custom_dataset(**metadata, **dataset_kwargs)``; ``metadata``
includes ``--model_args`` and ``--metadata``, which is how path overrides reach
:func:`evals.instructeval.paths.dataset_path`.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence

from evals.instructeval.paths import dataset_path
# HF ``drop``'s reader (validated answers for the dev file, questions with mixed or empty answers
# skipped): InstructEval scores HF's validation split, so we read the release file the same way.
from lorasc_tune.data.mezo import _load_drop as _load_drop_like_hf

MMLU_SHOTS, BBH_SHOTS, DROP_SHOTS, GSM8K_SHOTS = 5, 3, 3, 8
MMLU_LETTERS = "ABCD"


def _dataset_dict(rows: Dict[str, List[Dict[str, Any]]]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})


def _require(path: Path | str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"InstructEval {what}: {path} not found")
    return path


# ---- MMLU -----------------------------------------------------------------------------------


#: Header of the reformatted copy in the shared data (answers are 0-3 there).
MMLU_REFORMATTED_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
_MMLU_FORMATS = ("expected either Hendrycks' original release (no header; 6 fields per row: question, "
                 "4 choices, answer A-D) or the reformatted copy (header "
                 + ",".join(MMLU_REFORMATTED_HEADER) + "; answer 0-3)")


def _mmlu_format_error(path: Path, where: str) -> ValueError:
    return ValueError(f"{path}: {where}; {_MMLU_FORMATS}")


def _mmlu_row(path: Path, number: int, fields: List[str], answers: Sequence[str]) -> Dict[str, Any]:
    """Csv record ``number`` (1-based) parsed; ``answers`` are the accepted values for A, B, C, D."""
    if len(fields) != 6:
        raise _mmlu_format_error(path, f"csv record {number} has {len(fields)} fields instead of 6")
    answer = fields[5].strip()
    if answer not in answers:
        raise _mmlu_format_error(
            path, f"csv record {number} has answer {fields[5]!r}, not one of {', '.join(answers)}")
    return {"question": fields[0], "choices": fields[1:5], "answer": MMLU_LETTERS[answers.index(answer)]}


def read_mmlu_csv(path: Path) -> List[Dict[str, Any]]:
    """Rows ``{question, choices (4), answer (A-D)}`` of an MMLU csv in either format.

    Hendrycks' release has no header and answers A-D; the shared data's copy starts with the header
    ``question,choice0..choice3,answer`` and answers 0-3. The header tells them apart; every row is
    then checked against that format, so a file in neither raises an error naming the file.
    """
    with open(_require(path, "mmlu"), newline="", encoding="utf-8") as f:
        records = [r for r in csv.reader(f) if r]  # csv.reader yields [] for a blank line
    if not records:
        raise _mmlu_format_error(path, "no rows")
    reformatted = records[0] == MMLU_REFORMATTED_HEADER
    # A tuple, not a string: membership must match a whole value ("AB" or "" is no answer).
    answers, first = (("0", "1", "2", "3"), 1) if reformatted else (tuple(MMLU_LETTERS), 0)
    return [_mmlu_row(path, number, fields, answers)
            for number, fields in enumerate(records[first:], start=first + 1)]


def mmlu_subject_header(subject: str) -> str:
    # InstructEval (after Hendrycks' evaluate_flan.py) prefixes every word with a space, so the
    # header reads "about  high school biology." with two spaces. Kept verbatim for comparability.
    words = "".join(" " + w for w in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def mmlu_question(row: Dict[str, Any], with_answer: bool) -> str:
    text = row["question"] + "".join(f"\n{MMLU_LETTERS[j]}. {c}" for j, c in enumerate(row["choices"]))
    text += "\nAnswer:"
    return text + (f" {row['answer']}\n\n" if with_answer else "")


def load_mmlu(subject: str, shots: int = MMLU_SHOTS, **options: Any):
    """MMLU ``subject``: test rows with ``prompt`` (header + first ``shots`` dev rows + question)
    and ``label`` (A-D)."""
    root = dataset_path("mmlu", options)
    dev = read_mmlu_csv(root / "dev" / f"{subject}_dev.csv")[:shots]
    prefix = mmlu_subject_header(subject) + "".join(mmlu_question(r, True) for r in dev)
    test = [{"prompt": prefix + mmlu_question(r, False), "label": r["answer"], "subject": subject}
            for r in read_mmlu_csv(root / "test" / f"{subject}_test.csv")]
    return _dataset_dict({"test": test})


def mmlu_subjects(options: Dict[str, Any] | None = None) -> List[str]:
    """Subjects present in the MMLU test folder (57 in the full release)."""
    root = dataset_path("mmlu", options or {})
    return sorted(p.name[: -len("_test.csv")] for p in (root / "test").glob("*_test.csv"))


# ---- BBH ------------------------------------------------------------------------------------


def bbh_example(example: Dict[str, str], with_answer: bool) -> str:
    text = example["input"] + "\nAnswer:"
    return text + (f" {example['target']}\n\n" if with_answer else "")


def load_bbh(bbh_task: str, shots: int = BBH_SHOTS, **options: Any):
    """BBH task: the first ``shots`` examples are the prompt's shots; the rest are scored."""
    path = _require(dataset_path("bbh", options) / f"{bbh_task}.json", "bbh")
    examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    prefix = "".join(bbh_example(e, True) for e in examples[:shots])
    test = [{"prompt": prefix + bbh_example(e, False), "target": e["target"], "task": bbh_task}
            for e in examples[shots:]]
    return _dataset_dict({"test": test})


def bbh_tasks(options: Dict[str, Any] | None = None) -> List[str]:
    """BBH task names present in the data folder (27 in the full release)."""
    return sorted(p.stem for p in dataset_path("bbh", options or {}).glob("*.json"))


# ---- DROP -----------------------------------------------------------------------------------


def read_drop(path: Path) -> List[Dict[str, Any]]:
    """Questions of a DROP release file (``{passage_id: {passage, qa_pairs: [...]}}``), in file order,
    as HF ``drop``'s validation split holds them (the split InstructEval evaluates).

    Each row: ``passage_id``, ``passage``, ``question``, ``query_id`` and ``answers``: the strings
    of all *validated* answers, concatenated (HF's ``answers_spans.spans``), each stripped as
    InstructEval's ``get_answers`` does. The main ``answer`` field is not used, as in HF's split.
    """
    rows = _load_drop_like_hf(_require(path, "drop"), validated=True)
    return [{"passage_id": r["section_id"], "passage": r["passage"], "question": r["question"],
             "query_id": r["query_id"] or "", "answers": [a.strip() for a in r["answers"]]}
            for r in rows]


def drop_label(row: Dict[str, Any]) -> str | None:
    """The one gold string of a DROP row, or None when its validated spans are not all the same
    string (InstructEval keeps a question only when they reduce to one distinct string)."""
    distinct = set(row["answers"])
    return row["answers"][0] if len(distinct) == 1 else None


def drop_example(row: Dict[str, Any], with_answer: bool) -> str:
    text = row["passage"].strip() + " " + row["question"].strip() + "\nAnswer:"
    return text + (f" {drop_label(row)}\n\n" if with_answer else "")


def split_drop(rows: Sequence[Dict[str, Any]], shots: int = DROP_SHOTS, seed: int = 0):
    """InstructEval's DROP protocol: keep questions with one distinct validated answer, draw
    ``shots`` of them as ``random.seed(seed); random.sample(kept, shots)`` would, and score only
    the kept questions on the other passages. Returns ``(shots, test)``."""
    kept = [r for r in rows if drop_label(r) is not None]
    rng = random.Random(seed)  # same stream as random.seed(seed) + random.sample, without global state
    chosen = rng.sample(kept, k=shots)
    used = {r["passage"] for r in chosen}
    return chosen, [r for r in kept if r["passage"] not in used]


def load_drop(shots: int = DROP_SHOTS, seed: int = 0, **options: Any):
    """DROP test docs: ``prompt`` (``shots`` solved questions, then the question), ``label`` (the
    gold string) and ``query_id``."""
    chosen, test = split_drop(read_drop(dataset_path("drop", options)), shots=shots, seed=seed)
    prefix = "".join(drop_example(r, True) for r in chosen)
    rows = [{"prompt": prefix + drop_example(r, False), "label": drop_label(r), "query_id": r["query_id"]}
            for r in test]
    return _dataset_dict({"test": rows})


# ---- HumanEval ------------------------------------------------------------------------------


def read_humaneval(path: Path) -> List[Dict[str, str]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(_require(path, "humaneval"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


#: InstructEval's instruction line, put before every HumanEval prompt for non-StarCoder models
#: (human_eval/main.py ``gen_prompt``).
HUMANEVAL_INSTRUCTION = ("Please complete the following Python code without providing any additional "
                         "tasks such as testing or explanations\n")


def load_humaneval(**options: Any):
    """The 164 problems, 0-shot. ``model_input`` (what the model reads) is InstructEval's
    instruction line + the problem's ``prompt``; ``prompt`` itself stays the problem's own text,
    because the program that is run is ``prompt + completion + tests``."""
    keep = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = [{**{k: p[k] for k in keep}, "model_input": HUMANEVAL_INSTRUCTION + p["prompt"]}
            for p in read_humaneval(dataset_path("humaneval", options))]
    return _dataset_dict({"test": rows})


# ---- GSM8K ----------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^>]*>>")


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    with open(_require(path, "gsm8k"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_example(row: Dict[str, str], with_answer: bool) -> str:
    text = f"Question: {row['question']}\nAnswer:"
    if with_answer:
        # The release marks calculator calls as <<48/2=24>>; shots show the plain reasoning.
        text += " " + _CALCULATOR.sub("", row["answer"]) + "\n\n"
    return text


def load_gsm8k(shots: int = GSM8K_SHOTS, **options: Any):
    """GSM8K test with the first ``shots`` train problems (reasoning + ``#### answer``) as shots."""
    root = dataset_path("gsm8k", options)
    prefix = "".join(gsm8k_example(r, True) for r in read_jsonl(root / "train.jsonl")[:shots])
    test = [{"prompt": prefix + gsm8k_example(r, False), "question": r["question"],
             "target": r["answer"].rsplit("####", 1)[-1].strip()}
            for r in read_jsonl(root / "test.jsonl")]
    return _dataset_dict({"test": test})
