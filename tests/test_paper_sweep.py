"""Table 1: the per-task configs, the method overrides, LR selection, and the resumable sweep."""

import json
import sys
from pathlib import Path

import pytest
from torchtune.config._utils import _get_component_from_path

from shared_paths import REPO_ROOT, require_shared
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.data import BUILDERS
from lorasc_tune.demo import write_tiny_llama2_hf_checkpoint
from recipe_utils import TINY_ARGS

# recipes/ has no __init__.py (torchtune owns the package name `recipes`): import its modules
# the way the script itself does, from the folder.
sys.path.insert(0, str(REPO_ROOT / "recipes"))
import make_paper_configs  # noqa: E402
import paper_table1 as pt  # noqa: E402

PAPER_CONFIGS = REPO_ROOT / "configs" / "paper"


# ---- configs and methods ----------------------------------------------------------------------


@pytest.mark.parametrize("task", list(pt.TASK_LABELS))
def test_paper_config_parses_validates_and_builds_the_task(task):
    path = PAPER_CONFIGS / f"llama2_7b_{task}.yaml"
    assert path.read_text() == make_paper_configs.paper_config_text(task), \
        "configs/paper is out of date: run python recipes/make_paper_configs.py"
    cfg = pt.load_train_config(path, [])
    LoRASCConfig.from_config(cfg.lorasc)
    assert _get_component_from_path(cfg.dataset._component_) is BUILDERS[task]
    assert (cfg.dataset.split, cfg.dataset.seed, cfg.dataset.num_train) == ("train", 0, 1000)
    # The MeZO setting of the issue: rank 8 on q, v; batch 4; 5 epochs; linear schedule.
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj"] and cfg.model.lora_rank == 8
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.epochs) == (4, 1, 5)
    assert cfg.lr_scheduler._component_ == "lorasc_tune.plan.get_linear_schedule_with_warmup"


def test_every_paper_task_has_a_config():
    assert {p.name for p in PAPER_CONFIGS.glob("*.yaml")} == \
        {f"llama2_7b_{t}.yaml" for t in pt.TASK_LABELS}


def test_methods_are_the_table_rows():
    def resolved(variant):
        cfg = pt.load_train_config(PAPER_CONFIGS / "llama2_7b_rte.yaml",
                                   list(pt.VARIANTS[variant].overrides))
        return LoRASCConfig.from_config(cfg.lorasc), cfg.model.use_dora

    for adapter, ratio, dora in (("lora", 1.0, False), ("loraplus", 16.0, False),
                                 ("dora", 1.0, True)):
        plain, plain_dora = resolved(adapter)
        full, full_dora = resolved(f"lorasc_{adapter}")
        assert not plain.cascade and (plain.lr_ratio_B, plain_dora) == (ratio, dora)
        assert full.cascade and (full.slow_alpha, full.noise_lambda, full.schedule) == \
            (0.5, 1.0, "expert")
        assert (full.lr_ratio_B, full_dora) == (ratio, dora)
    cola, cola_dora = resolved("cola")
    assert cola.cascade and (cola.slow_alpha, cola.noise_lambda, cola.schedule) == (0.0, 0.0, "run")
    assert (cola.lr_ratio_B, cola_dora) == (1.0, False)


# ---- selection and table ----------------------------------------------------------------------


def fake_result(cell, val, test):
    return {"task": cell.task, "variant": cell.variant, "seed": cell.seed, "lr": cell.lr,
            "metric": "acc", "validation": {"acc": val}, "test": {"acc": test}}


