"""The paper's in-domain tasks under the MeZO protocol: file loaders and the seeded split.

This module is pure Python + numpy: it turns the *original* files of each task into plain
``dict`` rows (the fields HF ``datasets`` would give, because MeZO read the tasks through HF)
and samples train / validation / test exactly as MeZO (Malladi et al., 2023) did:

* ``train + validation``: ``num_train + num_dev`` rows of the task's **train** file, taken in the
  order of a seeded permutation; validation is the *last* ``num_dev`` of them, train the rest.
* ``test``: ``num_eval`` rows of the task's **validation** file, with the same seed
  (when that file has fewer rows, all of it, permuted).

MeZO draws the permutation with ``np.random.seed(seed); np.random.permutation(n)`` inside a context
that restores numpy's global state. ``np.random.RandomState(seed).permutation(n)`` yields the same
indices without touching the global state, so we use it.

Row fields per task (``label`` is an int class index unless noted):

======== ==========================================================================
sst2     sentence, label (0 neg / 1 pos), idx
rte      premise, hypothesis, label (0 entailment / 1 not_entailment), idx
cb       premise, hypothesis, label (0 entailment / 1 contradiction / 2 neutral), idx
boolq    question, passage (no "Title -- " prefix, as HF ``boolq``), answer (bool)
wic      word, sentence1, sentence2, label (0 False / 1 True), idx
wsc      text, span1_text, span2_text, span1_index, span2_index, label, idx
multirc  paragraph, question, answer, label, idx = {paragraph, question, answer}
copa     premise, choice1, choice2, question ("cause"/"effect"), label (0/1), idx
record   passage, query, entities (sorted unique), answers (sorted unique), idx
squad    id, title, context, question, answers (list, duplicates kept)
drop     section_id, query_id, passage, question, answers (list of spans)
gsm8k    question, answer (the full solution), final_answer (text after ``####``)
======== ==========================================================================
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from lorasc_tune._paths import SHARED_DATA_ENV, shared_data_dir

log = logging.getLogger(__name__)

Row = dict[str, Any]

_SUPERGLUE_V2 = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2"


class MissingDataError(FileNotFoundError):
    """A task file is absent. The message names the file, where it comes from and how to point at a copy."""


class DataFormatError(ValueError):
    """A task file has a row that cannot be read. The message names the file, the line and the field."""


# ----------------------------------------------------------------------------------------------
# Reading helpers


def _read_jsonl(path: Path) -> Iterator[tuple[int, Row]]:
    """Yield ``(line_number, record)`` for each non-empty line; bad JSON names the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e})") from e


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON ({e})") from e


def _field(rec: Row, name: str, where: str) -> Any:
    """``rec[name]``, or a :class:`DataFormatError` that says where the field was expected."""
    try:
        return rec[name]
    except (KeyError, TypeError):
        raise DataFormatError(f"{where}: missing field {name!r}") from None


def _class_index(value: Any, names: Sequence[str], where: str, field: str = "label") -> int:
    """Map a SuperGLUE label (string name, bool, or int) to its index in ``names`` (HF ClassLabel)."""
    if isinstance(value, bool):
        value = str(value)  # "False"/"True", as HF casts booleans before ClassLabel
    if isinstance(value, str):
        if value not in names:
            raise DataFormatError(f"{where}: field {field!r} = {value!r} is not one of {list(names)}")
        return names.index(value)
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    raise DataFormatError(f"{where}: field {field!r} = {value!r} is not a valid label for {list(names)}")


# ----------------------------------------------------------------------------------------------
# Per-task loaders: original file format -> rows with HF field names and order


