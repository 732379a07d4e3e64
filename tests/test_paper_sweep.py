"""Table 1: the paper's grids, the per-task configs, the methods, selection over the grid, the
table, and the resumable sweep."""

import itertools
import json
import re
import sys
from pathlib import Path

import pytest
from torchtune.config._utils import _get_component_from_path

from shared_paths import REPO_ROOT, require_shared
from lorasc_tune._paths import shared_data_dir
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.data import BUILDERS
from lorasc_tune.demo import write_tiny_llama2_hf_checkpoint
from lorasc_tune.errors import DIVERGED_EXIT_CODE
from recipe_utils import TINY_ARGS

# recipes/ has no __init__.py (torchtune owns the package name `recipes`): import its modules
# the way the script itself does, from the folder.
sys.path.insert(0, str(REPO_ROOT / "recipes"))
import make_paper_configs  # noqa: E402
import paper_cells  # noqa: E402
import paper_checks  # noqa: E402
import paper_grids  # noqa: E402
import paper_methods  # noqa: E402
import paper_selection  # noqa: E402
import paper_table1 as pt  # noqa: E402
import paper_tables  # noqa: E402

PAPER_CONFIGS = REPO_ROOT / "configs" / "paper"
PAPER_TEXT = shared_data_dir().parent / "paper" / "lorasc_paper.txt"
Cell, Sweep, SweepError = paper_cells.Cell, paper_cells.Sweep, paper_cells.SweepError
LORASC_METHODS = ("lorasc_lora", "lorasc_loraplus", "lorasc_dora")


# ---- the paper's grids, read back out of its text -----------------------------------------------


@pytest.fixture(scope="module")
def paper_text():
    if not PAPER_TEXT.is_file():
        pytest.skip(f"paper text not found: {PAPER_TEXT}")
    raw = PAPER_TEXT.read_text()
    # The PDF extraction leaves line numbers (**378**), bold marks and link markup in the prose.
    text = re.sub(r"\*\*\d+\*\*", " ", raw).replace("**", "")
    return raw, re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)


def grid_in(text: str, section: str, anchor: str, stop: str):
    """The set the paper gives after ``anchor`` (searched from ``section``), as floats:
    ``{1 \\times 10^{-5}, ...}`` or ``\\{0.5, 0.6, 0.8\\}``."""
    i = text.index(anchor, text.index(section)) + len(anchor)
    chunk = text[i:text.index(stop, i)]
    powers = re.findall(r"(\d+)\s*(?:\\times|×)\s*10\^\{(-\d+)\}", chunk)
    if powers:
        return tuple(float(f"{m}e{e}") for m, e in powers)
    listed = re.search(r"\{([\d.,\s]+?)\\?\}", chunk).group(1)
    return tuple(float(x) for x in listed.split(","))