def test_lr_is_selected_on_validation_and_test_is_averaged_over_seeds(tmp_path):
    sweep = pt.Sweep(tmp_path, tasks=["sst2", "cb"], variants=["lora"], seeds=[0, 1],
                     lrs=[1e-4, 1e-3])
    C = pt.Cell
    results = {
        # seed 0: 1e-3 wins on validation although 1e-4 has the better test score.
        C("sst2", "lora", 0, 1e-4): fake_result(C("sst2", "lora", 0, 1e-4), 80, 99),
        C("sst2", "lora", 0, 1e-3): fake_result(C("sst2", "lora", 0, 1e-3), 90, 70),
        # seed 1: a validation tie goes to the smaller rate.
        C("sst2", "lora", 1, 1e-4): fake_result(C("sst2", "lora", 1, 1e-4), 85, 74),
        C("sst2", "lora", 1, 1e-3): fake_result(C("sst2", "lora", 1, 1e-3), 85, 10),
        # cb: seed 1 misses a learning rate, so only seed 0 counts.
        C("cb", "lora", 0, 1e-4): fake_result(C("cb", "lora", 0, 1e-4), 50, 60),
        C("cb", "lora", 0, 1e-3): fake_result(C("cb", "lora", 0, 1e-3), 40, 30),
        C("cb", "lora", 1, 1e-4): fake_result(C("cb", "lora", 1, 1e-4), 50, 60),
    }
    table = pt.build_table(results, sweep)
    sst2 = table["rows"]["lora"]["sst2"]
    assert [sst2["seeds"][s]["lr"] for s in (0, 1)] == [1e-3, 1e-4]
    assert (sst2["mean"], sst2["n"]) == (72.0, 2) and sst2["std"] == pytest.approx(8 ** 0.5)
    cb = table["rows"]["lora"]["cb"]
    assert (cb["mean"], cb["std"], cb["n"]) == (60.0, 0.0, 1)
    assert table["rows"]["lora"]["avg"]["mean"] == 65.0  # seed 0 only: (70 + 60) / 2
    lines = table["markdown"].splitlines()
    assert lines[0] == "| Method | SST-2 | CB | Avg. |"
    assert lines[2] == "| LoRA | 72.0 ± 2.8 | 60.0 ± 0.0 (1/2) | 65.0 ± 0.0 (1/2) |"


# ---- robustness of the runner -----------------------------------------------------------------


def test_bad_sweep_inputs_are_named(tmp_path):
    with pytest.raises(pt.SweepError, match="unknown task.*'sst3'"):
        pt.check_sweep(pt.Sweep(tmp_path, tasks=["sst3"]))
    with pytest.raises(pt.SweepError, match="unknown variant.*'lorasc'"):
        pt.check_sweep(pt.Sweep(tmp_path, variants=["lorasc"]))
    with pytest.raises(pt.SweepError, match="optimizer.lr=1e-3.*--lrs"):
        pt.check_sweep(pt.Sweep(tmp_path, overrides=["optimizer.lr=1e-3"]))
    with pytest.raises(pt.SweepError, match="lorasc.noise_lambda"):
        pt.check_sweep(pt.Sweep(tmp_path, overrides=["lorasc.noise_lambda=2"]))
    with pytest.raises(pt.SweepError, match="config not found: .*llama2_7b_sst2.yaml"):
        pt.check_sweep(pt.Sweep(tmp_path, tasks=["sst2"], config_dir=tmp_path))
    with pytest.raises(pt.SweepError, match="sst2: the train split .* does not exist"):
        pt.check_sweep(pt.Sweep(tmp_path, tasks=["sst2"], overrides=[f"dataset.data_dir={tmp_path}"]))
    with pytest.raises(pt.SweepError, match="--lrs repeats 0.0001"):
        pt.check_sweep(pt.Sweep(tmp_path, lrs=[1e-4, 0.0001]))
    with pytest.raises(pt.SweepError, match="--seeds repeats 1"):
        pt.check_sweep(pt.Sweep(tmp_path, seeds=[1, 1]))


