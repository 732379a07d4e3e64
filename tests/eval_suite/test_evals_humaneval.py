"""HumanEval harness: canonical solutions pass, bad completions fail without hanging the harness."""

from __future__ import annotations

import importlib.util
import time

import pytest

from evals import TASKS_DIR
from evals.instructeval.code_exec import humaneval_program, pass_at_k, run_programs
from evals.instructeval.data import read_humaneval


@pytest.fixture(scope="module")
def task_utils():
    """The lm-eval hooks the humaneval YAML points at (filter + process_results)."""
    spec = importlib.util.spec_from_file_location("humaneval_task_utils", TASKS_DIR / "humaneval" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def problems(shared_data):
    return read_humaneval(shared_data("humaneval", "HumanEval.jsonl.gz"))


def test_canonical_solutions_score_one(problems, task_utils):
    assert len(problems) == 164
    start = time.monotonic()
    summary = task_utils.execute([[p["canonical_solution"]] for p in problems], problems)
    elapsed = time.monotonic() - start
    scores = [task_utils.process_results(p, [s])["pass@1"] for p, s in zip(problems, summary)]
    failed = [(p["task_id"], s["status"]) for p, s in zip(problems, summary) if s["c"] != 1]
    assert not failed
    assert sum(scores) / len(scores) == 1.0
    assert elapsed < 60


def test_blank_line_cut_ceiling_matches_the_report_note(problems, task_utils):
    """A model that wrote every canonical solution, through InstructEval's cleaning (cut at the first
    blank line) and the sandbox: the score the report's HumanEval note states, every failure being a
    solution with a blank line inside its code."""
    from evals.report import HUMANEVAL_BROKEN_BY_CUT, HUMANEVAL_CEILING, HUMANEVAL_PROBLEMS

    with_blank_line = {p["task_id"] for p in problems if "\n\n" in p["canonical_solution"].strip("\n")}
    cleaned = task_utils.clean([[p["canonical_solution"]] for p in problems], problems)
    summary = task_utils.execute(cleaned, problems)
    failed = {p["task_id"] for p, s in zip(problems, summary) if s["c"] != 1}
    assert len(problems) == HUMANEVAL_PROBLEMS and len(failed) == HUMANEVAL_BROKEN_BY_CUT
    assert failed <= with_blank_line
    assert (len(problems) - len(failed)) / len(problems) == pytest.approx(HUMANEVAL_CEILING)


def test_bad_completions_score_zero_quickly(problems):
    problem = problems[0]
    bad = {
        "wrong": "    return False\n",
        "infinite loop": "    while True:\n        pass\n",
        "sleeps": "    import time\n    time.sleep(100)\n",
        "crash": "    raise RuntimeError('boom')\n",
        "hard exit": "    import os\n    os._exit(0)\n",  # exit code 0 before the tests run...
        "syntax": "    return (\n",
        "network": "    import socket\n    socket.create_connection(('example.com', 80))\n    return True\n",
        "subprocess": "    import subprocess\n    subprocess.run(['true'])\n    return True\n",
        "memory hog": "    x = bytearray(8 << 30)\n    return True\n",
    }
    start = time.monotonic()
    results = run_programs([humaneval_program(problem, c) for c in bad.values()], timeout=2.0)
    elapsed = time.monotonic() - start
    outcome = dict(zip(bad, results))
    # os._exit(0) never reaches check(): it "passes" in the official harness too; everything
    # else fails, and the two hangs are cut at the time limit.
    assert outcome.pop("hard exit").passed
    assert not any(r.passed for r in outcome.values()), outcome
    assert outcome["infinite loop"].status == "timeout" and outcome["sleeps"].status == "timeout"
    assert "PermissionError" in outcome["network"].detail
    assert "PermissionError" in outcome["subprocess"].detail
    assert "MemoryError" in outcome["memory hog"].detail
    assert elapsed < 20


def test_runs_in_a_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prog = "import os\nopen('left_behind.txt', 'w').write('x')\nassert os.environ.get('LORASC_SANDBOX') == '1'\n"
    assert run_programs([prog])[0].passed
    assert not (tmp_path / "left_behind.txt").exists()


def test_pass_at_k():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 4, 2) == 1.0
