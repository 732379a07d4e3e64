"""Nothing lost, nothing silently wrong: failures inside the epoch save, corrupted states,
refused resumes that must leave the run untouched, finished runs and crash leftovers."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

import lorasc_tune.checkpoint as checkpoint
import lorasc_tune.recipe_common as common
from lorasc_tune.checkpoint import DIGEST_SUFFIX, STATE_DIRNAME, training_state_path
from lorasc_tune.recipes.lorasc_lora import LoRASCRecipeSingleDevice
from recipe_utils import load_merged, run_recipe, tiny_cfg

EPOCHS = 3  # 4 steps each; one expert per epoch
FAIL_AT_STEP = 8  # the end of epoch 1: epoch_0/ and a state exist, epoch_1/ is being saved


class SimulatedFailure(OSError):
    """Stands for a kill or a full disk at one point of the save sequence."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets):
    """The uninterrupted run every recovered run must equal, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS))
    return out


def epoch_tensors(out: Path, epoch: int, scratch: Path):
    return load_merged(out / f"epoch_{epoch}", scratch / f"reload_{epoch}")


def assert_same_epochs(out: Path, reference: Path, scratch: Path) -> None:
    for epoch in range(EPOCHS):
        want = epoch_tensors(reference, epoch, scratch / "want")
        got = epoch_tensors(out, epoch, scratch / "got")
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"epoch_{epoch}/{k}"


def assert_no_leftovers(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))
                 or p.name.startswith(".staging")]
    assert leftovers == []
    for state in (out / STATE_DIRNAME).glob("training_state_*.pt"):
        assert state.with_name(state.name + DIGEST_SUFFIX).is_file(), state


def folder_hashes(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail_at(monkeypatch, owner, name, recipe_step, message, leave_behind=None):
    """Make ``owner.name`` fail, as a kill or a full disk would, when the run reaches
    FAIL_AT_STEP (after ``leave_behind``, given the call's arguments, writes what such a
    failure leaves on disk)."""
    real = getattr(owner, name)

    def failing(*args, **kwargs):
        if recipe_step() == FAIL_AT_STEP:
            if leave_behind is not None:
                leave_behind(*args, **kwargs)
            raise SimulatedFailure(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _fail_in_state_write(monkeypatch, recipe_step):
    """kill -9 inside the state's write: a torn temporary file is left, nothing replaced."""
    def torn(obj, path):
        Path(path).parent.joinpath(f".{Path(path).name}.x1y2.tmp").write_bytes(b"PK\x03")

    _fail_at(monkeypatch, checkpoint, "atomic_torch_save", recipe_step,
             "killed while writing the training state", torn)


def _fail_before_digest(monkeypatch, recipe_step):
    """The state is on disk, but the process died before its digest was written."""
    _fail_at(monkeypatch, checkpoint, "atomic_write_text", recipe_step, "killed before the digest")


def _fail_in_export(monkeypatch, recipe_step):
    """The disk fills while the checkpointer writes the staging folder."""
    from torchtune.training import FullModelHFCheckpointer

    def half_written(self, state_dict, epoch, **kwargs):
        folder = Path(self._output_dir) / f"epoch_{epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 100)

    _fail_at(monkeypatch, FullModelHFCheckpointer, "save_checkpoint", recipe_step,
             "No space left on device", half_written)


def _fail_in_move(monkeypatch, recipe_step):
    """The staging folder is complete, but the process dies before it is moved into place."""
    _fail_at(monkeypatch, common, "replace_dir", recipe_step, "killed before the rename")


def _fail_in_cleanup(monkeypatch, recipe_step):
    """The new state and digest are written; the process dies while pruning old states."""
    _fail_at(monkeypatch, checkpoint, "prune_states", recipe_step,
             "killed while removing old states")


@pytest.mark.parametrize("inject", [_fail_in_state_write, _fail_before_digest, _fail_in_export,
                                    _fail_in_move, _fail_in_cleanup],
                         ids=["state-write", "digest", "export-to-staging", "move-into-place",
                              "cleanup"])
