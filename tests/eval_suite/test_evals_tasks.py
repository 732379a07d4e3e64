"""The lm-eval task tree: one `instructeval` group assembling 57 MMLU subjects, 27 BBH tasks, DROP,
HumanEval and GSM8K, generated YAMLs in sync, data folders matching the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.instructeval.catalog import BBH_TASKS, MMLU_SUBJECTS

DROP_FIXTURE = Path(__file__).parent / "fixtures" / "drop" / "drop_dataset_dev.json"


def test_generated_yamls_are_current():
    from evals.make_task_yamls import main

    assert main(["--check"]) == 0


def test_catalog_matches_data(shared_data):
    from evals.instructeval.data import bbh_tasks, mmlu_subjects

    assert len(MMLU_SUBJECTS) == 57 and len(BBH_TASKS) == 27
    assert mmlu_subjects({"mmlu_path": str(shared_data("mmlu"))}) == list(MMLU_SUBJECTS)
    assert bbh_tasks({"bbh_path": str(shared_data("bbh", "bbh"))}) == list(BBH_TASKS)


def test_instructeval_group_assembles(shared_data, offline_env):
    from evals.suite import task_manager

    shared_data("mmlu")  # skip (or fail under CI) without the shared data
    manager = task_manager({"drop_path": str(DROP_FIXTURE)})
    loaded = manager.load(["instructeval"])
    tasks = loaded["tasks"]
    mmlu = [t for t in tasks if t.startswith("instructeval_mmlu_")]
    bbh = [t for t in tasks if t.startswith("instructeval_bbh_")]
    assert len(mmlu) == 57 and len(bbh) == 27
    assert {"instructeval_drop", "instructeval_humaneval", "openinstruct_gsm8k"} <= set(tasks)
    assert len(tasks) == 57 + 27 + 3
    assert tasks["instructeval_humaneval"].UNSAFE_CODE
    assert not getattr(tasks["openinstruct_gsm8k"], "UNSAFE_CODE", False)
    assert all(t.config.num_fewshot == 0 for t in tasks.values())  # shots are in the prompts
    shots = {name: tasks[name].config.metadata["shots"] for name in
             ("instructeval_mmlu_anatomy", "instructeval_bbh_navigate", "instructeval_drop",
              "instructeval_humaneval", "openinstruct_gsm8k")}
    assert list(shots.values()) == [5, 3, 3, 0, 8]
    gen = tasks["instructeval_mmlu_anatomy"].config.generation_kwargs
    assert gen["max_gen_toks"] == 2 and gen["until"] == []
    # HumanEval: no stop string (the clean filter cuts at the first blank line after stripping
    # leading newlines); the model reads InstructEval's instruction line + the problem.
    humaneval = tasks["instructeval_humaneval"]
    assert humaneval.config.generation_kwargs["until"] == []
    assert humaneval.config.doc_to_text == "model_input"
    assert [m["metric"] for m in tasks["instructeval_drop"].config.metric_list] == ["score", "em", "f1"]
    assert len(tasks["instructeval_bbh_navigate"].test_docs()) == 247


def test_unsafe_task_needs_confirmation(tmp_path, shared_data, offline_env):
    import lm_eval

    from evals.lm_adapter import LoraScLM
    from evals.suite import task_manager
    from lorasc_tune.demo import demo_tokenizer

    from evals_helpers import peaked_llama

    shared_data("humaneval", "HumanEval.jsonl.gz")
    lm = LoraScLM(model=peaked_llama(vocab_size=512, max_seq_len=32), tokenizer=demo_tokenizer(str(tmp_path)))
    with pytest.raises(ValueError, match="unsafe"):
        lm_eval.simple_evaluate(model=lm, tasks=["instructeval_humaneval"], task_manager=task_manager(), limit=1)
