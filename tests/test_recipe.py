"""The single-device recipe end to end: export, resume, LoRA+, DoRA, bad inputs, NaN safety."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchtune.models.llama2 import llama2

from shared_paths import REPO_ROOT, require_shared
from lorasc_tune.checkpoint import training_state_path
from lorasc_tune.config import LoRASCConfigError
from lorasc_tune.errors import NonFiniteLossError
from recipe_utils import TINY_ARGS, load_merged, make_assets, read_metrics, run_recipe, tiny_cfg


def plain_model_from(state):
    model = llama2(**TINY_ARGS)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_export_loads_in_stock_checkpointer_and_matches_logits(assets, tmp_path, use_dora):
    out = tmp_path / "run"
    recipe = run_recipe(tiny_cfg(assets, out, **{"model.use_dora": use_dora}))
    assert recipe._cascade.engine.expert == 3 and not recipe._cascade.engine.expert_open
    for epoch in range(3):
        assert (out / f"epoch_{epoch}" / "config.json").is_file()
    assert not (out / ".staging" / "epoch_2").exists()

    merged = load_merged(out / "epoch_2", tmp_path / "reload")
    assert not any("lora" in k or "magnitude" in k for k in merged)
    tokens = torch.randint(0, TINY_ARGS["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    recipe._model.eval()
    with torch.no_grad():
        expected = recipe._model(tokens)
        if isinstance(expected, list):  # chunked output for CEWithChunkedOutputLoss
            expected = torch.cat(expected, dim=1)
        got = plain_model_from(merged)(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Saving never merges into live weights: a second save leaves the model as it was
    # and writes the same weights again (torchtune's CPU path would add the adapter twice).
    before = {k: v.clone() for k, v in recipe._model.state_dict().items()}
    recipe.save_checkpoint(epoch=2)
    for k, v in recipe._model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = load_merged(out / "epoch_2", tmp_path / "reload2")
    for k in merged:
        assert torch.equal(again[k], merged[k]), k


def test_tune_run_with_real_tokenizer_and_alpaca(tmp_path):
    tok = require_shared("llama2_tokenizer", "tokenizer.model")
    alpaca = require_shared("alpaca", "alpaca_tiny_100.json")
    transformers = pytest.importorskip("transformers")
    assets = make_assets(tmp_path / "assets", vocab_size=32000)
    out = tmp_path / "run"
    cfg = tiny_cfg(assets, out, **{
        "model.vocab_size": 32000, "tokenizer.path": str(tok), "tokenizer.max_seq_len": 96,
        "dataset.data_files": str(alpaca), "epochs": 2, "max_steps_per_epoch": 2,
        "batch_size": 2})
    from omegaconf import OmegaConf

    cfg_path = tmp_path / "tiny_alpaca.yaml"
    OmegaConf.save(cfg, cfg_path)
    tune = Path(sys.executable).parent / "tune"
    proc = subprocess.run(
        [str(tune), "run", "lorasc_tune/recipes/lorasc_lora.py", "--config", str(cfg_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"merged model written to {out / 'epoch_1'}" in proc.stdout
    steps = read_metrics(out)
    assert [s for s, m in steps if "loss" in m] == [1, 2, 3, 4]

    # The HF-format export loads in transformers with no adapter, and agrees with torchtune.
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out / "epoch_1"), torch_dtype=torch.float32)
    merged = load_merged(out / "epoch_1", tmp_path / "reload")
    tt = llama2(**dict(TINY_ARGS, vocab_size=32000))
    tt.load_state_dict(merged)
    tokens = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, tt.eval()(tokens), atol=1e-4, rtol=1e-4)


ACCUMULATE = {"batch_size": 2, "gradient_accumulation_steps": 2}


@pytest.mark.parametrize("crash_at_step,last_saved,extra", [
    (4, "after the expert boundary at step 3", {}),
    (6, "mid-expert, at step 5", {}),
    (5, "at the end of epoch 1 (step 4)", {}),
    # Each expert begins at the first micro-batch of its first step; the states saved at the
    # boundaries (steps 3 and 6) hold no open expert.
    (4, "after the boundary at step 3, 2 micro-batches per step", ACCUMULATE),
    (7, "after the boundary at step 6, 2 micro-batches per step", ACCUMULATE),
])
def test_resume_reproduces_uninterrupted_run(assets, tmp_path, crash_at_step, last_saved, extra):
    # 2 epochs x 4 steps, an expert every 3 steps (boundaries mid-epoch), dropout on so
    # that RNG state matters, state saved every step.
    overrides = {"epochs": 2, "lorasc.steps_per_expert": 3, "save_every_n_steps": 1,
                 "model.lora_dropout": 0.1, **extra}
    ref_out = tmp_path / "uninterrupted"
    run_recipe(tiny_cfg(assets, ref_out, **overrides))
    out = tmp_path / "interrupted"
    crashed = run_recipe(tiny_cfg(assets, out, **overrides), crash_at_step=crash_at_step)
    assert crashed._cascade.global_step == crash_at_step - 1
    resumed = run_recipe(tiny_cfg(assets, out, resume_from_checkpoint=True, **overrides))
    assert resumed._cascade.engine.expert == 3 and not resumed._cascade.engine.expert_open

    expected = load_merged(ref_out / "epoch_1", tmp_path / "r1")
    got = load_merged(out / "epoch_1", tmp_path / "r2")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0, msg=f"{k} ({last_saved})")
    ref_losses = {s: m["loss"] for s, m in read_metrics(ref_out) if "loss" in m}
    new_losses = {s: m["loss"] for s, m in read_metrics(out) if "loss" in m}
    assert new_losses == pytest.approx(ref_losses, abs=1e-6)


def test_lora_plus_ratio_holds_in_every_expert(assets, tmp_path):
    out = tmp_path / "run"
    recipe = run_recipe(tiny_cfg(assets, out, **{"lorasc.lr_ratio_B": 16.0}))
    rows = [m for _, m in read_metrics(out) if "loss" in m]
    assert len(rows) == 12 and {m["expert"] for m in rows} == {1.0, 2.0, 3.0}
    for m in rows:
        assert m["lr_B"] == pytest.approx(16.0 * m["lr"], rel=1e-9)
    assert any(m["lr"] > 0 for m in rows)
    names = [g["name"] for g in recipe._cascade.optimizer.param_groups]
    assert names == ["base", "lora_b"]
    assert all(p.shape[1] == 4 for p in recipe._cascade.optimizer.param_groups[1]["params"])  # [d_out, r]


def test_dora_magnitude_initialised_once_and_carried(assets, tmp_path, monkeypatch):
    import lorasc_tune.driver as recipe_module  # the driver initialises DoRA magnitudes
    from lorasc_tune.cascade import CascadeEngine
    from lorasc_tune.config import LoRASCConfig

    calls = []
    init = recipe_module.init_dora_magnitudes

    def counting_init(model):
        init(model)
        # DoRA's initialisation: the magnitude equals the row norms of W (B = 0 here).
        for layer in CascadeEngine(model, LoRASCConfig(), 0).layers:
            torch.testing.assert_close(layer.module.magnitude, torch.linalg.norm(layer.weight, dim=1))
        calls.append(1)

    monkeypatch.setattr(recipe_module, "init_dora_magnitudes", counting_init)
    carried = []
    begin = CascadeEngine.begin_expert

    def spy(engine):
        mags = [l.module.magnitude.detach().clone() for l in engine.layers]
        result = begin(engine)
        if engine.expert > 1:
            carried.append(all(torch.equal(a, l.module.magnitude) for a, l in zip(mags, engine.layers)))
        return result

    monkeypatch.setattr(CascadeEngine, "begin_expert", spy)
    recipe = run_recipe(tiny_cfg(assets, tmp_path / "run", **{"model.use_dora": True}))
    assert len(calls) == 1  # only before the first expert
    assert carried == [True, True]
    # The magnitude trained: it moved away from the row norms it started from.
    mag = recipe._cascade.engine.layers[0].module.magnitude
    assert not torch.allclose(mag, torch.linalg.norm(recipe._cascade.engine.layers[0].weight, dim=1))


BAD_INPUTS = [
    ({"lorasc.slow_alpha": 1.0}, LoRASCConfigError, r"lorasc\.slow_alpha must be a number in \[0, 1\)"),
    ({"lorasc.slow_alpha": -0.1}, LoRASCConfigError, r"lorasc\.slow_alpha"),
    ({"lorasc.noise_lambda": -1.0}, LoRASCConfigError, r"lorasc\.noise_lambda must be a number in \[0, inf\)"),
    ({"lorasc.steps_per_expert": 0}, LoRASCConfigError, r"lorasc\.steps_per_expert must be >= 1"),
    ({"lorasc.steps_per_expert": 2.5}, LoRASCConfigError, r"lorasc\.steps_per_expert"),
    ({"lorasc.cascade": False, "lorasc.steps_per_expert": 5}, LoRASCConfigError,
     r"lorasc\.steps_per_expert=5 sets a cascade frequency, but lorasc\.cascade is false"),
    ({"lorasc.lr_ratio_B": 0}, LoRASCConfigError, r"lorasc\.lr_ratio_B"),
    ({"lorasc.slow_alpah": 0.5}, LoRASCConfigError, r"unknown key\(s\) in lorasc: lorasc\.slow_alpah"),
    ({"gradient_accumulation_steps": 0}, LoRASCConfigError, r"gradient_accumulation_steps must be"),
    ({"log_every_n_steps": 0}, LoRASCConfigError, r"log_every_n_steps must be null or an integer"),
    ({"lorasc.num_experts": 4, "lorasc.steps_per_expert": 3}, LoRASCConfigError,
     r"lorasc\.num_experts=4 and lorasc\.steps_per_expert=3 both set the cascade frequency"),
    # 3 epochs x 4 steps: 13 experts cannot each have a step. Caught once the data is built.
    ({"lorasc.num_experts": 13}, ValueError, r"lorasc\.num_experts=13 is more than the run's 12"),
    ({"checkpointer.checkpoint_files": ["model-missing.safetensors"]}, FileNotFoundError,
     r"model-missing\.safetensors does not exist"),
    ({"tokenizer.path": "/nonexistent/tokenizer.model"}, FileNotFoundError, r"tokenizer\.path"),
    ({"resume_from_checkpoint": True}, FileNotFoundError, r"no LoRASC training state"),
    # Caught only once the checkpoint is read, after the output folder exists: it is removed.
    ({"model.intermediate_dim": 96}, RuntimeError, r"size mismatch for layers\.0\.mlp"),
]


@pytest.mark.parametrize("overrides,exc,match", BAD_INPUTS)
def test_bad_input_fails_early_and_writes_nothing(assets, tmp_path, overrides, exc, match):
    out = tmp_path / "run"
    with pytest.raises(exc, match=match):
        run_recipe(tiny_cfg(assets, out, **overrides))
    assert not out.exists()


def test_bad_dataset_row_is_named(assets, tmp_path):
    import json

    rows = json.loads(Path(assets["data"]).read_text())[:12]
    del rows[7]["output"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"dataset row 7 has no field 'output'"):
        run_recipe(tiny_cfg(assets, out, **{"dataset.data_files": str(bad)}))
    assert not out.exists()


def test_nan_loss_stops_before_the_step_and_keeps_the_last_state(assets, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(assets, out, save_every_n_steps=1)
    from lorasc_tune.recipes.lorasc_lora import LoRASCRecipeSingleDevice

    recipe = LoRASCRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    inner = recipe._loss_step

    def loss_step(batch):
        loss = inner(batch)
        return loss * float("nan") if recipe._cascade.global_step == 2 else loss

    recipe._loss_step = loss_step
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 3 \(epoch 0, expert 1\)"):
        recipe.train()
    state = torch.load(training_state_path(out), weights_only=False)
    assert state["global_step"] == 2
    assert not (out / "epoch_0").exists()
    for name, p in recipe._model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_schedule_restarts_per_expert_or_runs_once(assets, tmp_path):
    """+Cascade compresses the whole schedule into each expert; COLA's 'run' schedule does not."""
    def lrs(schedule):
        out = tmp_path / schedule
        run_recipe(tiny_cfg(assets, out, **{"lorasc.schedule": schedule, "lorasc.slow_alpha": 0.0,
                                            "lorasc.noise_lambda": 0.0}))
        return [m["lr"] for _, m in read_metrics(out) if "loss" in m]

    per_expert, run = lrs("expert"), lrs("run")
    # 3 experts x 4 steps; warmup 2 of 12 run steps -> 1 step per expert; linear decay.
    peak = 3e-3
    expect_expert = [0.0, peak, peak * 2 / 3, peak / 3] * 3
    expect_run = [0.0, peak / 2] + [peak * (12 - s) / 10 for s in range(2, 12)]
    assert per_expert == pytest.approx(expect_expert, abs=1e-12)
    assert run == pytest.approx(expect_run, abs=1e-12)