def test_grids_are_the_papers(paper_text):
    raw, text = paper_text
    # §4.2.1, in-domain
    assert grid_in(text, "For in-domain language", "learning rate selected from",
                   "By default") == paper_grids.IN_DOMAIN_LRS
    batch, rank = re.search(r"batch size\s+(?:\d+\s+)?was set to (\d+) and the LoRA rank was "
                            r"set to (\d+)", text).groups()
    epochs = re.search(r"training spanning (\d+) epochs", text).group(1)
    assert (int(batch), int(rank), int(epochs)) == (paper_grids.IN_DOMAIN_BATCH_SIZE,
                                                    paper_grids.IN_DOMAIN_LORA_RANK,
                                                    paper_grids.IN_DOMAIN_EPOCHS)
    # §4.2.1, Alpaca
    assert grid_in(text, "For instruction tuning", "learning rate selected from",
                   "For evaluation") == paper_grids.ALPACA_LRS
    assert int(re.search(r"The batch size was set to (\d+)", text).group(1)) == \
        paper_grids.ALPACA_BATCH_SIZE
    assert int(re.search(r"finetune our model for (\d+) epochs", text).group(1)) == \
        paper_grids.ALPACA_EPOCHS
    # §4.2.2, vision
    assert grid_in(text, "For the ImageNet-1K", "learning rate was chosen from",
                   "For evaluation") == paper_grids.VISION_LRS
    assert int(re.search(r"batch size was fixed at (\d+)", text).group(1)) == \
        paper_grids.VISION_BATCH_SIZE
    assert int(re.search(r"training for a total of (\d+) epochs", text).group(1)) == \
        paper_grids.VISION_EPOCHS
    # §4.1, LoRASC's own hyperparameters
    assert grid_in(text, "4.1 Implementation", "Slow-Fast Update in", "to control") == \
        paper_grids.SLOW_ALPHAS
    assert grid_in(text, "4.1 Implementation", "noise intensity from", "which is") == \
        paper_grids.NOISE_LAMBDAS
    # §4.3, Table 4: the first number of each of its rows
    table4 = raw[raw.index("Experts RTE DROP"):raw.index("Table 4:")].splitlines()[1:]
    assert tuple(int(re.match(r"\s*(\d+)", line).group(1)) for line in table4
                 if re.match(r"\s*\d", line)) == paper_grids.EXPERT_COUNTS
    assert paper_grids.FIXED_SLOW_ALPHA in paper_grids.SLOW_ALPHAS
    assert paper_grids.FIXED_NOISE_LAMBDA in paper_grids.NOISE_LAMBDAS


# ---- configs and methods ----------------------------------------------------------------------


@pytest.mark.parametrize("task", list(paper_methods.TASK_LABELS))
def test_paper_config_parses_validates_and_builds_the_task(task):
    path = PAPER_CONFIGS / f"llama2_7b_{task}.yaml"
    assert path.read_text() == make_paper_configs.paper_config_text(task), \
        "configs/paper is out of date: run python recipes/make_paper_configs.py"
    cfg = paper_cells.load_train_config(path, [])
    lorasc = LoRASCConfig.from_config(cfg.lorasc)
    assert _get_component_from_path(cfg.dataset._component_) is BUILDERS[task]
    assert (cfg.dataset.split, cfg.dataset.seed, cfg.dataset.num_train) == ("train", 0, 1000)
    # The paper's in-domain setting (§4.2.1): rank 8 on q, v; batch 4; 5 epochs; linear schedule.
    assert list(cfg.model.lora_attn_modules) == ["q_proj", "v_proj"]
    assert cfg.model.lora_rank == paper_grids.IN_DOMAIN_LORA_RANK
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.epochs) == \
        (paper_grids.IN_DOMAIN_BATCH_SIZE, 1, paper_grids.IN_DOMAIN_EPOCHS)
    assert cfg.lr_scheduler._component_ == "lorasc_tune.plan.get_linear_schedule_with_warmup"
    # Trained on its own, the config is LoRASC at the fixed point of the grid.
    assert (lorasc.slow_alpha, lorasc.noise_lambda) == (paper_grids.FIXED_SLOW_ALPHA,
                                                        paper_grids.FIXED_NOISE_LAMBDA)
    assert cfg.optimizer.lr in paper_grids.IN_DOMAIN_LRS


def test_every_paper_task_has_a_config():
    assert {p.name for p in PAPER_CONFIGS.glob("*.yaml")} == \
        {f"llama2_7b_{t}.yaml" for t in paper_methods.TASK_LABELS}


def resolved(variant, cell_overrides=()):
    cfg = paper_cells.load_train_config(PAPER_CONFIGS / "llama2_7b_rte.yaml",
                                        [*paper_methods.VARIANTS[variant].overrides,
                                         *cell_overrides])
    return LoRASCConfig.from_config(cfg.lorasc), cfg.model.use_dora


