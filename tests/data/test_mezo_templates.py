"""Prompt rendering: one golden example per task (``mezo_golden.GOLDEN``), checked by eye against
MeZO's templates and frozen: MeZO's full verbalized text for every candidate (prompt + choice) and
the gold. Real rows from every task file must also render.
"""

from pathlib import Path

import pytest

from lorasc_tune.data.mezo import load_rows
from lorasc_tune.data.templates import RENDERERS, render
from mezo_golden import GOLDEN  # tests/data is on sys.path under pytest
from shared_paths import VALIDATION_FILES

FIXTURES = Path(__file__).parent / "fixtures"


def test_every_task_has_a_golden_case():
    assert set(GOLDEN) == set(RENDERERS)


@pytest.mark.parametrize("task", sorted(GOLDEN))
def test_golden_rendering(task):
    row, verbalized, gold = GOLDEN[task]
    ex = render(task, row)
    if gold is None:  # generation: prompt + target is MeZO's verbalized text with the first answer
        assert ex.choices is None and ex.gold is None
        assert [ex.prompt + ex.target] == verbalized
        assert ex.prompt.endswith("Answer:") and ex.target.endswith("\n")
        assert ex.answers == row.get("answers", [row.get("final_answer")])
    else:
        assert [ex.prompt + c for c in ex.choices] == verbalized
        assert ex.gold == gold
        first = gold[0] if isinstance(gold, list) else gold
        assert ex.target == ex.choices[first]


def test_copa_effect_conjunction_and_capitalization():
    row = {"premise": "The woman retired", "choice1": "She received her pension.", "choice2": "I paid.", "question": "effect", "label": 0}
    ex = render("copa", row)
    assert ex.prompt == "The woman retired so"
    assert ex.choices == [" she received her pension.", " I paid."]


def test_boolq_keeps_existing_question_mark():
    ex = render("boolq", {"question": "is it?", "passage": "P.", "answer": True})
    assert ex.prompt == "P. Is it?\n" and ex.target == "Yes"


def test_missing_template_field_names_it():
    with pytest.raises(ValueError, match="rte: row is missing field 'hypothesis'"):
        render("rte", {"premise": "x", "label": 0})


@pytest.mark.parametrize("task", sorted(VALIDATION_FILES))
def test_every_real_validation_row_renders(task, shared_data):
    path = shared_data(*VALIDATION_FILES[task])
    for row in load_rows(task, "valid", path=path):
        ex = render(task, row)
        assert ex.prompt and ex.target


@pytest.mark.parametrize("task", ["record", "drop"])
def test_every_fixture_row_renders(task):
    for which in ("train", "valid"):
        for row in load_rows(task, which, data_dir=FIXTURES):
            ex = render(task, row)
            assert ex.prompt and ex.target
