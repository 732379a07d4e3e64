"""MeZO's prompt templates, one small function per task, rendering a row into an :class:`Example`.

The wording follows MeZO's ``large_models/templates.py`` (template version 0 for every task, except
BoolQ whose MeZO default is version 2: a newline before the answer; ReCoRD uses MeZO's GPT-3-style
template). GSM8K is not a MeZO task; its template is ours ("Question: ...\\nAnswer: <number>").

MeZO renders a row twice, without the answer (``prompt``) and with it, strips spaces (not
newlines) from both ends of each, and trains/scores the tokens the second has beyond the first. We
keep that as text: ``choices[i]`` is the verbalized text for candidate ``i`` minus the prompt, so
``prompt + choices[i]`` is exactly MeZO's verbalized string, and lm-eval can score
``loglikelihood(prompt, choices[i])`` with an empty target delimiter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

Row = dict[str, Any]


@dataclass
class Example:
    """A rendered row.

    Attributes:
        prompt: text before the answer (MeZO's ``encode(...).strip(" ")``).
        target: the continuation trained on: ``choices[gold]`` (first gold for ReCoRD) for
            classification / multiple choice, ``" <answer>\\n"`` for generation tasks.
        choices: continuations, one per candidate, for classification / multiple choice; ``None``
            for generation tasks.
        gold: index of the right choice, a list of indices when several are right (ReCoRD), or
            ``None`` for generation tasks.
        answers: the gold answer strings of a generation task (all of them, scored by max F1 / EM);
            empty for classification.
    """

    prompt: str
    target: str
    choices: Optional[list[str]] = None
    gold: Union[int, list[int], None] = None
    answers: list[str] = field(default_factory=list)


def _mc(prompt: str, verbalized: Sequence[str], gold: Union[int, list[int]]) -> Example:
    """Build a classification / multiple-choice example from MeZO's two renderings.

    ``prompt`` and each ``verbalized[i]`` are stripped of spaces, as MeZO does, and each choice is
    the verbalized text after the prompt. A verbalization that does not start with the prompt is a
    template bug, so it raises.
    """
    # MeZO strips spaces from each rendering, then left-strips the final (demo-less) input.
    prompt = prompt.strip(" ").lstrip()
    choices = []
    for v in verbalized:
        v = v.strip(" ").lstrip()
        if not v.startswith(prompt) or len(v) == len(prompt):
            raise ValueError(f"verbalized text does not extend the prompt:\n{prompt!r}\n{v!r}")
        choices.append(v[len(prompt) :])
    first = gold[0] if isinstance(gold, list) else gold
    return Example(prompt=prompt, target=choices[first], choices=choices, gold=gold)


def _gen(prompt: str, answers: Sequence[str]) -> Example:
    """A generation example: trained on ``" <first answer>\\n"`` (MeZO ends the answer with a newline)."""
    prompt = prompt.strip(" ").lstrip()
    return Example(prompt=prompt, target=f" {answers[0]}\n", answers=list(answers))


# ----------------------------------------------------------------------------------------------
# Classification (verbalizer word after the prompt)


def render_sst2(row: Row) -> Example:
    """``<sentence> It was`` + `` terrible`` / `` great``."""
    text = row["sentence"].strip()
    prompt = f"{text} It was"
    return _mc(prompt, [f"{prompt} {w}" for w in ("terrible", "great")], row["label"])


def render_rte(row: Row) -> Example:
    """PromptSource: ``<premise>\\nDoes this mean that "<hypothesis>" is true? Yes or No?\\n`` + Yes/No."""
    prompt = f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"
    return _mc(prompt, [prompt + w for w in ("Yes", "No")], row["label"])


def render_cb(row: Row) -> Example:
    """PromptSource: ``Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\\n`` + Yes/No/Maybe."""
    prompt = f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"
    return _mc(prompt, [prompt + w for w in ("Yes", "No", "Maybe")], row["label"])


def render_boolq(row: Row) -> Example:
    """``<passage> <Question>?\\n`` + Yes/No (question capitalized, "?" added when missing)."""
    question = row["question"]
    if not question.endswith("?"):
        question += "?"
    question = question[0].upper() + question[1:]
    prompt = f"{row['passage']} {question}\n"
    return _mc(prompt, [prompt + w for w in ("Yes", "No")], 0 if row["answer"] else 1)


def render_wic(row: Row) -> Example:
    """PromptSource: ``Does the word "<w>" have the same meaning in these two sentences? Yes, No?\\n<s1>\\n<s2>\\n`` + No/Yes."""
    prompt = (
        f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
        f"{row['sentence1']}\n{row['sentence2']}\n"
    )
    return _mc(prompt, [prompt + w for w in ("No", "Yes")], row["label"])


def render_wsc(row: Row) -> Example:
    """PromptSource: ``<text>\\nIn the previous sentence, does the pronoun "<span2 lower>" refer to <span1>? Yes or No?\\n`` + No/Yes."""
    prompt = (
        f"{row['text']}\nIn the previous sentence, does the pronoun \"{row['span2_text'].lower()}\" "
        f"refer to {row['span1_text']}? Yes or No?\n"
    )
    return _mc(prompt, [prompt + w for w in ("No", "Yes")], row["label"])


def render_multirc(row: Row) -> Example:
    """PromptSource: ``<paragraph>\\nQuestion: <q>\\nI found this answer "<a>". Is that correct? Yes or No?\\n`` + No/Yes."""
    prompt = (
        f"{row['paragraph']}\nQuestion: {row['question']}\n"
        f"I found this answer \"{row['answer']}\". Is that correct? Yes or No?\n"
    )
    return _mc(prompt, [prompt + w for w in ("No", "Yes")], row["label"])


# ----------------------------------------------------------------------------------------------
# Multiple choice (the candidate text itself is the answer)


def _copa_choice(choice: str) -> str:
    """MeZO's "correct" capitalization: lower-case the first word of a choice unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def render_copa(row: Row) -> Example:
    """``<premise without final ".">`` + `` because`` (cause) / `` so`` (effect) + `` <choice, first word lower-cased>``."""
    premise = row["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    conj = " because " if row["question"] == "cause" else " so "
    prompt = premise + conj
    return _mc(prompt, [prompt + _copa_choice(row[c]) for c in ("choice1", "choice2")], row["label"])


def render_record(row: Row) -> Example:
    """MeZO's GPT-3-style ReCoRD template: highlights become "- " bullets, the query is the last bullet.

    Prompt ``<passage>\\n-``; candidate ``i`` continues with `` <query, @placeholder := entity i>``,
    so the whole completed query sentence is what is trained and scored.
    """
    passage = row["passage"].replace("@highlight\n", "- ")
    prompt = f"{passage}\n-"
    verbalized = [f"{passage}\n- {row['query'].replace('@placeholder', e)}" for e in row["entities"]]
    gold = [row["entities"].index(a) for a in row["answers"]]
    return _mc(prompt, verbalized, gold)


# ----------------------------------------------------------------------------------------------
# Generation


def render_squad(row: Row) -> Example:
    """``Title: <t>\\nContext: <c>\\nQuestion: <q>\\nAnswer:`` + `` <first answer>\\n``."""
    prompt = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return _gen(prompt, row["answers"])


def render_drop(row: Row) -> Example:
    """``Passage: <p>\\nQuestion: <q>\\nAnswer:`` + `` <first answer span>\\n``."""
    prompt = f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return _gen(prompt, row["answers"])


def render_gsm8k(row: Row) -> Example:
    """Ours (MeZO has no GSM8K): ``Question: <q>\\nAnswer:`` + `` <final number>\\n``; direct answer, no rationale."""
    prompt = f"Question: {row['question'].strip()}\nAnswer:"
    return _gen(prompt, [row["final_answer"]])


RENDERERS: dict[str, Callable[[Row], Example]] = {
    "sst2": render_sst2,
    "rte": render_rte,
    "cb": render_cb,
    "boolq": render_boolq,
    "wsc": render_wsc,
    "wic": render_wic,
    "multirc": render_multirc,
    "copa": render_copa,
    "record": render_record,
    "squad": render_squad,
    "drop": render_drop,
    "gsm8k": render_gsm8k,
}

GENERATION_TASKS = frozenset({"squad", "drop", "gsm8k"})


def render(task: str, row: Row) -> Example:
    """Render ``row`` of ``task``; a row lacking a template field raises naming the task and field."""
    try:
        fn = RENDERERS[task.lower()]
    except KeyError:
        raise ValueError(f"no template for task {task!r}; known: {', '.join(RENDERERS)}") from None
    try:
        return fn(row)
    except KeyError as e:
        raise ValueError(f"{task}: row is missing field {e.args[0]!r} needed by the template: {str(row)[:200]}") from None
