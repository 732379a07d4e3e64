"""The FSDP2 recipe on CPU (gloo, 1 and 2 processes) against the single-device recipe."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shared_paths import REPO_ROOT
from lorasc_tune.checkpoint import STATE_DIRNAME
from recipe_utils import load_merged, make_assets, run_recipe, tiny_cfg

# 3 epochs x 4 steps, a global batch of 4, an expert every 3 steps (boundaries mid-epoch),
# slow expert and noise on. Dropout off: each rank draws its own masks.
COMMON = {"epochs": 3, "lorasc.steps_per_expert": 3, "lorasc.slow_alpha": 0.5,
          "lorasc.noise_lambda": 1.0, "model.lora_dropout": 0.0}


def tune_run_distributed(cfg, nproc: int, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / f"cfg_{nproc}_{abs(hash(cfg.output_dir))}.yaml"
    OmegaConf.save(cfg, path)
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run(
        [str(tune), "run", "--nnodes", "1", "--nproc_per_node", str(nproc), "--standalone",
         "lorasc_tune/recipes/lorasc_lora_distributed.py", "--config", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference runs shared by the tests: single device, FSDP2 on 2 and on 1 process.

    The 2-process run checkpoints activations, which renames every module (torch's checkpoint
    wrapper) but must change neither the results nor the keys of its saved states: the
    1-process run, without it, resumes from them.
    """
    tmp = tmp_path_factory.mktemp("dist")
    assets = make_assets(tmp / "assets")
    out = {"tmp": tmp, "assets": assets}
    out["single"] = tmp / "single"
    run_recipe(tiny_cfg(assets, out["single"], batch_size=4, **COMMON))
    for nproc, bs in ((2, 2), (1, 4)):
        d = tmp / f"fsdp{nproc}"
        cfg = tiny_cfg(assets, d, batch_size=bs, save_every_n_steps=1, keep_last_n_states=100,
                       enable_activation_checkpointing=nproc == 2, **COMMON)
        tune_run_distributed(cfg, nproc, tmp)
        out[f"fsdp{nproc}"] = d
    return out


def merged(run_dir: Path, epoch: int, tmp: Path):
    return load_merged(run_dir / f"epoch_{epoch}", tmp / f"reload_{run_dir.name}_{epoch}")


def test_two_processes_match_single_device_after_four_experts(runs):
    tmp = runs["tmp"]
    assert_same_weights(merged(runs["fsdp2"], 2, tmp), merged(runs["single"], 2, tmp), atol=1e-5)


def test_noise_and_merges_do_not_depend_on_world_size(runs):
    # epoch_0 holds the first merge and the noise of expert 2 (begun at step 3).
    tmp = runs["tmp"]
    one, two = merged(runs["fsdp1"], 0, tmp), merged(runs["fsdp2"], 0, tmp)
    assert_same_weights(one, two, atol=1e-6)
    base = load_merged(runs["assets"]["ckpt"], tmp / "reload_base")
    q = "layers.0.attn.q_proj.weight"
    assert (one[q] - base[q]).abs().max() > 1e-4  # the comparison is not vacuous


# Steps 5 and 7 are mid-expert; step 6 is a boundary (expert 2 merged, expert 3 not begun).
@pytest.mark.parametrize("saved_by,resumed_by,step", [(2, 1, 5), (1, 2, 7), (2, 1, 6)])
def test_sharded_resume_on_another_world_size(runs, saved_by, resumed_by, step):
    """Resume a sharded state saved by N processes on M processes; reach the same weights."""
    tmp = runs["tmp"]
    src = runs[f"fsdp{saved_by}"]
    state = src / STATE_DIRNAME / f"step_{step:08d}"
    assert (state / "meta.pt").is_file()
    out = tmp / f"resume_{saved_by}_to_{resumed_by}_at_{step}"
    shutil.copytree(state, out / STATE_DIRNAME / state.name)
    cfg = tiny_cfg(runs["assets"], out, batch_size=4 // resumed_by, resume_from_checkpoint=True,
                   **COMMON)
    proc = tune_run_distributed(cfg, resumed_by, tmp)
    assert f"saved by {saved_by} processes" in proc.stdout + proc.stderr
    assert not (out / "epoch_0").exists()  # it really started from the saved state
    assert_same_weights(merged(out, 2, tmp), merged(src, 2, tmp), atol=1e-5)


def test_resume_refuses_a_different_global_batch(runs):
    tmp = runs["tmp"]
    src = runs["fsdp2"] / STATE_DIRNAME / f"step_{5:08d}"
    out = tmp / "resume_bad_batch"
    shutil.copytree(src, out / STATE_DIRNAME / src.name)
    cfg = tiny_cfg(runs["assets"], out, batch_size=2, resume_from_checkpoint=True, **COMMON)
    path = tmp / "bad.yaml"
    OmegaConf.save(cfg, path)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tune"), "run", "--nnodes", "1", "--nproc_per_node", "1",
         "--standalone", "lorasc_tune/recipes/lorasc_lora_distributed.py", "--config", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "global batch of 4" in proc.stderr and "this run has 2" in proc.stderr


def test_dora_under_fsdp2_matches_single_device(runs):
    """DoRA's magnitude is initialised from each rank's rows and carried across experts."""
    tmp, assets = runs["tmp"], runs["assets"]
    single, fsdp = tmp / "dora_single", tmp / "dora_fsdp2"
    run_recipe(tiny_cfg(assets, single, batch_size=4, **{"model.use_dora": True}, **COMMON))
    tune_run_distributed(tiny_cfg(assets, fsdp, batch_size=2, **{"model.use_dora": True}, **COMMON),
                         2, tmp)
    assert_same_weights(merged(fsdp, 2, tmp), merged(single, 2, tmp), atol=1e-5)


def test_a_damaged_sharded_state_is_passed_over(runs):
    """Bytes flipped in the newest sharded state: the resume warns, uses the one before it
    and still reaches the uninterrupted weights."""
    tmp = runs["tmp"]
    out = tmp / "resume_damaged"
    for step in (5, 6):
        src = runs["fsdp2"] / STATE_DIRNAME / f"step_{step:08d}"
        shutil.copytree(src, out / STATE_DIRNAME / src.name)
    newest = out / STATE_DIRNAME / f"step_{6:08d}"
    victim = max((p for p in newest.iterdir() if p.name.endswith(".distcp")),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    cfg = tiny_cfg(runs["assets"], out, batch_size=4, resume_from_checkpoint=True, **COMMON)
    proc = tune_run_distributed(cfg, 1, tmp)
    log = proc.stdout + proc.stderr
    assert f"not resuming from {newest}: {victim.name} does not match its digest" in log
    assert "step_00000005 instead" in log
    assert_same_weights(merged(out, 2, tmp), merged(runs["fsdp2"], 2, tmp), atol=1e-5)