def test_cascade_frequency_variants_set_num_experts_and_fit_the_run(tmp_path):
    require_shared("superglue", "CB", "train.jsonl")
    cfg = pt.load_train_config(PAPER_CONFIGS / "llama2_7b_cb.yaml",
                               list(pt.VARIANTS["lorasc_lora_T2"].overrides))
    lorasc = LoRASCConfig.from_config(cfg.lorasc)
    assert (lorasc.num_experts, lorasc.steps_per_expert, lorasc.slow_alpha, lorasc.noise_lambda) \
        == (2, None, 0.5, 1.0)
    assert "lorasc_lora_T2" not in pt.DEFAULT_VARIANTS  # Table 4 runs only when asked for
    pt.check_sweep(pt.Sweep(tmp_path, tasks=["cb"], variants=["lorasc_lora_T2"]))
    # CB: 250 train rows - 100 validation = 150 = 37 batches of 4 per epoch, x 5 epochs = 185.
    with pytest.raises(pt.SweepError, match=r"cb / lorasc_lora_T250: lorasc\.num_experts=250, "
                                            r"but a cb run has only 185 optimizer steps"):
        pt.check_sweep(pt.Sweep(tmp_path, tasks=["cb"], variants=["lorasc_lora_T250"]))


def test_a_crashed_cell_leaves_no_result_and_reruns_without_retraining(tmp_path):
    sweep = pt.Sweep(tmp_path / "sweep", tasks=["sst2"], variants=["lora"], seeds=[0], lrs=[1e-4])
    cell = sweep.cells()[0]
    cfg = pt.load_train_config(sweep.config_path("sst2"), sweep.train_overrides(cell))
    fp = pt.fingerprint(cfg, sweep)
    # Training (with this config) finished before the crash: the final merged model is on disk.
    final = cell.run_dir(tmp_path / "sweep") / "epoch_4"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final.parent / "fingerprint.txt").write_text(fp + "\n")

    def crash(*args, **kwargs):
        raise RuntimeError("scorer died")

    with pytest.raises(RuntimeError, match="scorer died"):
        pt.run_cell(cell, sweep, cfg, fp, score_fn=crash)
    assert not cell.result_path(tmp_path / "sweep").exists()

    scored = []

    def score(path, cfg, task, splits, **kwargs):
        scored.append(path)
        return {"validation": {"acc": 60.0}, "test": {"acc": 55.0}}

    # No `tune run` happens (train_cell would fail: there is no 7B checkpoint here).
    result = pt.run_cell(cell, sweep, cfg, fp, score_fn=score)
    assert scored == [final] and result["test"] == {"acc": 55.0}
    assert json.loads(cell.result_path(tmp_path / "sweep").read_text())["fingerprint"] == fp
    assert not final.exists(), "checkpoints are removed once the cell is scored"

    # The stored result belongs to this config; another config is refused, not mixed in.
    with pytest.raises(pt.SweepError, match="different config"):
        pt.finished_result(cell, tmp_path / "sweep", "0" * 16)


def fake_tune(tmp_path, monkeypatch, output: str):
    """Point the runner at a `tune` that prints ``output`` and fails."""
    script = tmp_path / "fake_tune"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(pt, "tune_executable", lambda: str(script))


def test_a_diverged_run_is_recorded_and_never_selected(tmp_path, monkeypatch):
    sweep = pt.Sweep(tmp_path / "sweep", tasks=["rte"], variants=["loraplus"], seeds=[0],
                     lrs=[1e-3])
    cell = sweep.cells()[0]
    cfg = pt.load_train_config(sweep.config_path("rte"), sweep.train_overrides(cell))
    fp = pt.fingerprint(cfg, sweep)

    fake_tune(tmp_path, monkeypatch, "RuntimeError: CUDA error: out of memory")
    with pytest.raises(pt.SweepError, match="training failed for rte/loraplus/seed0_lr0.001"):
        pt.run_cell(cell, sweep, cfg, fp)
    assert not cell.result_path(tmp_path / "sweep").exists()

    fake_tune(tmp_path, monkeypatch, "NonFiniteLossError: loss is nan at global step 3")
    result = pt.run_cell(cell, sweep, cfg, fp)
    assert result["diverged"] and result["test"] is None
    assert pt.finished_result(cell, tmp_path / "sweep", fp) == result

    ok = fake_result(pt.Cell("rte", "loraplus", 0, 1e-4), 10, 20)
    assert pt.select_lr({1e-4: ok, 1e-3: result}) is ok
    assert pt.select_lr({1e-3: result}) is None