def test_methods_are_the_table_rows():
    for adapter, ratio, dora in (("lora", 1.0, False), ("loraplus", 16.0, False),
                                 ("dora", 1.0, True)):
        plain, plain_dora = resolved(adapter)
        assert not plain.cascade and (plain.lr_ratio_B, plain_dora) == (ratio, dora)
        assert not paper_methods.VARIANTS[adapter].searches_slow_noise
        # A LoRASC method leaves α and λ to its cells, and each cell's values reach the config.
        method = paper_methods.VARIANTS[f"lorasc_{adapter}"]
        assert method.searches_slow_noise
        assert not any(o.split("=")[0] in paper_methods.SEARCHED_KEYS for o in method.overrides)
        cell = Cell("rte", method.name, 0, 1e-4, slow_alpha=0.8, noise_lambda=10.0)
        full, full_dora = resolved(method.name, cell.overrides())
        assert full.cascade and (full.slow_alpha, full.noise_lambda, full.schedule) == \
            (0.8, 10.0, "expert")
        assert (full.lr_ratio_B, full_dora) == (ratio, dora)
    cola, cola_dora = resolved("cola")
    assert not paper_methods.VARIANTS["cola"].searches_slow_noise
    assert cola.cascade and (cola.slow_alpha, cola.noise_lambda, cola.schedule) == (0.0, 0.0, "run")
    assert (cola.lr_ratio_B, cola_dora) == (1.0, False)


def test_the_default_sweep_is_the_papers_grid(tmp_path):
    sweep = Sweep(tmp_path)
    assert (tuple(sweep.lrs), tuple(sweep.alphas), tuple(sweep.lambdas), tuple(sweep.seeds)) == \
        (paper_grids.IN_DOMAIN_LRS, paper_grids.SLOW_ALPHAS, paper_grids.NOISE_LAMBDAS,
         paper_grids.SEEDS)
    cells = sweep.cells()
    assert len({c.name for c in cells}) == len(cells), "two cells share a result file"
    for task, variant in itertools.product(sweep.tasks, sweep.variants):
        mine = {(c.seed, c.lr, c.slow_alpha, c.noise_lambda) for c in cells
                if (c.task, c.variant) == (task, variant)}
        if variant in LORASC_METHODS:
            expected = set(itertools.product(sweep.seeds, sweep.lrs, sweep.alphas,
                                             sweep.lambdas))
        else:
            expected = {(s, lr, None, None)
                        for s, lr in itertools.product(sweep.seeds, sweep.lrs)}
        assert mine == expected, (task, variant)
    # The command line's defaults are the same grid.
    parsed, dry_run = pt.parse_args(["--sweep-dir", str(tmp_path)])
    assert parsed.cells() == cells and not dry_run


# ---- selection and table ----------------------------------------------------------------------


def fake_result(cell, val, test):
    return {"task": cell.task, "variant": cell.variant, "seed": cell.seed, "lr": cell.lr,
            "slow_alpha": cell.slow_alpha, "noise_lambda": cell.noise_lambda,
            "metric": "acc", "validation": {"acc": val}, "test": {"acc": test}}


def test_lr_is_selected_on_validation_and_test_is_averaged_over_seeds(tmp_path):
    sweep = Sweep(tmp_path, tasks=["sst2", "cb"], variants=["lora"], seeds=[0, 1],
                  lrs=[1e-4, 1e-3])
    C = Cell
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
    table = paper_tables.build_table(results, sweep)
    sst2 = table["rows"]["lora"]["sst2"]
    assert [sst2["seeds"][s]["lr"] for s in (0, 1)] == [1e-3, 1e-4]
    assert (sst2["mean"], sst2["n"]) == (72.0, 2) and sst2["std"] == pytest.approx(8 ** 0.5)
    cb = table["rows"]["lora"]["cb"]
    assert (cb["mean"], cb["std"], cb["n"]) == (60.0, 0.0, 1)
    assert table["rows"]["lora"]["avg"]["mean"] == 65.0  # seed 0 only: (70 + 60) / 2
    assert table["search"]["lora"]["configs"] == 2
    lines = table["markdown"].splitlines()
    assert lines[0] == "| Method | Configs | SST-2 | CB | Avg. |"
    assert lines[2] == "| LoRA | 2 | 72.0 ± 2.8 | 60.0 ± 0.0 (1/2) | 65.0 ± 0.0 (1/2) |"


