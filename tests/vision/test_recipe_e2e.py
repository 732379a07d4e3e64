"""End to end on real images: `tune run` the vision recipe on ants vs bees, then evaluate.

The tiny tower starts from an OpenCLIP-layout checkpoint (a whole CLIP, text tower included,
random weights) so that loading, the cascade, the merge and the write-back in the source layout
all run as they would for bigG.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorasc_tune.checkpoint import training_state_path
from vision_helpers import randomize_

REPO = Path(__file__).resolve().parents[2]
TUNE = Path(sys.executable).parent / "tune"


def _tiny_open_clip_checkpoint(path: Path) -> dict:
    open_clip_model = pytest.importorskip("open_clip.model")
    clip = open_clip_model.CLIP(  # the shape of configs/clip_tiny_hymenoptera.yaml
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8,
                        mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1))
    sd = randomize_(clip, std=0.05).state_dict()
    torch.save(sd, path)
    return sd


def _run(cmd, **kw):
    # One intra-op thread: the model is tiny, and on a busy 2-core runner spinning OpenMP
    # threads slow a step down by 10x or more.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          **kw)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def test_tune_run_on_hymenoptera(tmp_path, shared_data):
    data = shared_data("hymenoptera_data")
    shared_data("imagenet_index")
    src = tmp_path / "open_clip_pytorch_model.bin"
    source = _tiny_open_clip_checkpoint(src)
    out = tmp_path / "run"

    log = _run([str(TUNE), "run", "lorasc_tune/recipes/lorasc_clip_imagenet.py",
                "--config", "configs/clip_tiny_hymenoptera.yaml",
                f"output_dir={out}", f"data.root={data}", f"checkpoint.path={src}",
                f"eval.sets.folder={data / 'val'}"])
    assert "LoRASC: 2 expert(s)" in log
    assert "expert 1 merged" in log and "expert 2 merged" in log
    assert "Estimated peak memory at batch 16" in log

    # The merged model is written back in the source's layout: same file, keys and dtypes,
    # the text tower untouched, the adapted q/v rows of the fused in_proj changed.
    merged = out / "merged"
    meta = json.loads((merged / "vision_meta.json").read_text())
    assert meta["layout"] == {"kind": "open_clip", "prefix": "visual."}
    assert meta["class_ids"] == ["ants", "bees"]
    written = torch.load(merged / src.name, weights_only=True)
    assert list(written) == list(source)
    assert all(written[k].dtype == source[k].dtype for k in source)
    assert all(torch.equal(written[k], source[k]) for k in source if not k.startswith("visual."))
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    q, k, v = written[key].chunk(3)
    q0, k0, v0 = source[key].chunk(3)
    assert torch.equal(k, k0) and not torch.equal(q, q0) and not torch.equal(v, v0)
    assert torch.equal(written["visual.conv1.weight"], source["visual.conv1.weight"])

    report = json.loads((out / "eval_report.json").read_text())["results"]
    assert report["folder"]["n"] == 153  # val: 70 ants + 83 bees

    # The stand-alone evaluator reloads the exported folder and gets the same numbers.
    js = tmp_path / "robustness.json"
    table = _run([sys.executable, "-m", "evals.robustness", "--checkpoint", str(merged),
                  "--set", f"folder={data / 'val'}", "--json", str(js), "--num-workers", "2"])
    assert "| folder |" in table
    again = json.loads(js.read_text())["results"]["folder"]
    assert again["n"] == 153
    assert again["top1"] == pytest.approx(report["folder"]["top1"])


def test_resume_at_an_epoch_boundary_is_exact(tmp_path, shared_data):
    """Re-running epoch 2 from the saved state gives the uninterrupted run's model, bit for bit."""
    data = shared_data("hymenoptera_data")
    src = tmp_path / "open_clip_pytorch_model.bin"
    _tiny_open_clip_checkpoint(src)
    base = [str(TUNE), "run", "lorasc_tune/recipes/lorasc_clip_imagenet.py",
            "--config", "configs/clip_tiny_hymenoptera.yaml", f"data.root={data}",
            f"checkpoint.path={src}", "eval.sets={}"]
    _run(base + [f"output_dir={tmp_path / 'a'}"])
    # The last epoch's state marks the run finished; without it, the newest is the one
    # written after epoch 1, as a run killed during its last epoch would have left.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    final_state = training_state_path(tmp_path / "b")
    assert torch.load(final_state, weights_only=False)["finished"]
    final_state.with_name(final_state.name + ".sha256").unlink()
    final_state.unlink()
    log = _run(base + [f"output_dir={tmp_path / 'b'}", "resume_from_checkpoint=True"])
    # Saved at the boundary: expert 1 is merged, expert 2 (and its noise) begins on resuming.
    assert "Resumed at epoch 1, step 15, expert 1 finished, the next begins now" in log
    for name in (src.name, "head.safetensors"):
        assert (tmp_path / "a" / "merged" / name).read_bytes() == \
            (tmp_path / "b" / "merged" / name).read_bytes(), name
