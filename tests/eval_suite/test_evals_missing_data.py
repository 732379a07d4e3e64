"""Missing optional data (DROP) inside a group is skipped with one line saying how to add it; asked
for alone, it is a clear error before any model is built; no per-task warning flood. (The whole
group through the CLI without DROP: test_evals_e2e.py.)"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_drop(tmp_path, monkeypatch):
    """DROP pointed at a file that does not exist (whatever the shared data hold)."""
    missing = tmp_path / "nowhere" / "drop_dataset_dev.json"
    monkeypatch.setenv("LORASC_EVAL_DROP_PATH", str(missing))
    return missing


def test_group_skips_missing_drop_with_one_line(shared_data, offline_env, no_drop, caplog):
    from evals.suite import check_task_names, task_manager

    shared_data("mmlu")
    manager = task_manager()
    assert check_task_names(["instructeval_nocode"], manager) == ["instructeval_nocode"]  # no error
    with caplog.at_level(logging.WARNING):
        loaded = manager.load(["instructeval_nocode"])
    assert "instructeval_drop" not in loaded["tasks"]
    assert {"openinstruct_gsm8k", "instructeval_mmlu_anatomy", "instructeval_bbh_navigate"} <= set(loaded["tasks"])
    skip_lines = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skip_lines) == 1
    line = skip_lines[0]
    assert "\n" not in line and "instructeval_drop" in line and str(no_drop) in line
    assert "LORASC_EVAL_DROP_PATH" in line and "drop_path=" in line
    # lm-eval's custom-dataset notice is filtered for our tasks (it came once per task: 85 lines).
    assert not [r for r in caplog.records if "Custom kwargs" in r.getMessage()]


def test_drop_alone_is_a_clear_error(shared_data, offline_env, no_drop):
    from evals.instructeval.paths import MissingDatasetError
    from evals.suite import check_task_names, task_manager

    manager = task_manager()
    with pytest.raises(MissingDatasetError) as err:
        check_task_names(["instructeval_drop"], manager)
    message = str(err.value)
    assert str(no_drop) in message and "LORASC_EVAL_DROP_PATH" in message and "not in the project's shared data" in message
    with pytest.raises(FileNotFoundError, match="LORASC_EVAL_DROP_PATH"):
        manager.load(["instructeval_drop"])


def test_required_data_missing_in_group_is_an_error(offline_env, tmp_path, monkeypatch):
    """Only optional datasets are skipped: a group without its MMLU files stops with the error."""
    from evals.instructeval.paths import MissingDatasetError
    from evals.suite import check_task_names, task_manager

    monkeypatch.setenv("LORASC_EVAL_MMLU_PATH", str(tmp_path / "no_mmlu"))
    with pytest.raises(MissingDatasetError, match="LORASC_EVAL_MMLU_PATH"):
        check_task_names(["instructeval_nocode"], task_manager())


def _cli(args, env_extra, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "evals.lm_eval_cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_drop_alone_fails_before_the_model(shared_data, tmp_path, no_drop):
    # The checkpoint does not exist either: the data check must come first.
    proc = _cli(["--model", "lorasc", "--model_args",
                 f"checkpoint_dir={tmp_path / 'no_ckpt'},tokenizer_path={tmp_path / 'no_tok'}",
                 "--tasks", "instructeval_drop", "--device", "cpu"],
                {"LORASC_EVAL_DROP_PATH": str(no_drop)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: InstructEval drop: {no_drop} not found" in proc.stderr
    assert "Traceback" not in proc.stderr and "config.json" not in proc.stderr