def test_a_failure_anywhere_in_the_epoch_save_is_recovered_exactly(
        assets, reference, tmp_path, monkeypatch, inject):
    out = tmp_path / "run"
    holder = {}
    inject(monkeypatch, lambda: holder["recipe"]._cascade.global_step)
    cfg = tiny_cfg(assets, out, epochs=EPOCHS)
    recipe = LoRASCRecipeSingleDevice(cfg)
    holder["recipe"] = recipe
    recipe.setup(cfg)
    with pytest.raises(OSError):  # SimulatedFailure, or the plain full-disk error it becomes
        recipe.train()
    recipe.cleanup()
    monkeypatch.undo()

    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, resume_from_checkpoint=True))
    assert_same_epochs(out, reference, tmp_path)
    assert_no_leftovers(out)


def _flip_bytes_in_largest_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        data = bytearray(f.read(8))
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("damage", ["flipped", "truncated", "no-digest"])
def test_a_damaged_state_is_never_used(assets, reference, tmp_path, damage, caplog):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS), crash_at_step=FAIL_AT_STEP + 2)
    newest = training_state_path(out)
    assert newest.name == f"training_state_{FAIL_AT_STEP:08d}.pt"
    if damage == "flipped":
        _flip_bytes_in_largest_tensor(newest)
    elif damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        newest.with_name(newest.name + DIGEST_SUFFIX).unlink()
    with caplog.at_level("WARNING"):
        run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, resume_from_checkpoint=True))
    assert f"not resuming from {newest}" in caplog.text
    assert "training_state_00000004.pt (step 4) instead" in caplog.text
    # Resumed from the end of epoch 0: everything after it was redone, exactly.
    assert_same_epochs(out, reference, tmp_path)


def test_no_intact_state_is_refused_naming_each_file(assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS), crash_at_step=FAIL_AT_STEP + 2)
    states = sorted((out / STATE_DIRNAME).glob("training_state_*.pt"))
    assert len(states) == 2
    for state in states:
        _flip_bytes_in_largest_tensor(state)
    before = folder_hashes(out)
    with pytest.raises(ValueError, match=r"no intact training state.*training_state_00000008\.pt: "
                                         r"its bytes do not match.*training_state_00000004\.pt"):
        run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, resume_from_checkpoint=True))
    assert folder_hashes(out) == before


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 2}, r"global batch of 4 .* this run has 2"),
    ({"model.lora_rank": 8}, r"lora_a\.weight has shape \(4, 64\) but the model's has \(8, 64\)"),
    ({"seed": 1}, r"seed=1 differs from the checkpoint's 0"),
    ({"lorasc.slow_alpha": 0.3}, r"lorasc\.slow_alpha=0\.3 differs from the checkpoint's 0\.5"),
    ({"lorasc.num_experts": 99}, r"lorasc\.num_experts=99 is more than the run's 12"),
    ({"batch_size": 200}, r"an epoch has 0 optimizer steps"),
])
def test_a_refused_resume_leaves_every_file_as_it_was(assets, tmp_path, overrides, match):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, save_every_n_steps=1), crash_at_step=6)
    before = folder_hashes(out)
    assert any(name.startswith("logs/") for name in before)
    with pytest.raises((ValueError, KeyError), match=match):
        run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, save_every_n_steps=1,
                            resume_from_checkpoint=True, **overrides))
    assert folder_hashes(out) == before


def test_resuming_a_finished_run_changes_nothing(assets, tmp_path, capsys):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=2))
    before = folder_hashes(out)
    common.run_recipe(LoRASCRecipeSingleDevice,
                      tiny_cfg(assets, out, epochs=2, resume_from_checkpoint=True))
    assert "had already finished (step 8); nothing was changed" in capsys.readouterr().out
    assert folder_hashes(out) == before


