"""The diagnostics command on a tiny run: valid PNGs, and JSON numbers that match an
independent reading of the same log lines and checkpoints."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared_paths import REPO_ROOT
from lorasc_tune.diagnostics import DiagnosticsError, collect, main, read_metrics
from recipe_utils import make_assets, run_recipe, tiny_cfg
from recipe_utils import read_metrics as log_records

pytest.importorskip("matplotlib")

R, T = 4, 3  # tiny_cfg: lora_rank 4, 3 epochs of 4 steps, one expert per epoch
WEIGHTS = "model-00001-of-00001.safetensors"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The boundary record's names: (mean key, per-layer prefix). Recipes log the width
# λ·std(s·B_slow·A_slow) as noise_width; logs from before that rename call it noise_std.
NEW_NAMES = ("noise_width_mean", "noise_width/")
OLD_NAMES = ("noise_std_mean", "noise_std/")


def boundary_names(records):
    """The spelling a recipe's log uses (whichever version of the recipe wrote it)."""
    for names in (NEW_NAMES, OLD_NAMES):
        if any(names[0] in r for _, r in records):
            return names
    raise AssertionError("the log has no boundary record under either name")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    assets = make_assets(root / "assets")
    out = {}
    # λ = 1 exercises the noise log; λ = 0 leaves the cascade's rank growth without the
    # full-rank noise, as in test_engine's rank test.
    for name, lam in (("noise", 1.0), ("plain", 0.0)):
        out[name] = root / name
        run_recipe(tiny_cfg(assets, out[name], **{"lorasc.noise_lambda": lam}))
    return assets, out