def validation_score(cell):
    """A made-up but irregular validation score, so the best cell is not at a grid corner."""
    return (37 * cell.seed + 101 * cell.lr * 1e4 + 13 * (cell.slow_alpha or 0)
            + 7 * (cell.noise_lambda or 0)) % 50


def test_lorasc_search_is_counted_and_also_reported_at_the_fixed_point(tmp_path):
    sweep = Sweep(tmp_path, tasks=["rte"], variants=["lora", "lorasc_lora"], seeds=[0, 1],
                  lrs=[1e-4, 1e-3], alphas=[0.5, 0.8], lambdas=[1.0, 10.0])
    results = {c: fake_result(c, validation_score(c), 100 - validation_score(c))
               for c in sweep.cells()}
    table = paper_tables.build_table(results, sweep)
    assert table["row_names"] == ["lora", "lorasc_lora", "lorasc_lora_fixed"]

    def best(cells):  # brute force: the highest validation score, ties to the earliest grid point
        return max(cells, key=lambda c: (validation_score(c), -c.lr, -c.slow_alpha,
                                         -c.noise_lambda))

    for seed in sweep.seeds:
        searched = best([c for c in results if (c.variant, c.seed) == ("lorasc_lora", seed)])
        fixed = best([c for c in results if (c.variant, c.seed) == ("lorasc_lora", seed)
                      and (c.slow_alpha, c.noise_lambda) == (0.5, 1.0)])
        got = table["rows"]["lorasc_lora"]["rte"]["seeds"][seed]
        assert (got["lr"], got["slow_alpha"], got["noise_lambda"]) == \
            (searched.lr, searched.slow_alpha, searched.noise_lambda)
        got = table["rows"]["lorasc_lora_fixed"]["rte"]["seeds"][seed]
        assert (got["lr"], got["slow_alpha"], got["noise_lambda"]) == (fixed.lr, 0.5, 1.0)

    # LoRA chose among 2 learning rates; LoRASC among 2 x 2 x 2 = 8 configurations: 4x as many.
    search = table["search"]
    assert (search["lora"]["configs"], search["lora"]["times_lr_only"]) == (2, 1)
    assert (search["lorasc_lora"]["configs"], search["lorasc_lora"]["times_lr_only"]) == (8, 4)
    assert (search["lorasc_lora_fixed"]["configs"], search["lorasc_lora_fixed"]["times_lr_only"]) \
        == (2, 1)
    lines = table["markdown"].splitlines()
    assert [line.split(" | ")[:2] for line in lines[2:5]] == [
        ["| LoRA", "2"], ["| LoRA + LoRASC", "8 (4×)"], ["| LoRA + LoRASC (α 0.5, λ 1)", "2"]]
    assert "α in {0.5, 0.8} with every λ in {1, 10}" in lines[-1]

    # One missing (α, λ) run: the searched row waits for it, the fixed row does not need it.
    missing = Cell("rte", "lorasc_lora", 1, 1e-3, 0.8, 10.0)
    partial = paper_tables.build_table({c: r for c, r in results.items() if c != missing}, sweep)
    assert partial["rows"]["lorasc_lora"]["rte"]["n"] == 1
    assert partial["rows"]["lorasc_lora_fixed"]["rte"]["n"] == 2