def test_seed_null_resumes_with_the_saved_seed(assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=2, seed=None, **{"model.lora_dropout": 0.1}),
               crash_at_step=6)
    seed = torch.load(training_state_path(out), weights_only=False)["seed"]
    run_recipe(tiny_cfg(assets, out, epochs=2, seed=None, resume_from_checkpoint=True,
                        **{"model.lora_dropout": 0.1}))
    ref = tmp_path / "ref"
    run_recipe(tiny_cfg(assets, ref, epochs=2, seed=seed, **{"model.lora_dropout": 0.1}))
    want = epoch_tensors(ref, 1, tmp_path / "want")
    got = epoch_tensors(out, 1, tmp_path / "got")
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_crash_leftovers_are_removed_at_the_next_start(assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS), crash_at_step=6)
    (out / ".staging" / "epoch_1").mkdir(parents=True)
    (out / ".staging" / "epoch_1" / "model.safetensors").write_bytes(b"partial")
    (out / "epoch_0.old").mkdir()
    (out / STATE_DIRNAME / ".training_state_00000005.pt.abcd.tmp").write_bytes(b"torn")
    (out / STATE_DIRNAME / "training_state_00000005.pt").write_bytes(b"no digest")
    run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, resume_from_checkpoint=True))
    assert_no_leftovers(out)
    assert not (out / STATE_DIRNAME / "training_state_00000005.pt").exists()


def test_a_mistyped_top_level_key_is_refused_naming_the_nearest(assets, tmp_path):
    from lorasc_tune.config import LoRASCConfigError

    out = tmp_path / "run"
    with pytest.raises(LoRASCConfigError, match=r"unknown top-level config key\(s\): "
                                                r"'save_every_n_step' \(did you mean "
                                                r"'save_every_n_steps'\?\)"):
        run_recipe(tiny_cfg(assets, out, save_every_n_step=2))
    assert not out.exists()