def test_save_final_model_only_still_saves_the_state(assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, save_final_model_only=True))
    assert not (out / "epoch_0").exists() and not (out / "epoch_1").exists()
    assert (out / "epoch_2" / "config.json").is_file()
    assert training_state_path(out).is_file()


def test_epoch_export_is_the_merged_model_without_the_next_experts_noise(assets, tmp_path):
    # Without warmup the first expert's schedule is the same in a 1-epoch and a 3-epoch run, so
    # the 3-epoch run's epoch_0 must equal the 1-epoch run's final model: the merged first
    # expert, with none of the noise the second expert starts with.
    overrides = {"lr_scheduler.num_warmup_steps": 0, "lorasc.noise_lambda": 2.0}
    three, one = tmp_path / "three", tmp_path / "one"
    run_recipe(tiny_cfg(assets, three, **overrides))
    run_recipe(tiny_cfg(assets, one, epochs=1, **overrides))
    expected = load_merged(one / "epoch_0", tmp_path / "r1")
    got = load_merged(three / "epoch_0", tmp_path / "r2")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-7, rtol=0, msg=k)
    # The noise is real: it moved the weights the second expert trained from.
    later = load_merged(three / "epoch_1", tmp_path / "r3")
    assert not torch.allclose(later["layers.0.attn.q_proj.weight"],
                              expected["layers.0.attn.q_proj.weight"])