def test_a_grid_without_the_fixed_point_or_with_one_point(tmp_path):
    without = Sweep(tmp_path, variants=["lorasc_dora"], alphas=[0.6, 0.8], lambdas=[10.0])
    rows = paper_selection.table_rows(without)
    assert [r.name for r in rows] == ["lorasc_dora"]
    caption = paper_tables.build_table({}, without)["markdown"].splitlines()[-1]
    assert "no row at the configs' α 0.5, λ 1" in caption
    single = Sweep(tmp_path, variants=["lorasc_dora"], alphas=[0.6], lambdas=[10.0])
    (row,) = paper_selection.table_rows(single)
    assert (row.name, row.label, row.configs_per_seed(single)) == \
        ("lorasc_dora", "DoRA + LoRASC (α 0.6, λ 10)", len(single.lrs))


# ---- robustness of the runner -----------------------------------------------------------------


def test_bad_sweep_inputs_are_named(tmp_path):
    check = paper_checks.check_sweep
    with pytest.raises(SweepError, match="unknown task.*'sst3'"):
        check(Sweep(tmp_path, tasks=["sst3"]))
    with pytest.raises(SweepError, match="unknown variant.*'lorasc'"):
        check(Sweep(tmp_path, variants=["lorasc"]))
    with pytest.raises(SweepError, match="optimizer.lr=1e-3.*--lrs"):
        check(Sweep(tmp_path, overrides=["optimizer.lr=1e-3"]))
    with pytest.raises(SweepError, match="lorasc.noise_lambda=2.*--lambdas"):
        check(Sweep(tmp_path, overrides=["lorasc.noise_lambda=2"]))
    with pytest.raises(SweepError, match="lorasc.slow_alpha=0.6.*--alphas"):
        check(Sweep(tmp_path, overrides=["lorasc.slow_alpha=0.6"]))
    with pytest.raises(SweepError, match="lorasc.cascade=true.*--variants"):
        check(Sweep(tmp_path, overrides=["lorasc.cascade=true"]))
    with pytest.raises(SweepError, match=r"--alphas 1\.5: lorasc\.slow_alpha must be"):
        check(Sweep(tmp_path, alphas=[0.5, 1.5]))
    with pytest.raises(SweepError, match=r"--lambdas -1: lorasc\.noise_lambda must be"):
        check(Sweep(tmp_path, lambdas=[-1.0]))
    with pytest.raises(SweepError, match="--alphas is empty.*lorasc_lora"):
        check(Sweep(tmp_path, variants=["lora", "lorasc_lora"], alphas=[]))
    with pytest.raises(SweepError, match="--lambdas repeats 10"):
        check(Sweep(tmp_path, lambdas=[10.0, 10]))
    with pytest.raises(SweepError, match="config not found: .*llama2_7b_sst2.yaml"):
        check(Sweep(tmp_path, tasks=["sst2"], config_dir=tmp_path))
    with pytest.raises(SweepError, match="sst2: the train split .* does not exist"):
        check(Sweep(tmp_path, tasks=["sst2"], overrides=[f"dataset.data_dir={tmp_path}"]))
    with pytest.raises(SweepError, match="--lrs repeats 0.0001"):
        check(Sweep(tmp_path, lrs=[1e-4, 0.0001]))
    with pytest.raises(SweepError, match="--seeds repeats 1"):
        check(Sweep(tmp_path, seeds=[1, 1]))


def test_cascade_frequency_variants_set_num_experts_and_fit_the_run(tmp_path):
    require_shared("superglue", "CB", "train.jsonl")
    assert [v for v in paper_methods.VARIANTS if v.startswith("lorasc_lora_T")] == \
        [f"lorasc_lora_T{t}" for t in paper_grids.EXPERT_COUNTS]
    cell = Cell("cb", "lorasc_lora_T2", 0, 1e-4, slow_alpha=0.6, noise_lambda=0.1)
    lorasc, _ = resolved("lorasc_lora_T2", cell.overrides())
    assert (lorasc.num_experts, lorasc.steps_per_expert, lorasc.slow_alpha, lorasc.noise_lambda) \
        == (2, None, 0.6, 0.1)
    assert "lorasc_lora_T2" not in paper_methods.DEFAULT_VARIANTS  # Table 4 runs only when asked
    paper_checks.check_sweep(Sweep(tmp_path, tasks=["cb"], variants=["lorasc_lora_T125"]))
    # CB: 250 train rows - 100 validation = 150 = 37 batches of 4 per epoch, x 5 epochs = 185.
    with pytest.raises(SweepError, match=r"cb / lorasc_lora_T1250: lorasc\.num_experts=1250, "
                                         r"but a cb run has only 185 optimizer steps"):
        paper_checks.check_sweep(Sweep(tmp_path, tasks=["cb"], variants=["lorasc_lora_T1250"]))


