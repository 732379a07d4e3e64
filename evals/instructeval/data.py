"""Local-file loaders for the InstructEval tasks, with InstructEval's prompts baked in.

Each loader returns a ``datasets.DatasetDict`` whose ``test`` rows carry a ready ``prompt`` (the
few-shot examples, then the question) and the gold answer; the YAMLs use ``num_fewshot: 0`` and
``doc_to_text: prompt``. Building the shots here, rather than through lm-eval's sampler, is what lets
us reproduce InstructEval's choices exactly: MMLU's first 5 dev rows under a subject header, BBH's
first 3 examples of each task (scored on the rest), DROP's 3 seeded random shots from other passages.

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

from evals.instructeval.answers import drop_gold_answers
from evals.instructeval.paths import dataset_path

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


def read_mmlu_csv(path: Path) -> List[Dict[str, Any]]:
    """Rows of a reformatted MMLU csv (header ``question,choice0..choice3,answer``, answer 0-3)."""
    with open(_require(path, "mmlu"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for r in reader:
            rows.append({"question": r["question"],
                         "choices": [r[f"choice{j}"] for j in range(4)],
                         "answer": MMLU_LETTERS[int(r["answer"])]})
    return rows


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
    """Questions of a DROP release file (``{passage_id: {passage, qa_pairs: [...]}}``), in file order.

    Each row: ``passage``, ``question``, ``query_id``, ``answers`` (gold answers, each a list of
    strings: the main answer first, then the validated ones).
    """
    data = json.loads(_require(path, "drop").read_text(encoding="utf-8"))
    rows = []
    for passage_id, item in data.items():
        for qa in item["qa_pairs"]:
            answers = drop_gold_answers(qa)
            if not answers:
                continue
            rows.append({"passage_id": passage_id, "passage": item["passage"], "question": qa["question"],
                         "query_id": qa.get("query_id", ""), "answers": answers})
    return rows


def drop_example(row: Dict[str, Any], with_answer: bool) -> str:
    text = row["passage"].strip() + " " + row["question"].strip() + "\nAnswer:"
    return text + (f" {row['answers'][0][0]}\n\n" if with_answer else "")


def split_drop(rows: Sequence[Dict[str, Any]], shots: int = DROP_SHOTS, seed: int = 0):
    """InstructEval's DROP protocol: keep questions whose main answer is one string, draw ``shots``
    of them with ``random.seed(seed)``, and score only questions on the other passages."""
    single = [r for r in rows if len(set(r["answers"][0])) == 1]
    rng = random.Random(seed)  # same stream as random.seed(seed) + random.sample
    chosen = rng.sample(single, k=shots)
    used = {r["passage"] for r in chosen}
    return chosen, [r for r in single if r["passage"] not in used]


def load_drop(shots: int = DROP_SHOTS, seed: int = 0, **options: Any):
    chosen, test = split_drop(read_drop(dataset_path("drop", options)), shots=shots, seed=seed)
    prefix = "".join(drop_example(r, True) for r in chosen)
    rows = [{"prompt": prefix + drop_example(r, False), "answers": r["answers"],
             "query_id": r["query_id"]} for r in test]
    return _dataset_dict({"test": rows})


# ---- HumanEval ------------------------------------------------------------------------------


def read_humaneval(path: Path) -> List[Dict[str, str]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(_require(path, "humaneval"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_humaneval(**options: Any):
    """The 164 problems; ``prompt`` is the problem's own prompt (0-shot)."""
    keep = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = [{k: p[k] for k in keep} for p in read_humaneval(dataset_path("humaneval", options))]
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