def _load_sst2(path: Path) -> list[Row]:
    """GLUE SST-2 TSV with a ``sentence\\tlabel`` header (the HF ``glue/sst2`` rows, in file order)."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or "sentence" not in header or "label" not in header:
            raise DataFormatError(f"{path}:1: expected a header with 'sentence' and 'label', got {header}")
        i_s, i_l = header.index("sentence"), header.index("label")
        for lineno, rec in enumerate(reader, start=2):
            if not rec:
                continue
            where = f"{path}:{lineno}"
            try:
                sentence, label = rec[i_s], int(rec[i_l])
            except (IndexError, ValueError):
                raise DataFormatError(f"{where}: expected a sentence and an integer label, got {rec}") from None
            rows.append({"sentence": sentence, "label": _class_index(label, ("0", "1"), where), "idx": len(rows)})
    return rows


def _superglue_pairs(names: Sequence[str]) -> Callable[[Path], list[Row]]:
    """Loader for RTE / CB style rows: premise, hypothesis, label name."""

    def load(path: Path) -> list[Row]:
        rows = []
        for lineno, rec in _read_jsonl(path):
            where = f"{path}:{lineno}"
            rows.append(
                {
                    "premise": _field(rec, "premise", where),
                    "hypothesis": _field(rec, "hypothesis", where),
                    "label": _class_index(_field(rec, "label", where), names, where),
                    "idx": rec.get("idx", len(rows)),
                }
            )
        return rows

    return load


def _split_boolq_title(passage: str) -> str:
    """SuperGLUE's BoolQ passage is ``"<title> -- <passage>"``; Google's (HF ``boolq``, MeZO's) has no title."""
    head, sep, rest = passage.partition(" -- ")
    return rest if sep else passage


def _load_boolq(path: Path) -> list[Row]:
    """BoolQ jsonl in either release: Google's (``title``, ``answer``) or SuperGLUE's (``label``, titled passage)."""
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        passage = _field(rec, "passage", where)
        if "answer" in rec:  # Google release: the passage already lacks the title
            answer = rec["answer"]
        else:  # SuperGLUE release: strip the "<title> -- " prefix so prompts match MeZO's
            answer = _field(rec, "label", where)
            passage = _split_boolq_title(passage)
        if not isinstance(answer, bool):
            raise DataFormatError(f"{where}: field 'answer'/'label' = {answer!r} is not a boolean")
        rows.append({"question": _field(rec, "question", where), "passage": passage, "answer": answer})
    return rows


def _load_wic(path: Path) -> list[Row]:
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        rows.append(
            {
                "word": _field(rec, "word", where),
                "sentence1": _field(rec, "sentence1", where),
                "sentence2": _field(rec, "sentence2", where),
                "label": _class_index(_field(rec, "label", where), ("False", "True"), where),
                "idx": rec.get("idx", len(rows)),
            }
        )
    return rows


# The two spans HF's wsc.fixed leaves alone: their words are not contiguous in the text.
_WSC_UNFIXABLE = ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin")


def _fix_wsc_span(text: str, span: str, index: int) -> str:
    """Make a raw-WSC span a substring of its text, the way HF's ``super_glue/wsc.fixed`` does.

    Raw WSC spans often differ from the text only by the case of their first letter ("The boy" for
    "the boy"), a trailing period or a newline. wsc.fixed (what MeZO used) matches the first
    letter's case to the word at ``span*_index``, drops trailing periods and turns newlines into
    spaces. Spans already in the text are kept.
    """
    if span in text or span in _WSC_UNFIXABLE:
        return span
    words = text.split()
    if 0 <= index < len(words) and span:
        first = words[index]
        span = (span[0].lower() if first[0].islower() else span[0].upper()) + span[1:]
    return span.rstrip(".").replace("\n", " ")


def _load_wsc(path: Path) -> list[Row]:
    """Raw SuperGLUE WSC (spans nested under ``target``) -> HF ``wsc.fixed``-style flat rows."""
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        text = _field(rec, "text", where)
        target = _field(rec, "target", where)
        row = {"text": text}
        for k in ("span1", "span2"):
            index = int(_field(target, f"{k}_index", f"{where} (target)"))
            raw = _field(target, f"{k}_text", f"{where} (target)")
            row[f"{k}_index"] = index
            row[f"{k}_text"] = _fix_wsc_span(text, raw, index)
        row["label"] = _class_index(_field(rec, "label", where), ("False", "True"), where)
        row["idx"] = rec.get("idx", len(rows))
        rows.append(row)
    return rows


def _load_multirc(path: Path) -> list[Row]:
    """MultiRC passages flattened to one row per (question, answer option), in HF's order."""
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        passage = _field(rec, "passage", where)
        paragraph = _field(passage, "text", f"{where} (passage)")
        for q in _field(passage, "questions", f"{where} (passage)"):
            qwhere = f"{where} (question {q.get('idx')})"
            question = _field(q, "question", qwhere)
            for a in _field(q, "answers", qwhere):
                awhere = f"{qwhere} (answer {a.get('idx')})"
                label = _field(a, "label", awhere)
                rows.append(
                    {
                        "paragraph": paragraph,
                        "question": question,
                        "answer": _field(a, "text", awhere),
                        "label": _class_index(bool(label), ("False", "True"), awhere),
                        "idx": {"paragraph": rec.get("idx"), "question": q.get("idx"), "answer": a.get("idx")},
                    }
                )
    return rows


def _load_copa(path: Path) -> list[Row]:
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        question = _field(rec, "question", where)
        if question not in ("cause", "effect"):
            raise DataFormatError(f"{where}: field 'question' = {question!r} is not 'cause' or 'effect'")
        rows.append(
            {
                "premise": _field(rec, "premise", where),
                "choice1": _field(rec, "choice1", where),
                "choice2": _field(rec, "choice2", where),
                "question": question,
                "label": _class_index(_field(rec, "label", where), ("0", "1"), where),
                "idx": rec.get("idx", len(rows)),
            }
        )
    return rows


def _load_record(path: Path) -> list[Row]:
    """ReCoRD (SuperGLUE jsonl) flattened to one row per query, as HF ``super_glue/record``.

    Candidates are the passage's entity strings (``text[start:end+1]``, ``end`` is inclusive),
    sorted and de-duplicated; answers likewise. Sorting is what HF does, and it makes
    ``answers[0]`` (the answer MeZO trains on) deterministic.
    """
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        passage = _field(rec, "passage", where)
        text = _field(passage, "text", f"{where} (passage)")
        entities = sorted({text[e["start"] : e["end"] + 1] for e in _field(passage, "entities", f"{where} (passage)")})
        for qa in _field(rec, "qas", where):
            qwhere = f"{where} (query {qa.get('idx')})"
            answers = sorted({_field(a, "text", qwhere) for a in _field(qa, "answers", qwhere)})
            if not answers:
                raise DataFormatError(f"{qwhere}: field 'answers' is empty (only the unlabeled test file has none)")
            missing = [a for a in answers if a not in entities]
            if missing:
                raise DataFormatError(f"{qwhere}: answers {missing} are not among the passage entities")
            rows.append(
                {
                    "passage": text,
                    "query": _field(qa, "query", qwhere),
                    "entities": entities,
                    "answers": answers,
                    "idx": {"passage": rec.get("idx"), "query": qa.get("idx")},
                }
            )
    return rows


def _load_squad(path: Path) -> list[Row]:
    """SQuAD v1.1 json -> one row per question (HF ``squad`` order); ``answers`` keeps duplicates."""
    data = _field(_read_json(path), "data", str(path))
    rows = []
    for article in data:
        title = _field(article, "title", f"{path} (article)")
        for para in _field(article, "paragraphs", f"{path} (article {title!r})"):
            context = _field(para, "context", f"{path} (article {title!r})")
            for qa in _field(para, "qas", f"{path} (article {title!r})"):
                where = f"{path} (question id {qa.get('id')!r})"
                answers = [_field(a, "text", where) for a in _field(qa, "answers", where)]
                if not answers:
                    raise DataFormatError(f"{where}: field 'answers' is empty")
                rows.append(
                    {"id": qa.get("id"), "title": title, "context": context, "question": _field(qa, "question", where), "answers": answers}
                )
    return rows


def _drop_answer_strings(answer: Row) -> Optional[list[str]]:
    """One DROP answer dict -> its strings, as HF ``drop``'s ``answers_spans.spans``.

    A number gives ``[number]``, a date ``["day month year"]`` (parts joined by spaces, then
    stripped), spans give each span, an empty answer ``[]``. An answer that mixes kinds gives
    ``None`` (HF's builder rejects the whole question then).
    """
    date = answer.get("date") or {}
    date_str = " ".join(date.get(k, "") for k in ("day", "month", "year")).strip()
    number, spans = answer.get("number", ""), list(answer.get("spans") or [])
    kinds = sum([number != "", date_str != "", bool(spans)])
    if kinds > 1:
        return None
    if number != "":
        return [number]
    if date_str:
        return [date_str]
    return spans


def _load_drop(path: Path, validated: bool) -> list[Row]:
    """DROP json (``{section_id: {passage, qa_pairs}}``) -> one row per question, as HF ``drop``.

    HF takes ``answer`` in train and ``validated_answers`` in dev, and skips a question when one of
    its answers mixes kinds or when all of them together give no string (9 in train, 1 in dev). We do
    the same and log how many were skipped.
    """
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object keyed by section id")
    rows, skipped = [], 0
    for section_id, section in data.items():
        where = f"{path} (section {section_id!r})"
        passage = _field(section, "passage", where)
        for qa in _field(section, "qa_pairs", where):
            qwhere = f"{where} (query {qa.get('query_id')!r})"
            raw = _field(qa, "validated_answers", qwhere) if validated else [_field(qa, "answer", qwhere)]
            parts = [_drop_answer_strings(a) for a in raw]
            if any(p is None for p in parts) or not any(parts):
                skipped += 1
                continue
            rows.append(
                {
                    "section_id": section_id,
                    "query_id": qa.get("query_id"),
                    "passage": passage,
                    "question": _field(qa, "question", qwhere),
                    "answers": [s for p in parts for s in p],
                }
            )
    if skipped:
        log.info("%s: skipped %d questions with empty or mixed answers (as HF drop does)", path, skipped)
    return rows


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after ``####``, commas removed ("1,000" -> "1000")."""
    _, sep, tail = solution.rpartition("####")
    if not sep:
        raise ValueError("no '####' marker")
    return tail.strip().replace(",", "")


def _load_gsm8k(path: Path) -> list[Row]:
    rows = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        solution = _field(rec, "answer", where)
        try:
            final = gsm8k_final_answer(solution)
        except ValueError:
            raise DataFormatError(f"{where}: field 'answer' has no '#### <number>' final answer") from None
        rows.append({"question": _field(rec, "question", where), "answer": solution, "final_answer": final})
    return rows


# ----------------------------------------------------------------------------------------------
# Task registry


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files live under the data root, where they come from, and how to read them.

    ``train_file`` / ``valid_file`` are relative to the data root; ``origin`` is the official
    download, named in the error raised when a file is missing.
    """

    name: str
    train_file: str
    valid_file: str
    origin: str
    load_train: Callable[[Path], list[Row]]
    load_valid: Callable[[Path], list[Row]]
    num_dev: int = 500  # MeZO's default; 100 for CB and COPA (fewer than 1000 train rows)
    note: str = ""


def _same(fn: Callable[[Path], list[Row]]) -> tuple[Callable[[Path], list[Row]], Callable[[Path], list[Row]]]:
    return fn, fn


def _superglue(task: str, folder: str, loader: Callable[[Path], list[Row]], **kw: Any) -> TaskSpec:
    return TaskSpec(
        task, f"superglue/{folder}/train.jsonl", f"superglue/{folder}/val.jsonl",
        f"the SuperGLUE {folder} release ({_SUPERGLUE_V2}/{folder}.zip: train.jsonl, val.jsonl)",
        *_same(loader), **kw,
    )  # fmt: skip


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2", "glue_sst2/train.tsv", "glue_sst2/dev.tsv",
        "the GLUE SST-2 release (https://dl.fbaipublicfiles.com/glue/data/SST-2.zip: train.tsv, dev.tsv)",
        *_same(_load_sst2),
    ),
    "rte": _superglue("rte", "RTE", _superglue_pairs(("entailment", "not_entailment"))),
    "cb": _superglue("cb", "CB", _superglue_pairs(("entailment", "contradiction", "neutral")), num_dev=100),
    "boolq": _superglue(
        "boolq", "BoolQ", _load_boolq,
        note="Google's release works too (https://storage.googleapis.com/boolq/train.jsonl, dev.jsonl). "
        "The project's shared data has no BoolQ train file.",
    ),
    "wic": _superglue("wic", "WiC", _load_wic),
    "wsc": _superglue("wsc", "WSC", _load_wsc),
    "multirc": _superglue("multirc", "MultiRC", _load_multirc),
    "copa": _superglue("copa", "COPA", _load_copa, num_dev=100),
    "record": _superglue("record", "ReCoRD", _load_record, note="The project's shared data has no ReCoRD."),
    "squad": TaskSpec(
        "squad", "squad_v1.1/train-v1.1.json", "squad_v1.1/dev-v1.1.json",
        "SQuAD v1.1 (https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json, dev-v1.1.json)",
        *_same(_load_squad), note="The project's shared data has only dev-v1.1.json.",
    ),
    "drop": TaskSpec(
        "drop", "drop/drop_dataset_train.json", "drop/drop_dataset_dev.json",
        "the DROP release (https://s3-us-west-2.amazonaws.com/allennlp/datasets/drop/drop_dataset.zip)",
        lambda p: _load_drop(p, validated=False), lambda p: _load_drop(p, validated=True),
        note="The project's shared data has no DROP.",
    ),
    "gsm8k": TaskSpec(
        "gsm8k", "gsm8k/train.jsonl", "gsm8k/test.jsonl",
        "openai/grade-school-math (grade_school_math/data/train.jsonl, test.jsonl); GSM8K has no "
        "validation split, so its test file plays that role",
        *_same(_load_gsm8k),
    ),
}  # fmt: skip

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task`` (case-insensitive); unknown names list the known ones."""
    spec = TASKS.get(task.lower())
    if spec is None:
        raise ValueError(f"unknown MeZO task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    return spec


def resolve_file(task: str, which: str, data_dir: Optional[str | os.PathLike] = None, path: Optional[str | os.PathLike] = None) -> Path:
    """The file for ``which`` in {"train", "valid"}: ``path`` if given, else ``<data_dir>/<layout path>``.

    ``data_dir`` defaults to the shared data folder (``$LORASC_SHARED_DATA``). A missing file raises
    :class:`MissingDataError` naming the file, its official source and how to point at a copy.
    """
    spec = get_task(task)
    if which not in ("train", "valid"):
        raise ValueError(f"which must be 'train' or 'valid', got {which!r}")
    rel = spec.train_file if which == "train" else spec.valid_file
    if path is not None:
        candidate = Path(path).expanduser()
    else:
        candidate = (Path(data_dir).expanduser() if data_dir is not None else shared_data_dir()) / rel
    if not candidate.is_file():
        arg = "train_file" if which == "train" else "valid_file"
        role = "train split (MeZO's train and validation rows)" if which == "train" else "validation split (MeZO's test rows)"
        raise MissingDataError(
            f"{spec.name}: the {role} file {candidate} does not exist. It comes from {spec.origin}. "
            + (spec.note + " " if spec.note else "")
            + f"Download it and put it at <data_dir>/{rel} (data_dir defaults to ${SHARED_DATA_ENV}, "
            f"else ../shared/data), or pass {arg}=<path to your copy>."
        )
    return candidate


def load_rows(task: str, which: str, data_dir: Optional[str | os.PathLike] = None, path: Optional[str | os.PathLike] = None) -> list[Row]:
    """All rows of a task's ``which`` ("train" or "valid") file, see :func:`resolve_file`."""
    spec = get_task(task)
    file = resolve_file(task, which, data_dir, path)
    rows = (spec.load_train if which == "train" else spec.load_valid)(file)
    if not rows:
        raise DataFormatError(f"{file}: no rows")
    return rows


# ----------------------------------------------------------------------------------------------
# Sampling


def seeded_permutation(n: int, seed: int) -> list[int]:
    """MeZO's permutation: equal to ``np.random.seed(seed); np.random.permutation(n)``, without global state."""
    return np.random.RandomState(seed).permutation(n).tolist()


def sample_subset(rows: Sequence[Row], seed: int, num: int) -> list[Row]:
    """The first ``num`` rows of the seeded permutation (all rows, permuted, when fewer exist)."""
    return [rows[i] for i in seeded_permutation(len(rows), seed)[:num]]


@dataclass
class MezoSplits:
    """The three MeZO splits. ``None`` for a part whose source rows were not given."""

    train: Optional[list[Row]]
    validation: Optional[list[Row]]
    test: Optional[list[Row]]


def mezo_split(
    rows_train: Optional[Sequence[Row]],
    rows_valid: Optional[Sequence[Row]],
    seed: int,
    num_train: int = 1000,
    num_dev: int = 500,
    num_eval: int = 1000,
) -> MezoSplits:
    """Sample MeZO's train / validation / test from a task's train and validation rows.

    train + validation = ``sample_subset(rows_train, seed, num_train + num_dev)``; validation is its
    last ``num_dev`` rows and train the rest (so with fewer than ``num_train + num_dev`` rows, as CB
    and COPA have, train shrinks and validation keeps its size). test =
    ``sample_subset(rows_valid, seed, num_eval)``. Either source may be ``None`` (that part is then
    ``None``), so evaluation does not need a train file.

    ``num_dev=0`` gives an empty validation split. (MeZO's ``train[-0:]`` slicing would have made
    the whole pool the dev set; nobody runs that setting, so we do the sensible thing.)
    """
    for name, v in (("num_train", num_train), ("num_dev", num_dev), ("num_eval", num_eval)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    train = validation = test = None
    if rows_train is not None:
        pool = sample_subset(rows_train, seed, num_train + num_dev)
        if num_dev and len(pool) <= num_dev:
            raise ValueError(f"only {len(pool)} train rows for num_dev={num_dev}: no training rows would remain")
        cut = len(pool) - num_dev
        train, validation = pool[:cut], pool[cut:]
    if rows_valid is not None:
        test = sample_subset(rows_valid, seed, num_eval)
    return MezoSplits(train, validation, test)


SPLIT_ALIASES = {"train": "train", "validation": "validation", "dev": "validation", "test": "test", "eval": "test"}


def load_split(
    task: str,
    split: str,
    seed: int = 0,
    num_train: int = 1000,
    num_dev: Optional[int] = None,
    num_eval: int = 1000,
    data_dir: Optional[str | os.PathLike] = None,
    train_file: Optional[str | os.PathLike] = None,
    valid_file: Optional[str | os.PathLike] = None,
) -> list[Row]:
    """One MeZO split of a task as rows, reading only the file that split needs.

    ``split``: "train", "validation" (alias "dev") or "test" (alias "eval"). ``num_dev=None`` uses
    the task's MeZO default (500; 100 for CB and COPA).
    """
    key = SPLIT_ALIASES.get(split)
    if key is None:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_ALIASES)}")
    spec = get_task(task)
    num_dev = spec.num_dev if num_dev is None else num_dev
    if key == "test":
        rows_train, rows_valid = None, load_rows(task, "valid", data_dir, valid_file)
    else:
        rows_train, rows_valid = load_rows(task, "train", data_dir, train_file), None
    splits = mezo_split(rows_train, rows_valid, seed, num_train, num_dev, num_eval)
    return getattr(splits, key)