def assert_png(path: Path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 300, (path, img.shape)
    assert float(img[..., :3].std()) > 0.01, f"{path} is blank"


def test_plots_and_numbers_match_the_run(runs):
    assets, out = runs
    run = out["noise"]
    assert main([str(run)]) == 0
    diag = run / "diagnostics"
    for name in ("loss.png", "lr.png", "spectrum.png", "noise.png"):
        assert_png(diag / name)
    data = json.loads((diag / "diagnostics.json").read_text())

    rows = log_records(run)
    train = [(s, r) for s, r in rows if "loss" in r]
    mean_key, layer_prefix = boundary_names(rows)
    starts = [(s, r) for s, r in rows if mean_key in r]
    assert data["train"]["step"] == [s for s, _ in train] == list(range(1, T * 4 + 1))
    assert data["train"]["loss"] == [r["loss"] for _, r in train]
    assert data["train"]["lr"] == [r["lr"] for _, r in train]
    # Boundaries: the steps where the logged expert number changes.
    changes = [s for i, (s, r) in enumerate(train)
               if i == 0 or r["expert"] != train[i - 1][1]["expert"]]
    assert [b["first_step"] for b in data["boundaries"]] == changes == [1, 5, 9]
    assert [b["after_step"] for b in data["boundaries"]] == [s for s, _ in starts]
    assert data["num_experts"] == T and data["lora_rank"] == R

    # Noise: zero before expert 1, the logged λ·std afterwards, per layer and expert.
    assert data["noise"]["experts"] == [1, 2, 3]
    for e, (_, rec) in zip(data["noise"]["experts"], starts):
        for layer, values in data["noise"]["per_layer"].items():
            assert values[e - 1] == rec[f"{layer_prefix}{layer}"]
    assert set(data["noise"]["per_layer"]) == {f"layers.{i}.attn.{m}"
                                               for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert all(v[0] == 0.0 and v[1] > 0 for v in data["noise"]["per_layer"].values())

    # Spectrum: svdvals(W_T - W_0) from the exported safetensors and the base checkpoint.
    spec = data["spectrum"]
    assert spec["final"] == "epoch_2"
    w_t = load_file(str(run / "epoch_2" / WEIGHTS))
    w_0 = load_file(str(assets["ckpt"] / WEIGHTS))
    assert set(spec["matrices"]) == set(data["noise"]["per_layer"])
    for name, m in spec["matrices"].items():
        i, mod = re.match(r"layers\.(\d+)\.attn\.(\w+)", name).groups()
        key = f"model.layers.{i}.self_attn.{mod}.weight"
        assert m["key"] == key
        expected = torch.linalg.svdvals(w_t[key].double() - w_0[key].double())
        torch.testing.assert_close(torch.tensor(m["singular_values"], dtype=torch.float64),
                                   expected[: spec["top_k"]], rtol=1e-9, atol=1e-12)
        assert m["numerical_rank"] == int((expected > spec["rtol"] * expected[0]).sum())


def test_rank_grows_beyond_one_expert(runs):
    _, out = runs
    data = collect(out["plain"], top_k=64)
    for name, m in data["spectrum"]["matrices"].items():
        # One LoRA expert adds at most rank r; the cascade of T experts up to T·r.
        assert R < m["numerical_rank"] <= T * R, (name, m["numerical_rank"])
    assert all(v == [0.0] * T for v in data["noise"]["per_layer"].values())


def test_cli_subprocess_with_selection(runs, tmp_path):
    _, out = runs
    dest = tmp_path / "d"
    proc = subprocess.run(
        [sys.executable, "-m", "lorasc_tune.diagnostics", str(out["plain"]), "--out", str(dest),
         "--matrices", "v_proj", "--layers", "1", "--top-k", "8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("loss.png", "lr.png", "spectrum.png", "noise.png"):
        assert_png(dest / name)
    spec = json.loads((dest / "diagnostics.json").read_text())["spectrum"]
    assert list(spec["matrices"]) == ["layers.1.attn.v_proj"]
    assert len(spec["matrices"]["layers.1.attn.v_proj"]["singular_values"]) == 8


def test_missing_inputs_are_named(runs, tmp_path, capsys):
    _, out = runs
    assert main([str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    # Logs without any exported model: the spectrum names what is missing.
    bare = tmp_path / "bare"
    (bare / "logs").mkdir(parents=True)
    src = next((out["plain"] / "logs").glob("log_*.txt"))
    (bare / "logs" / src.name).write_text(src.read_text())
    with pytest.raises(DiagnosticsError, match="epoch_N"):
        collect(bare)
    assert collect(bare, with_spectrum=False)["spectrum"] is None
    (bare / "logs" / src.name).write_text("not a metric line\n")
    with pytest.raises(DiagnosticsError, match="no metric log"):
        collect(bare, with_spectrum=False)


def boundary_fields(spellings, mean, width):
    """A boundary record's noise fields under each of ``spellings``."""
    out = {}
    for mean_key, prefix in spellings:
        out.update({mean_key: mean, f"{prefix}layers.0.attn.q_proj": width})
    return out


SPELLINGS = {"new": [NEW_NAMES], "old": [OLD_NAMES], "both": [OLD_NAMES, NEW_NAMES]}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_resumed_and_restarted_logs(tmp_path, spelling):
    """A resumed run's later log file supersedes the steps it repeats; a fresh start
    (expert 1 logged again) supersedes every earlier file. Logs with the noise width under
    its current name, its old name, or both read the same."""
    logs = tmp_path / "logs"
    logs.mkdir()

    def write(ts, lines):
        (logs / f"log_{ts}.txt").write_text("".join(line + "\n" for line in lines))

    def start(step, expert, mean, width):
        fields = boundary_fields(SPELLINGS[spelling], mean, width)
        return (f"Step {step} | expert:{expert} "
                + " ".join(f"{k}:{v}" for k, v in fields.items()) + " ")

    step = "Step {} | loss:{} lr:0.1 expert:{} "
    write(100, [start(0, 1, 0.0, 0.0)] + [step.format(s, 9.0, 1) for s in (1, 2, 3)]
          + [start(3, 2, 0.5, 0.5), step.format(4, 9.0, 2)])
    write(200, [step.format(s, 1.0, 2) for s in (4, 5, 6)])  # resumed after step 3
    m = read_metrics(logs)
    assert m.step == [1, 2, 3, 4, 5, 6]
    assert m.series["loss"] == [9.0, 9.0, 9.0, 1.0, 1.0, 1.0]
    assert m.boundaries() == [{"expert": 1, "after_step": 0, "first_step": 1},
                              {"expert": 2, "after_step": 3, "first_step": 4}]
    assert m.noise == {1: {"layers.0.attn.q_proj": 0.0}, 2: {"layers.0.attn.q_proj": 0.5}}
    write(300, [start(0, 1, 0.0, 0.0), step.format(1, 5.0, 1)])  # started over
    m = read_metrics(logs)
    assert m.step == [1] and m.series["loss"] == [5.0] and m.num_experts == 1


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_tensorboard_event_files(tmp_path, spelling):
    """The same records written by torchtune's TensorBoardLogger read back the same way,
    under either name of the noise width (a record with both is still one expert start)."""
    pytest.importorskip("tensorboard")
    from torchtune.training.metric_logging import TensorBoardLogger

    logger = TensorBoardLogger(log_dir=str(tmp_path / "tb"))
    for e, after in ((1, 0), (2, 2)):
        if e == 2:
            logger.log_dict({"loss": 3.0, "lr": 0.2, "expert": 1}, step=2)
        logger.log_dict({"expert": e, **boundary_fields(SPELLINGS[spelling], 0.1 * (e - 1),
                                                        0.1 * (e - 1))}, step=after)
        if e == 1:
            logger.log_dict({"loss": 4.0, "lr": 0.1, "expert": 1}, step=1)
    logger.log_dict({"loss": 2.0, "lr": 0.3, "expert": 2}, step=3)
    logger.close()
    m = read_metrics(tmp_path / "tb")
    assert m.step == [1, 2, 3] and m.expert == [1, 1, 2]
    assert m.series["loss"] == [4.0, 3.0, 2.0]
    assert [b["first_step"] for b in m.boundaries()] == [1, 3]
    assert m.noise == {1: {"layers.0.attn.q_proj": 0.0},
                       2: {"layers.0.attn.q_proj": pytest.approx(0.1)}}