def test_activation_checkpointing_exports_and_resumes_like_a_plain_run(assets, tmp_path):
    # torch's checkpoint wrapper renames modules (layers.0._checkpoint_wrapped_module.attn...)
    # but not state-dict keys; exports, masters and saved states must use the latter.
    overrides = {"epochs": 2, "save_every_n_steps": 1, "lorasc.merge_precision": "fp32_master"}
    ref = tmp_path / "plain"
    run_recipe(tiny_cfg(assets, ref, **overrides))
    out = tmp_path / "ac"
    ac = dict(overrides, enable_activation_checkpointing=True)
    run_recipe(tiny_cfg(assets, out, **ac), crash_at_step=7)
    resumed = run_recipe(tiny_cfg(assets, out, resume_from_checkpoint=True, **ac))
    assert any("_checkpoint_wrapped_module" in n for n, _ in resumed._model.named_modules())
    expected = load_merged(ref / "epoch_1", tmp_path / "r1")
    got = load_merged(out / "epoch_1", tmp_path / "r2")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0, msg=k)


def test_resume_with_a_changed_batch_size_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, save_every_n_steps=1), crash_at_step=3)
    with pytest.raises(ValueError, match=r"global_batch_size.*resume with the original batch_size"):
        run_recipe(tiny_cfg(assets, out, resume_from_checkpoint=True, batch_size=2))