def test_a_crashed_cell_leaves_no_result_and_reruns_without_retraining(tmp_path):
    sweep = Sweep(tmp_path / "sweep", tasks=["sst2"], variants=["lora"], seeds=[0], lrs=[1e-4])
    cell = sweep.cells()[0]
    cfg = paper_cells.load_train_config(sweep.config_path("sst2"), sweep.train_overrides(cell))
    fp = paper_cells.fingerprint(cfg, sweep)
    # Training (with this config) finished before the crash: the final merged model is on disk.
    final = cell.run_dir(tmp_path / "sweep") / "epoch_4"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final.parent / "fingerprint.txt").write_text(fp + "\n")

    def crash(*args, **kwargs):
        raise RuntimeError("scorer died")

    with pytest.raises(RuntimeError, match="scorer died"):
        paper_cells.run_cell(cell, sweep, cfg, fp, score_fn=crash)
    assert not cell.result_path(tmp_path / "sweep").exists()

    scored = []

    def score(path, cfg, task, splits, **kwargs):
        scored.append(path)
        return {"validation": {"acc": 60.0}, "test": {"acc": 55.0}}

    # No `tune run` happens (train_cell would fail: there is no 7B checkpoint here).
    result = paper_cells.run_cell(cell, sweep, cfg, fp, score_fn=score)
    assert scored == [final] and result["test"] == {"acc": 55.0}
    assert json.loads(cell.result_path(tmp_path / "sweep").read_text())["fingerprint"] == fp
    assert not final.exists(), "checkpoints are removed once the cell is scored"

    # The stored result belongs to this config; another config is refused, not mixed in.
    with pytest.raises(SweepError, match="different config"):
        paper_cells.finished_result(cell, tmp_path / "sweep", "0" * 16)


def fake_tune(tmp_path, monkeypatch, output: str, exit_code: int):
    """Point the runner at a `tune` that prints ``output`` and exits with ``exit_code``."""
    script = tmp_path / "fake_tune"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {exit_code}\n")
    script.chmod(0o755)
    monkeypatch.setattr(paper_cells, "tune_executable", lambda: str(script))