# ---- end to end on a tiny model -----------------------------------------------------------------


def tiny_overrides(checkpoint_dir: Path, tokenizer: Path):
    """Swap the 7B model, tokenizer and data sizes for a 2-layer model and a few rows."""
    args = dict(TINY_ARGS, vocab_size=32000)
    return [
        "model._component_=torchtune.models.llama2.lora_llama2",
        *(f"model.{k}={v}" for k, v in args.items()),
        f"tokenizer.path={tokenizer}", f"tokenizer.max_seq_len={args['max_seq_len']}",
        f"checkpointer.checkpoint_dir={checkpoint_dir}",
        "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
        "dataset.num_train=8", "dataset.num_dev=4", "dataset.num_eval=8",
        "epochs=2", "max_steps_per_epoch=1",  # two experts of one step each
        "device=cpu", "dtype=fp32", "optimizer.fused=false",
        "enable_activation_checkpointing=false", "log_peak_memory_stats=false",
    ]


def test_sweep_on_a_tiny_model_makes_the_table_and_skips_finished_cells(tmp_path, monkeypatch,
                                                                       capsys):
    tokenizer = require_shared("llama2_tokenizer", "tokenizer.model")
    require_shared("glue_sst2", "train.tsv")
    require_shared("superglue", "CB", "train.jsonl")
    ckpt = write_tiny_llama2_hf_checkpoint(tmp_path / "tiny", dict(TINY_ARGS, vocab_size=32000))
    sweep_dir = tmp_path / "sweep"
    argv = ["--sweep-dir", str(sweep_dir), "--tasks", "sst2,cb",
            "--variants", "lora,lorasc_lora", "--seeds", "0", "--lrs", "1e-3",
            "--override", *tiny_overrides(ckpt, tokenizer)]

    assert pt.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 cells: 0 already finished (skipped), 4 run now, 0 failed" in out
    cells = sorted(p.relative_to(sweep_dir / "cells").as_posix()
                   for p in (sweep_dir / "cells").rglob("*.json"))
    assert cells == ["cb/lora/seed0_lr0.001.json", "cb/lorasc_lora/seed0_lr0.001.json",
                     "sst2/lora/seed0_lr0.001.json", "sst2/lorasc_lora/seed0_lr0.001.json"]
    for path in (sweep_dir / "cells").rglob("*.json"):
        result = json.loads(path.read_text())
        assert 0 <= result["validation"]["acc"] <= 100 and 0 <= result["test"]["acc"] <= 100
    # The runs left their logs, not their checkpoints.
    assert len(list((sweep_dir / "runs").rglob("train.log"))) == 4
    assert not list((sweep_dir / "runs").rglob("epoch_*"))

    table_md = (sweep_dir / "table1.md").read_text()
    lines = table_md.splitlines()
    assert lines[0] == "| Method | SST-2 | CB | Avg. |"
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| LoRA", "| LoRA + LoRASC"]
    assert all(line.count("±") == 3 for line in lines[2:4])
    table = json.loads((sweep_dir / "table1.json").read_text())
    assert table["rows"]["lorasc_lora"]["sst2"]["n"] == 1
    assert table_md in out

    # Rerun: every cell is finished, so nothing trains or scores, and the table is the same.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(pt, "train_cell", must_not_run)
    monkeypatch.setattr(pt, "run_cell", must_not_run)
    mtimes = {p: p.stat().st_mtime_ns for p in (sweep_dir / "cells").rglob("*.json")}
    assert pt.main(argv) == 0
    assert "4 cells: 4 already finished (skipped), 0 run now, 0 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (sweep_dir / "cells").rglob("*.json")} == mtimes
    assert (sweep_dir / "table1.md").read_text() == table_md