def test_one_step_experts_train_at_the_full_rate(assets, tmp_path):
    # The run's 2 warmup steps of 12 compress to none in a 1-step expert; a one-step floor
    # would run every expert's only step at lr 0 and merge untrained experts.
    out = tmp_path / "run"
    run_recipe(tiny_cfg(assets, out, **{"lorasc.steps_per_expert": 1}))
    rows = [m for _, m in read_metrics(out) if "loss" in m]
    assert [m["expert"] for m in rows] == [float(e) for e in range(1, 13)]
    assert [m["lr"] for m in rows] == pytest.approx([3e-3] * 12, rel=1e-12)


def test_nan_gradient_with_a_finite_loss_stops_before_the_step(assets, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(assets, out, save_every_n_steps=1)
    from lorasc_tune.recipes.lorasc_lora import LoRASCRecipeSingleDevice

    recipe = LoRASCRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    lora_a = recipe._model.layers[0].attn.q_proj.lora_a.weight
    lora_a.register_hook(lambda g: g * float("nan") if recipe._cascade.global_step == 2 else g)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan at global step 3"):
        recipe.train()
    state = torch.load(training_state_path(out), weights_only=False)
    assert state["global_step"] == 2
    for name, p in recipe._model.named_parameters():
        assert torch.isfinite(p).all(), name


def test_num_experts_spreads_the_same_boundaries_as_steps_per_expert(assets, tmp_path):
    # 12 steps: 4 experts start at k*12//4 = 0, 3, 6, 9, as an expert every 3 steps does.
    a, b = tmp_path / "num", tmp_path / "every"
    run_recipe(tiny_cfg(assets, a, **{"lorasc.num_experts": 4}))
    run_recipe(tiny_cfg(assets, b, **{"lorasc.steps_per_expert": 3}))
    experts = [m["expert"] for _, m in read_metrics(a) if "loss" in m]
    assert experts == [1.0] * 3 + [2.0] * 3 + [3.0] * 3 + [4.0] * 3
    expected = load_merged(b / "epoch_2", tmp_path / "r1")
    got = load_merged(a / "epoch_2", tmp_path / "r2")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0, msg=k)


def test_optional_empty_field_passes_and_a_list_of_datasets_trains(assets, tmp_path):
    import json

    rows = json.loads(Path(assets["data"]).read_text())[:48]
    rows[3].pop("input", None)  # Alpaca's input is optional: the row is valid without it
    part = tmp_path / "part.json"
    part.write_text(json.dumps(rows))
    one = {"_component_": "torchtune.datasets.alpaca_dataset", "source": "json",
           "data_files": str(part), "split": "train"}
    out = tmp_path / "run"
    cfg = tiny_cfg(assets, out, epochs=1, max_steps_per_epoch=None)
    cfg.dataset = [one, dict(one)]  # a list: the recipe concatenates the datasets
    recipe = run_recipe(cfg)
    assert len(recipe._dataloader.dataset) == 96
    assert recipe._cascade.global_step == 96 // 4
    assert (out / "epoch_0" / "config.json").is_file()
