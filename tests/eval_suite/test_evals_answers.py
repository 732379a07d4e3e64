"""Answer extraction and metrics on hand-written edge cases, and InstructEval's prompt layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.instructeval import answers as A
from evals.instructeval import data as D

DROP_FIXTURE = Path(__file__).parent / "fixtures" / "drop" / "drop_dataset_dev.json"


@pytest.mark.parametrize("generation, expected", [
    ("She has 3 apples and buys 4 more, so 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,234", "1234"),                                   # comma thousands
    ("The total is $1,200.50 in the end.", "1200.5"),         # dollars, decimals, last number
    ("It drops by 5 degrees to -12.", "-12"),                 # negative
    ("#### -3\n\nQuestion: 5 + 5?", "-3"),                     # the number after #### wins
    ("Pages 3-4 were read", "4"),                             # a range is not a negative number
    ("He counted 1,2,3 sheep", "3"),                          # not 123: groups need 3 digits
    ("10 boxes of 12 eggs hold 120 eggs. The answer is 120.", "120"),
    ("1,000,000 people", "1000000"),
    ("7.50 dollars", "7.5"),
    ("no numbers here", None),
])
def test_gsm8k_final_number(generation, expected):
    assert A.gsm8k_final_number(generation) == expected


def test_gsm8k_exact_match():
    assert A.gsm8k_exact_match("so #### 18", "18")
    assert A.gsm8k_exact_match("The answer is 1,080.", "1080")
    assert A.gsm8k_exact_match("#### 5.00", "5")
    assert not A.gsm8k_exact_match("#### 17", "18")
    assert not A.gsm8k_exact_match("", "0")
    assert A.gsm8k_exact_match("It lost -4 points", "-4")
    assert not A.gsm8k_exact_match("It lost 4 points", "-4")


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("2570", [["2570"], ["2,570"]], 1.0, 1.0),
    ("2,570 residents", [["2570"]], 0.0, pytest.approx(2 / 3)),   # number matches, extra word
    ("1000", [["1,000"]], 1.0, 1.0),
    ("-12", [["-12"]], 1.0, 1.0),
    ("12", [["-12"]], 0.0, 0.0),                                    # the sign matters
    ("The Hawks", [["the Hawks"], ["Hawks"]], 1.0, 1.0),             # articles, case
    ("4 June 1994", [["4 June 1994"]], 1.0, 1.0),
    ("42 yards", [["35"]], 0.0, 0.0),                                # wrong number: F1 is 0
    ("Eli Park", [["Eli Park", "Sam Reyes"]], 0.0, 0.5),             # one of two spans
    ("well-known", [["well known"]], 1.0, 1.0),
])
def test_drop_em_f1(pred, golds, em, f1):
    got_em, got_f1 = A.drop_em_f1(pred, golds)
    assert got_em == em and got_f1 == f1


def test_drop_multi_span_prediction_and_extraction():
    assert A.drop_em_f1(["Sam Reyes", "Eli Park"], [["Eli Park", "Sam Reyes"]]) == (1.0, 1.0)
    assert A.drop_prediction("  42\nQuestion: next") == "42"
    assert A.drop_prediction("\n\n the Hawks \n") == "the Hawks"
    assert A.drop_normalize("The 1,000 U.S. soldiers!") == "1000 us soldiers"


def test_drop_loader_follows_instructeval_protocol():
    rows = D.read_drop(DROP_FIXTURE)
    assert len(rows) == 14  # every fixture question has validated answers
    shots, test = D.split_drop(rows)
    assert len(shots) == 3
    # fixture-q04 (two distinct validated spans) is left out; no test question shares a shot's passage
    assert "fixture-q04" not in {r["query_id"] for r in shots + test}
    assert not {r["passage"] for r in shots} & {r["passage"] for r in test}
    ds = D.load_drop(drop_path=str(DROP_FIXTURE))["test"]
    assert len(ds) == len(test) > 0
    doc = ds[0]
    expected_prefix = "".join(f"{s['passage'].strip()} {s['question'].strip()}\nAnswer: {s['answers'][0]}\n\n"
                              for s in shots)
    assert doc["prompt"].startswith(expected_prefix) and doc["prompt"].endswith("\nAnswer:")
    # the gold string is the validated one: q01 was validated as "2,570" (main answer "2570")
    labels = {r["query_id"]: D.drop_label(r) for r in rows}
    assert labels["fixture-q01"] == "2,570" and labels["fixture-q06"] == "Hawks"


def test_mmlu_and_bbh_prompts(shared_data):
    root = shared_data("mmlu")
    ds = D.load_mmlu("high_school_biology", mmlu_path=str(root))["test"]
    prompt = ds[0]["prompt"]
    assert prompt.startswith("The following are multiple choice questions (with answers) about  high school biology.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. " + D.read_mmlu_csv(
        root / "test" / "high_school_biology_test.csv")[0]["choices"][3] + "\nAnswer:")
    dev0 = D.read_mmlu_csv(root / "dev" / "high_school_biology_dev.csv")[0]
    assert f"{dev0['question']}\nA. {dev0['choices'][0]}" in prompt and ds[0]["label"] in "ABCD"
    assert A.starts_with_answer(" B\n", "B") and not A.starts_with_answer(" C", "B")

    bbh = D.load_bbh("navigate", bbh_path=str(shared_data("bbh", "bbh")))["test"]
    assert len(bbh) == 250 - 3
    assert bbh[0]["prompt"].count("\nAnswer:") == 4 and bbh[0]["prompt"].endswith("\nAnswer:")


def test_gsm8k_prompt(shared_data):
    ds = D.load_gsm8k(gsm8k_path=str(shared_data("gsm8k")))["test"]
    assert len(ds) == 1319
    prompt = ds[0]["prompt"]
    assert prompt.count("Question: ") == 9 and prompt.count("#### ") == 8 and "<<" not in prompt
    assert prompt.startswith("Question: Natalia sold clips") and prompt.endswith("\nAnswer:")
    assert ds[0]["target"] == "18"


def test_missing_data_names_file_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LORASC_EVAL_DROP_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="LORASC_EVAL_DROP_PATH") as err:
        D.load_drop(data_dir=str(tmp_path))
    assert str(tmp_path / "drop" / "drop_dataset_dev.json") in str(err.value)
    monkeypatch.setenv("LORASC_EVAL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LORASC_EVAL_DATA"):
        D.load_gsm8k()
