"""End to end, offline: the Python API, lm-eval's registry, the CLI wrapper and the tune recipe.

Real MMLU/BBH/HumanEval/GSM8K files from the shared data, DROP from the fixture, tiny models,
``--limit`` 1-2 and a small generation budget so the whole file stays well under a minute or two.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DROP_FIXTURE = Path(__file__).parent / "fixtures" / "drop" / "drop_dataset_dev.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
FIVE = ["instructeval_mmlu_anatomy", "instructeval_bbh_navigate", "instructeval_drop",
        "instructeval_humaneval", "openinstruct_gsm8k"]


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every outbound connection made in this process."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_python_api_offline(tiny_ckpt_32k, llama2_tokenizer_path, shared_data, offline_env, no_network, tmp_path):
    import lm_eval

    from evals.suite import evaluate, task_manager

    shared_data("mmlu")
    results = evaluate(
        checkpoint_dir=str(tiny_ckpt_32k), tokenizer_path=str(llama2_tokenizer_path), device="cpu",
        dtype="fp32", batch_size=4, tasks=FIVE, limit=2, allow_code_execution=True,
        output_dir=tmp_path, data_options={"drop_path": str(DROP_FIXTURE)}, gen_kwargs="max_gen_toks=8",
    )
    res = results["results"]
    assert set(FIVE) <= set(res)
    assert 0.0 <= res["instructeval_mmlu_anatomy"]["acc,none"] <= 1.0
    assert {"score,none", "em,none", "f1,none"} <= set(res["instructeval_drop"])
    assert "pass@1,exec" in res["instructeval_humaneval"]
    assert "exact_match,none" in res["openinstruct_gsm8k"]
    assert all(results["n-samples"][t]["effective"] == 2 for t in FIVE)
    rows = [line for line in results["markdown"].splitlines()[2:] if line]
    assert [r.split("|")[1].strip() for r in rows[:3]] == ["DROP", "HumanEval", "GSM8K"]
    assert len(list(tmp_path.glob("results_*.json"))) == 1 and len(list(tmp_path.glob("results_*.md"))) == 1
    assert no_network == []

    # The registry route: lm-eval builds the model itself from --model_args-style strings.
    out = lm_eval.simple_evaluate(
        model="lorasc", model_args=f"checkpoint_dir={tiny_ckpt_32k},tokenizer_path={llama2_tokenizer_path},device=cpu",
        tasks=["instructeval_gsm8k"], limit=1, gen_kwargs="max_gen_toks=4", task_manager=task_manager())
    assert "exact_match,none" in out["results"]["instructeval_gsm8k"]
    assert no_network == []


@pytest.fixture(scope="module")
def demo_like_checkpoint(tmp_path_factory):
    """A checkpoint of the demo run's shape (what ``epoch_N/`` holds after the demo) and the demo
    tokenizer, both built locally."""
    from lorasc_tune.demo import DEMO_MODEL_ARGS, write_demo_tokenizer, write_tiny_llama2_hf_checkpoint

    root = tmp_path_factory.mktemp("demo")
    ckpt = write_tiny_llama2_hf_checkpoint(root / "out" / "epoch_0", model_args=DEMO_MODEL_ARGS)
    return ckpt, write_demo_tokenizer(str(root / "assets"))


def _offline_subprocess_env(**extra):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # any HTTP client that tried would be pointed at a closed local port
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               LORASC_EVAL_DROP_PATH=str(DROP_FIXTURE), TQDM_DISABLE="1")
    env.update(extra)
    return env


def test_cli_runs_full_instructeval_group_offline(demo_like_checkpoint, shared_data, tmp_path):
    """The whole group through the CLI wrapper, DROP missing as in the shared data: the group runs
    without it, says so in one line, and prints none of lm-eval's per-task custom-dataset notices."""
    shared_data("mmlu")
    ckpt, tokenizer = demo_like_checkpoint
    missing_drop = tmp_path / "no_drop" / "drop_dataset_dev.json"
    cmd = [sys.executable, "-m", "evals.lm_eval_cli", "--model", "lorasc",
           "--model_args", f"checkpoint_dir={ckpt},tokenizer_path={tokenizer}",
           "--tasks", "instructeval", "--limit", "1", "--confirm_run_unsafe_code",
           "--device", "cpu", "--batch_size", "16", "--gen_kwargs", "max_gen_toks=4",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_offline_subprocess_env(LORASC_EVAL_DROP_PATH=str(missing_drop)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    skip = [line for line in proc.stderr.splitlines() if "skipping instructeval_drop" in line]
    assert len(skip) == 1 and str(missing_drop) in skip[0] and "LORASC_EVAL_DROP_PATH" in skip[0]
    assert "Custom kwargs" not in proc.stderr + proc.stdout
    results = sorted((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert len(data["group_subtasks"]["instructeval_mmlu"]) == 57
    assert len(data["group_subtasks"]["instructeval_bbh"]) == 27
    assert "acc,none" in data["results"]["instructeval_mmlu"]
    table = results[0].with_suffix(".md").read_text().splitlines()
    rows = [line for line in table[2:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == ["MMLU", "BBH", "HumanEval", "GSM8K"]
    assert "| MMLU | 5 | acc (mean of 57) |" in rows[0]
    assert any(line.startswith("HumanEval: as in InstructEval") for line in table)
    assert "Markdown table" in proc.stdout


def test_tune_run_eval_recipe(demo_like_checkpoint, shared_data, tmp_path):
    shared_data("gsm8k")
    ckpt, tokenizer = demo_like_checkpoint
    cmd = [str(Path(sys.executable).parent / "tune"), "run", "lorasc_tune/recipes/lorasc_eval.py",
           "--config", "configs/lorasc_eval.yaml", f"checkpoint_dir={ckpt}", f"tokenizer_path={tokenizer}",
           "tasks=[openinstruct_gsm8k,instructeval_drop]", "limit=2", "device=cpu",
           "max_gen_toks_override=4", f"output_dir={tmp_path / 'eval'}", f"data.drop_path={DROP_FIXTURE}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_offline_subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| GSM8K | 8 | exact_match |" in proc.stdout and "| DROP | 3 | score / em / f1 |" in proc.stdout
    assert len(list((tmp_path / "eval").glob("results_*.json"))) == 1