def test_a_diverged_run_is_recorded_and_never_selected(tmp_path, monkeypatch):
    sweep = Sweep(tmp_path / "sweep", tasks=["rte"], variants=["lorasc_loraplus"], seeds=[0],
                  lrs=[1e-3], alphas=[0.6], lambdas=[10.0])
    (cell,) = sweep.cells()
    cfg = paper_cells.load_train_config(sweep.config_path("rte"), sweep.train_overrides(cell))
    fp = paper_cells.fingerprint(cfg, sweep)

    fake_tune(tmp_path, monkeypatch, "RuntimeError: CUDA error: out of memory", 1)
    name = "rte/lorasc_loraplus/seed0_lr0.001_alpha0.6_lambda10"
    with pytest.raises(SweepError, match=f"training failed for {name} \\(exit code 1\\)"):
        paper_cells.run_cell(cell, sweep, cfg, fp)
    assert not cell.result_path(tmp_path / "sweep").exists()
    # The exit code is the signal, not the log: a crash that mentions NaN still reruns.
    fake_tune(tmp_path, monkeypatch, "NonFiniteLossError: loss is nan at global step 3", 1)
    with pytest.raises(SweepError, match="exit code 1"):
        paper_cells.run_cell(cell, sweep, cfg, fp)

    fake_tune(tmp_path, monkeypatch, "loss is nan at global step 3", DIVERGED_EXIT_CODE)
    result = paper_cells.run_cell(cell, sweep, cfg, fp)
    assert result["diverged"] and result["test"] is None
    assert (result["slow_alpha"], result["noise_lambda"]) == (0.6, 10.0)
    assert paper_cells.finished_result(cell, tmp_path / "sweep", fp) == result

    ok = fake_result(Cell("rte", "lorasc_loraplus", 0, 1e-4, 0.6, 10.0), 10, 20)
    assert paper_selection.select_best([ok, result]) is ok
    assert paper_selection.select_best([result]) is None


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
    # LoRASC over two α at one λ: a searched row (2 configurations) and the fixed-point row.
    argv = ["--sweep-dir", str(sweep_dir), "--tasks", "sst2,cb", "--variants", "lorasc_lora",
            "--seeds", "0", "--lrs", "1e-3", "--alphas", "0.5,0.8", "--lambdas", "1",
            "--override", *tiny_overrides(ckpt, tokenizer)]

    assert pt.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 cells: 0 already finished (skipped), 4 run now, 0 failed" in out
    cells = sorted(p.relative_to(sweep_dir / "cells").as_posix()
                   for p in (sweep_dir / "cells").rglob("*.json"))
    assert cells == [f"{task}/lorasc_lora/seed0_lr0.001_alpha{a}_lambda1.json"
                     for task in ("cb", "sst2") for a in ("0.5", "0.8")]
    results = {}
    for path in (sweep_dir / "cells").rglob("*.json"):
        result = json.loads(path.read_text())
        assert 0 <= result["validation"]["acc"] <= 100 and 0 <= result["test"]["acc"] <= 100
        assert "lorasc.slow_alpha=" + repr(result["slow_alpha"]) in result["overrides"]
        results[(result["task"], result["slow_alpha"])] = result
    # The runs left their logs, not their checkpoints.
    assert len(list((sweep_dir / "runs").rglob("train.log"))) == 4
    assert not list((sweep_dir / "runs").rglob("epoch_*"))

    table_md = (sweep_dir / "table1.md").read_text()
    lines = table_md.splitlines()
    assert lines[0] == "| Method | Configs | SST-2 | CB | Avg. |"
    assert [line.split(" | ")[:2] for line in lines[2:4]] == [
        ["| LoRA + LoRASC", "2 (2×)"], ["| LoRA + LoRASC (α 0.5, λ 1)", "1"]]
    assert all(line.count("±") == 3 for line in lines[2:4])
    table = json.loads((sweep_dir / "table1.json").read_text())
    for task in ("sst2", "cb"):
        # Searched: the α with the better validation score (a tie goes to the smaller α).
        best = max((0.5, 0.8), key=lambda a: (results[(task, a)]["validation"]["acc"], -a))
        assert table["rows"]["lorasc_lora"][task]["seeds"]["0"]["slow_alpha"] == best
        assert table["rows"]["lorasc_lora"][task]["mean"] == results[(task, best)]["test"]["acc"]
        assert table["rows"]["lorasc_lora_fixed"][task]["mean"] == \
            results[(task, 0.5)]["test"]["acc"]
    assert table_md in out

    # Rerun: every cell is finished, so nothing trains or scores, and the table is the same.
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(paper_cells, "train_cell", must_not_run)
    monkeypatch.setattr(pt, "run_cell", must_not_run)
    mtimes = {p: p.stat().st_mtime_ns for p in (sweep_dir / "cells").rglob("*.json")}
    assert pt.main(argv) == 0
    assert "4 cells: 4 already finished (skipped), 0 run now, 0 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (sweep_dir / "cells").rglob("*.json")} == mtimes
    assert (sweep_dir / "table1.md").read_text() == table_md