def test_stock_keys_the_recipe_ignores_are_named_once(assets, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run_recipe(tiny_cfg(assets, tmp_path / "run", epochs=1, save_adapter_weights_only=False,
                            optimizer_in_bwd=False, log_level="INFO"))
    warnings = [r.getMessage() for r in caplog.records if "ignoring torchtune key" in r.getMessage()]
    assert len(warnings) == 1
    assert "optimizer_in_bwd" in warnings[0] and "log_level" in warnings[0]
    # Read now (PEFT adapters, tests/test_peft_adapter.py), so not named as ignored.
    assert "save_adapter_weights_only" not in warnings[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_an_error(assets, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"device: cuda was asked for, but this machine has no "
                                         r"CUDA device"):
        run_recipe(tiny_cfg(assets, out, device="cuda"))
    assert not out.exists()


def test_truncated_rows_are_counted_and_reported_once(assets, tmp_path, caplog):
    import json

    from lorasc_tune.config import check_dataset_rows
    from torchtune.datasets import alpaca_dataset
    from torchtune.models.llama2 import llama2_tokenizer

    rows = json.loads(Path(assets["data"]).read_text())[:20]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    # The independent count: untruncated lengths, and a limit that about half the rows reach.
    full = llama2_tokenizer(str(assets["tokenizer"]), prompt_template=None)
    lengths = sorted(len(r["tokens"]) for r in alpaca_dataset(full, source="json",
                                                              data_files=str(path), split="train"))
    limit = lengths[len(lengths) // 2]
    expected = sum(n >= limit for n in lengths)
    assert 0 < expected < len(rows)
    tokenizer = llama2_tokenizer(str(assets["tokenizer"]), max_seq_len=limit, prompt_template=None)
    dataset = alpaca_dataset(tokenizer, source="json", data_files=str(path), split="train")
    with caplog.at_level("WARNING"):
        assert check_dataset_rows(dataset, max_seq_len=limit) == expected
    assert caplog.text.count(f"rows truncated to {limit} tokens") == 1
    assert f"{expected} of 20 dataset rows truncated" in caplog.text


def test_a_busy_output_dir_is_refused_until_its_process_dies(assets, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lorasc_tune.io import lock_output_dir; "
         "lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another LoRASC run \(process "
                                               rf"{holder.pid}\)"):
            run_recipe(tiny_cfg(assets, out, epochs=1))
        assert not (out / "logs").exists()
    finally:
        holder.kill()  # as kill -9 would: the lock goes with the process
        holder.wait()
    run_recipe(tiny_cfg(assets, out, epochs=1))
    assert (out / "epoch_0").is_dir()


def test_restart_expert_recovers_from_a_divergence(assets, reference, tmp_path):
    """Expert 2 diverges at lr 1e30 (finite but ruined: the loss sits at log(vocab)) and the
    run is stopped mid-expert. A plain resume would continue the ruined expert with its saved
    optimizer, old lr included; restart_expert at the original lr begins expert 2 again from
    the state saved when expert 1 ended, with a fresh optimizer, the same A draw and the same
    noise, and the run finishes exactly as if it had never diverged."""
    out = tmp_path / "run"
    overrides = dict(epochs=EPOCHS, save_every_n_steps=1)
    run_recipe(tiny_cfg(assets, out, **overrides), crash_at_step=5)  # saved at step 4
    run_recipe(tiny_cfg(assets, out, resume_from_checkpoint=True,
                        **{"optimizer.lr": 1e30, "clip_grad_norm": None}, **overrides),
               crash_at_step=7)
    ruined = torch.load(training_state_path(out), weights_only=False)
    assert ruined["global_step"] == 6 and ruined["engine"]["expert_open"]
    assert max(t.abs().max().item() for t in ruined["trainable"].values()) > 1e20
    recipe = run_recipe(tiny_cfg(assets, out, resume_from_checkpoint=True, restart_expert=True,
                                 **overrides))
    assert recipe._cascade.engine.expert == 3
    assert_same_epochs(out, reference, tmp_path)
    assert all(int(p.name[15:23]) > 6 or int(p.name[15:23]) <= 4
               for p in (out / STATE_DIRNAME).glob("training_state_*.pt"))


@pytest.mark.parametrize("disk_kib", [1200, 1300])
def test_a_full_disk_is_survived(assets, reference, tmp_path, disk_kib):
    """A real full disk (a small tmpfs): 1200 KiB fills while epoch_1/ is exported, 1300 KiB
    while its state is written. After freeing space, a resume finishes the run exactly."""
    import os
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk_kib}k", "tmpfs",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        out = disk / "run"
        with pytest.raises(OSError, match=r"failed: no space left on the device; the .* intact"):
            run_recipe(tiny_cfg(assets, out, epochs=EPOCHS))
        assert (out / "epoch_0").is_dir() and not (out / "epoch_2").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_recipe(tiny_cfg(assets, out, epochs=EPOCHS, resume_from_checkpoint=True))
        assert_same_epochs(out, reference, tmp_path)
        assert_no_leftovers(out)
    finally:
        # Lazy: the failed run's open log file (its recipe never reached cleanup) would make
        # a plain umount fail with "busy" and leave the mount behind after the test.
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)


def test_data_file_errors_name_the_file_line_and_row(assets, tmp_path):
    import json

    rows = json.loads(Path(assets["data"]).read_text())[:12]
    rows[7]["output"] = 5
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps(rows, indent=1))
    with pytest.raises(ValueError, match=rf"dataset\.data_files: {typed} row 7 has 'output' = 5 "
                                         rf"of type int, where the other rows have type str"):
        run_recipe(tiny_cfg(assets, tmp_path / "a", **{"dataset.data_files": str(typed)}))
    rows[7]["output"] = "fine"
    broken = tmp_path / "broken.json"
    text = json.dumps(rows, indent=1).splitlines()
    text[5] = text[5].rstrip(",")  # a missing comma on line 6
    broken.write_text("\n".join(text))
    with pytest.raises(ValueError, match=rf"{broken} is not valid JSON: line 7, column"):
        run_recipe(tiny_cfg(assets, tmp_path / "b", **{"dataset.data_files": str(broken)}))
    jsonl = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[3] = lines[3][:-1]  # a cut object on line 4
    jsonl.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"{jsonl} is not valid JSON: line 4, column"):
        run_recipe(tiny_cfg(assets, tmp_path / "c", **{"dataset.data_files": str(jsonl)}))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_weights_that_do_not_match_their_config_json_are_named(assets, tmp_path):
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(assets["ckpt"], ckpt)
    conf = json.loads((ckpt / "config.json").read_text())
    conf["num_attention_heads"] = 8  # the weights were written with 4
    conf["num_key_value_heads"] = 8
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"do not have the shapes its config\.json describes "
                                         r"\(.*num_attention_heads=8"):
        run_recipe(tiny_cfg(assets, tmp_path / "run", **{"checkpointer.checkpoint_dir": str(ckpt)}))

