"""InstructEval fidelity and input checks, each against values worked out by hand:

* DROP: gold answers from validated answers only, InstructEval's keep rule, its shot draw and its
  ``startswith`` score;
* HumanEval: InstructEval's instruction line and completion clean-up;
* MMLU csv: Hendrycks' original release and the reformatted copy;
* model loading: config.json settings that ``llama2(...)`` cannot build;
* the eval recipe: ``tasks``/``data``/top-level keys checked before the model is built;
* reports written atomically.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
from omegaconf import OmegaConf

from evals import TASKS_DIR
from evals.instructeval import answers as A
from evals.instructeval import data as D


def _task_utils(folder: str):
    """The lm-eval hooks module a task YAML points at (``evals/tasks/<folder>/utils.py``)."""
    spec = importlib.util.spec_from_file_location(f"{folder}_task_utils", TASKS_DIR / folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- DROP -----------------------------------------------------------------------------------

_NO_DATE = {"day": "", "month": "", "year": ""}


def _number(n):
    return {"number": n, "date": dict(_NO_DATE), "spans": []}


def _spans(*spans):
    return {"number": "", "date": dict(_NO_DATE), "spans": list(spans)}


def _qa(qid, answer, validated):
    return {"question": f"Question {qid}?", "answer": answer, "query_id": qid, "validated_answers": validated}


# Four passages; each question's fate under InstructEval (HF drop validation split + drop.py filter):
DROP_VALIDATORS = {
    "alpha": {"passage": "Alpha passage.", "wiki_url": "", "qa_pairs": [
        _qa("q1", _number("7"), [_number("7"), _number("7")]),            # kept: "7"
        _qa("q2", _number("7"), [_number("7"), _number("8")]),            # dropped: validators disagree
        _qa("q3", _spans("Hawks"), [_spans("the Hawks"), _spans(" the Hawks ")]),  # kept: "the Hawks" (stripped)
    ]},
    "beta": {"passage": "Beta passage.", "wiki_url": "", "qa_pairs": [
        _qa("q4", _number("12"), []),                                     # dropped: no validated answer
        _qa("q5", _number("12"), [_spans("twelve")]),                     # kept: "twelve", not the main "12"
        _qa("q6", _spans("Eli Park"), [_spans("Eli Park", "Sam Reyes")]),  # dropped: two distinct spans
        _qa("q7", _number(""), [{"number": "", "date": {"day": "4", "month": "June", "year": "1994"},
                                 "spans": []}] * 2),                      # kept: "4 June 1994"
    ]},
    "gamma": {"passage": "Gamma passage.", "wiki_url": "", "qa_pairs": [
        _qa("q8", _number("2570"), [_number("2,570")]),                   # kept: "2,570"
        _qa("q9", _number("5"), [{"number": "5", "date": dict(_NO_DATE), "spans": ["five"]}]),  # dropped: mixed kinds
        _qa("q10", _spans("Aldo"), [_spans("Aldo"), _spans("Aldo"), _spans("Brenn")]),  # dropped: 2 of 3 agree
    ]},
    "delta": {"passage": "Delta passage.", "wiki_url": "", "qa_pairs": [
        _qa("q11", _spans("Brenn"), [_spans("Brenn", "Brenn")]),          # kept: one distinct string
    ]},
}
KEPT = ["q1", "q3", "q5", "q7", "q8", "q11"]  # file order
LABELS = {"q1": "7", "q3": "the Hawks", "q5": "twelve", "q7": "4 June 1994", "q8": "2,570", "q11": "Brenn"}
PASSAGE_OF = {"q1": "alpha", "q3": "alpha", "q5": "beta", "q7": "beta", "q8": "gamma", "q11": "delta"}


@pytest.fixture
def drop_validators_file(tmp_path):
    path = tmp_path / "drop_dataset_dev.json"
    path.write_text(json.dumps(DROP_VALIDATORS), encoding="utf-8")
    return path


def test_drop_keeps_only_questions_whose_validators_agree(drop_validators_file):
    rows = D.read_drop(drop_validators_file)
    # q4 (no validated answer) and q9 (number and span in one answer) are skipped when read, as HF does
    assert [r["query_id"] for r in rows] == ["q1", "q2", "q3", "q5", "q6", "q7", "q8", "q10", "q11"]
    shots, test = D.split_drop(rows, shots=0)
    assert shots == [] and [r["query_id"] for r in test] == KEPT
    assert {r["query_id"]: D.drop_label(r) for r in test} == LABELS


def test_drop_shots_follow_instructeval_draw(drop_validators_file):
    # InstructEval: random.seed(0); random.sample(kept, k=3); test = kept rows on other passages.
    state = random.getstate()
    try:
        random.seed(0)
        expected_shots = random.sample(KEPT, k=3)
    finally:
        random.setstate(state)
    used = {PASSAGE_OF[q] for q in expected_shots}
    expected_test = [q for q in KEPT if PASSAGE_OF[q] not in used]

    shots, test = D.split_drop(D.read_drop(drop_validators_file))
    assert [r["query_id"] for r in shots] == expected_shots
    assert [r["query_id"] for r in test] == expected_test

    docs = D.load_drop(drop_path=str(drop_validators_file))["test"]
    prefix = "".join(f"{DROP_VALIDATORS[PASSAGE_OF[q]]['passage']} Question {q}?\nAnswer: {LABELS[q]}\n\n"
                     for q in expected_shots)
    assert [d["query_id"] for d in docs] == expected_test
    for doc in docs:
        q = doc["query_id"]
        assert doc["prompt"] == prefix + f"{DROP_VALIDATORS[PASSAGE_OF[q]]['passage']} Question {q}?\nAnswer:"
        assert doc["label"] == LABELS[q]


def test_drop_score_is_instructeval_startswith(drop_validators_file):
    hooks = _task_utils("drop")
    docs = {d["query_id"]: d for d in D.load_drop(shots=0, drop_path=str(drop_validators_file))["test"]}
    generations = {
        "q1": " 7 points\n",          # starts with "7"                      -> 1
        "q3": " Hawks",               # not "the Hawks..." (em ignores articles) -> 0
        "q5": " twelve",              #                                       -> 1
        "q7": " June 4, 1994",        #                                       -> 0
        "q8": " 2570",                # "2570" does not start with "2,570"   -> 0
        "q11": "Brenn\nQuestion: x",  #                                       -> 1
    }
    scores = {q: hooks.process_results(docs[q], [g]) for q, g in generations.items()}
    assert {q: s["score"] for q, s in scores.items()} == {"q1": 1.0, "q3": 0.0, "q5": 1.0, "q7": 0.0,
                                                          "q8": 0.0, "q11": 1.0}
    assert sum(s["score"] for s in scores.values()) / len(scores) == 0.5
    # em/f1 stay as extras: DROP's normalisation accepts what InstructEval's rule rejects
    assert scores["q3"]["em"] == 1.0 and scores["q8"]["em"] == 1.0 and scores["q8"]["f1"] == 1.0
    assert scores["q7"]["em"] == 0.0


# ---- HumanEval ------------------------------------------------------------------------------


def test_humaneval_prompt_has_instruction_line(shared_data):
    path = shared_data("humaneval", "HumanEval.jsonl.gz")
    raw = D.read_humaneval(path)
    docs = D.load_humaneval(humaneval_path=str(path))["test"]
    instruction = ("Please complete the following Python code without providing any additional tasks "
                   "such as testing or explanations\n")
    assert len(docs) == 164
    for doc, problem in zip(docs, raw):
        assert doc["model_input"] == instruction + problem["prompt"]
        assert doc["prompt"] == problem["prompt"]  # what the executed program starts with


@pytest.mark.parametrize("generation, expected", [
    ("    return x\n\n\ndef extra():\n    pass\n", "    return x"),
    ("\n\n    return x\n\nprint(1)", "    return x"),          # leading blank lines are not the cut
    ("   return x\n", "    return x\n"),                        # 3 spaces -> 4
    ("\n    a = 1\n     b = 2\n\n    return a", "    a = 1\n      b = 2"),
    ("    x = 1\n   \n    return x", "    x = 1\n    \n    return x"),  # a spaces-only line is no blank line
    ("\n\n\n", ""),
])
def test_humaneval_completion_cleanup(generation, expected):
    assert A.humaneval_completion(generation) == expected


def test_humaneval_filters_keep_code_after_leading_blank_lines(shared_data):
    hooks = _task_utils("humaneval")
    problem = {p["task_id"]: p for p in D.read_humaneval(shared_data("humaneval", "HumanEval.jsonl.gz"))}["HumanEval/2"]
    body = "    return number % 1.0\n"  # HumanEval/2's canonical solution, which has no blank line
    generations = [["\n\n" + body + "\n\nassert False\n"], ["    return 0.0\n\n" + body]]
    cleaned = hooks.clean(generations, [problem, problem])
    assert cleaned == [["    return number % 1.0"], ["    return 0.0"]]
    outcome = hooks.execute(cleaned, [problem, problem])
    assert [o["c"] for o in outcome] == [1, 0]


# ---- MMLU csv formats -----------------------------------------------------------------------

ORIGINAL_CSV = '"What is 2+2?",3,4,5,6,B\n"Pick the ""quoted"" one, please",a,"b, c",d,e,D\n'
REFORMATTED_CSV = ("question,choice0,choice1,choice2,choice3,answer\n"
                   '"What is 2+2?",3,4,5,6,1\n"Pick the ""quoted"" one, please",a,"b, c",d,e,3\n')
PARSED = [
    {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"},
    {"question": 'Pick the "quoted" one, please', "choices": ["a", "b, c", "d", "e"], "answer": "D"},
]


@pytest.mark.parametrize("text", [ORIGINAL_CSV, REFORMATTED_CSV], ids=["hendrycks", "reformatted"])
def test_mmlu_csv_both_formats(tmp_path, text):
    path = tmp_path / "x_test.csv"
    path.write_text(text, encoding="utf-8")
    assert D.read_mmlu_csv(path) == PARSED


def test_mmlu_prompt_from_hendrycks_layout(tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"tiny_subject_{split}.csv").write_text(ORIGINAL_CSV, encoding="utf-8")
    assert D.mmlu_subjects({"mmlu_path": str(tmp_path)}) == ["tiny_subject"]
    docs = D.load_mmlu("tiny_subject", shots=1, mmlu_path=str(tmp_path))["test"]
    assert docs[1]["prompt"] == (
        "The following are multiple choice questions (with answers) about  tiny subject.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        'Pick the "quoted" one, please\nA. a\nB. b, c\nC. d\nD. e\nAnswer:')
    assert docs[1]["label"] == "D"


@pytest.mark.parametrize("text, why", [
    ("question,A,B,C,D,answer\nWhat?,1,2,3,4,A\n", "record 1 has answer 'answer'"),  # unknown header
    ('"What?",1,2,3,A\n', "record 1 has 5 fields"),
    ('"What?",1,2,3,4,E\n', "answer 'E'"),
    ('"What?",1,2,3,4,AB\n', "answer 'AB'"),
    ("question,choice0,choice1,choice2,choice3,answer\nWhat?,1,2,3,4,B\n", "record 2 has answer 'B'"),
    ("", "no rows"),
])
def test_mmlu_csv_other_formats_are_rejected(tmp_path, text, why):
    path = tmp_path / "bad_test.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        D.read_mmlu_csv(path)
    message = str(err.value)
    assert str(path) in message and why in message
    assert "Hendrycks' original release" in message and "reformatted copy" in message


# ---- model loading --------------------------------------------------------------------------

LLAMA2_CONFIG = {
    "model_type": "llama", "vocab_size": 32000, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "head_dim": 16, "attention_bias": False,
    "mlp_bias": False, "hidden_act": "silu",
}


def test_llama2_config_is_read_whole():
    from evals.model_loading import decoder_spec

    spec = decoder_spec(LLAMA2_CONFIG)
    assert (spec.model_type, spec.vocab_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.embed_dim,
            spec.intermediate_dim, spec.max_seq_len, spec.norm_eps, spec.rope_base, spec.head_dim) == (
        "llama", 32000, 2, 4, 2, 64, 128, 256, 1e-5, 10000.0, 16)
    assert spec.rope_scaling is None and not spec.tie_word_embeddings and not spec.qkv_bias
    assert decoder_spec(LLAMA2_CONFIG, max_seq_len=128).max_seq_len == 128


@pytest.mark.parametrize("change, key", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_other_architectures_are_refused(change, key):
    from evals.model_loading import decoder_spec

    with pytest.raises(ValueError, match=key):
        decoder_spec({**LLAMA2_CONFIG, **change})


# ---- eval recipe / suite: checks before the model is built -----------------------------------


@pytest.fixture
def recipe(monkeypatch):
    """The eval recipe module, with building a model turned into a test failure."""
    from lorasc_tune.recipes import lorasc_eval as module

    def no_model(cfg):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(module, "build_lm", no_model)
    return module


def _cfg(**overrides):
    base = {"checkpoint_dir": "/nonexistent", "tokenizer_path": "/nonexistent", "tasks": ["instructeval"],
            "data": {"data_dir": None, "drop_path": None}}
    return OmegaConf.create({**base, **overrides})


@pytest.mark.parametrize("value, expected", [
    ("instructeval_mmlu", ["instructeval_mmlu"]),
    ("instructeval_mmlu, instructeval_gsm8k", ["instructeval_mmlu", "instructeval_gsm8k"]),
    (["instructeval_bbh"], ["instructeval_bbh"]),
    (None, ["instructeval"]),
])
def test_recipe_task_names(recipe, value, expected):
    cfg = _cfg(tasks=value)
    assert recipe.task_names(cfg.tasks) == expected


def test_shipped_eval_config_validates(recipe):
    cfg = OmegaConf.load(TASKS_DIR.parents[1] / "configs" / "lorasc_eval.yaml")
    assert recipe.validate_config(cfg) == (["instructeval"], {})  # every data path is null there


def test_recipe_cli_string_task_validates(recipe):
    tasks, data = recipe.validate_config(_cfg(tasks="instructeval_mmlu", data={"drop_path": "/x.json"}))
    assert tasks == ["instructeval_mmlu"] and data == {"drop_path": "/x.json"}


@pytest.mark.parametrize("overrides, pattern", [
    ({"tasks": "instructeval_mmlu_anatomyy"}, r"unknown task\(s\) \['instructeval_mmlu_anatomyy'\]"),
    ({"data": {"dorp_path": "/x.json"}}, r"unknown data options \['dorp_path'\].*drop_path"),
    ({"limt": 5}, r"unknown config key\(s\) \['limt'\]; allowed: .*'limit'"),
])
def test_recipe_rejects_bad_config_before_building_the_model(recipe, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        recipe.LoraScEvalRecipe(_cfg(**overrides)).evaluate()


def test_suite_checks_task_names_before_loading(tmp_path):
    from evals.suite import evaluate

    # the checkpoint folder does not exist: a task error proves nothing was loaded first
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        evaluate(checkpoint_dir=str(tmp_path / "missing"), tokenizer_path=str(tmp_path / "t.model"),
                 tasks=["nope"])


# ---- atomic report writes -------------------------------------------------------------------


def test_report_table_is_written_atomically(tmp_path, monkeypatch):
    from evals.report import write_table

    results = {"results": {"instructeval_drop": {"alias": "instructeval_drop", "score,none": 0.5,
                                                 "em,none": 0.25, "f1,none": 0.375}},
               "configs": {"instructeval_drop": {"metadata": {"shots": 3}}},
               "n-samples": {"instructeval_drop": {"effective": 4}}}
    src = tmp_path / "results_x.json"
    src.write_text(json.dumps(results))
    renamed = []
    real_replace = os.replace

    def recording_replace(a, b):
        renamed.append(str(b))
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", recording_replace)
    out = write_table(src)
    assert renamed == [str(tmp_path / "results_x.md")] and out == tmp_path / "results_x.md"
    assert out.read_text() == ("| Task | Shots | Metric | Score | N |\n|---|---|---|---|---|\n"
                               "| DROP | 3 | score / em / f1 | 50.00 / 25.00 / 37.50 | 4 |\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_x.json", "results_x.md"]
