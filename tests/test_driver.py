"""The cascade driver in plain loops, and the transformers Trainer callback against it."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared_paths import REPO_ROOT
from lorasc_tune.adapters import inject, merged_state_dict
from lorasc_tune.config import LoRASCConfig
from lorasc_tune.driver import Cascade
from lorasc_tune.errors import NonFiniteLossError
from lorasc_tune.plan import ExpertPlan, expert_lr_factor

OPTIMIZER = {"_component_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.01}
SCHEDULE = {"_component_": "lorasc_tune.plan.get_linear_schedule_with_warmup",
            "num_warmup_steps": 3}


class TinyClassifier(nn.Module):
    """Two adaptable projections and a frozen head; returns a loss as a Trainer wants it."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 16)
        self.value = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.head(self.value(torch.tanh(self.query(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def tiny_model(use_dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = TinyClassifier()
    inject(model, ("query", "value"), rank=2, alpha=4, use_dora=use_dora)
    return model


def tiny_data(n: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def batches(rows, batch_size):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        yield torch.stack([r["x"] for r in chunk]), torch.stack([r["labels"] for r in chunk])


def plain_loop(lorasc: dict, epochs: int = 3, batch_size: int = 4, clip: float | None = 1.0,
               use_dora: bool = False):
    model, rows = tiny_model(use_dora), tiny_data()
    cascade = Cascade(model, lorasc, seed=0, steps_per_epoch=len(rows) // batch_size,
                      epochs=epochs, optimizer=OPTIMIZER, lr_scheduler=SCHEDULE,
                      clip_grad_norm=clip)
    for _ in range(epochs):
        for x, y in batches(rows, batch_size):
            cascade.begin_step()
            loss = model(x, y)["loss"]
            loss.backward()
            cascade.step(loss)
    return model, cascade


def test_readme_example_runs_as_written():
    """The README's plain-PyTorch example, executed verbatim."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- driver-example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README has no driver example"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 15
    scope: dict = {}
    exec(compile(code, "README driver example", "exec"), scope)
    cascade = scope["cascade"]
    assert cascade.engine.expert == 3 and not cascade.engine.expert_open
    assert len(cascade.expert_losses) == 3 and all(math.isfinite(v) for v in cascade.expert_losses)


def test_driver_runs_algorithm_1_at_the_planned_steps():
    """Experts begin and end where the plan says; the merged W gains T*r rank."""
    model, cascade = plain_loop({"noise_lambda": 0.0})
    assert cascade.engine.expert == 3 and cascade.global_step == 12
    assert cascade.plan.starts == (0, 4, 8)
    layer = cascade.engine.layers[0]
    delta = layer.weight.detach() - tiny_model().query.weight.detach()
    # Three rank-2 merges of the slow expert: rank between r and T*r.
    rank = torch.linalg.matrix_rank(delta, rtol=1e-5).item()
    assert 2 < rank <= 6


def test_driver_compresses_the_schedule_into_each_expert():
    rows_per_step = []

    class Spy:
        def log_dict(self, metrics, step):
            if "lr" in metrics:
                rows_per_step.append((step, metrics["lr"], metrics["expert"]))

    model, rows = tiny_model(), tiny_data()
    cascade = Cascade(model, {}, seed=0, steps_per_epoch=4, epochs=3, optimizer=OPTIMIZER,
                      lr_scheduler=SCHEDULE, metric_logger=Spy())
    for _ in range(3):
        for x, y in batches(rows, 4):
            cascade.begin_step()
            loss = model(x, y)["loss"]
            loss.backward()
            cascade.step(loss)
    # Independently: warmup share round(3*4/12) = 1 step, then linear decay over the rest.
    expected = [0.0, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3] * 3
    assert [lr for _, lr, _ in rows_per_step] == pytest.approx(expected)
    assert [e for _, _, e in rows_per_step] == [1] * 4 + [2] * 4 + [3] * 4


@pytest.mark.parametrize("schedule", ["expert", "run"])
@pytest.mark.parametrize("lorasc", [{}, {"num_experts": 5}, {"steps_per_expert": 7}])
def test_expert_lr_factor_matches_each_experts_scheduler(schedule, lorasc):
    """The callback's global-step schedule equals the per-expert schedulers the recipes build."""
    model = tiny_model()
    cascade = Cascade(model, {**lorasc, "schedule": schedule}, seed=0, steps_per_epoch=6,
                      epochs=3, optimizer=OPTIMIZER, lr_scheduler=SCHEDULE)
    seen = []
    while not cascade.finished:
        cascade.begin_step()
        seen.append(cascade.optimizer.param_groups[0]["lr"] / OPTIMIZER["lr"])
        cascade.optimizer.zero_grad()
        cascade.lr_scheduler.step()  # no gradient: only the schedule advances
        cascade.after_step()
    plan = cascade.plan
    assert seen == pytest.approx([expert_lr_factor(plan, schedule, 3, s)
                                  for s in range(plan.total_steps)])


def test_nan_loss_stops_before_the_step_and_says_nothing_was_saved():
    model, rows = tiny_model(), tiny_data()
    cascade = Cascade(model, {}, seed=0, steps_per_epoch=4, epochs=1, optimizer=OPTIMIZER)
    cascade.begin_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError,
                       match=r"loss is nan at global step 1 \(epoch 0, expert 1\).*No training "
                             r"state had been saved yet"):
        cascade.step(float("nan"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_round_trip_continues_exactly():
    """Save mid-expert, rebuild, load, finish: the same weights as one uninterrupted run."""
    full, _ = plain_loop({"steps_per_expert": 3})
    model, rows = tiny_model(), tiny_data()
    kwargs = dict(seed=0, steps_per_epoch=4, epochs=3, optimizer=OPTIMIZER,
                  lr_scheduler=SCHEDULE, clip_grad_norm=1.0)
    first = Cascade(model, {"steps_per_expert": 3}, **kwargs)
    data = [b for _ in range(3) for b in batches(rows, 4)]
    for x, y in data[:5]:
        first.begin_step()
        loss = model(x, y)["loss"]
        loss.backward()
        first.step(loss)
    state = first.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model2 = tiny_model()
    model2.load_state_dict(weights)
    second = Cascade(model2, {"steps_per_expert": 3}, **kwargs)
    second.load_state_dict(state)
    for x, y in data[5:]:
        second.begin_step()
        loss = model2(x, y)["loss"]
        loss.backward()
        second.step(loss)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v, rtol=0, atol=0)


# ---- the transformers Trainer callback -----------------------------------------------------


def run_trainer(tmp_path, lorasc: dict, epochs: int = 3, **args):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import SequentialSampler

    from lorasc_tune.hf import LoRASCCallback

    class InOrderTrainer(transformers.Trainer):
        # The plain loop visits rows in order; so does this Trainer, to compare weights.
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    model = tiny_model()
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4,
                    num_train_epochs=epochs, learning_rate=OPTIMIZER["lr"],
                    weight_decay=OPTIMIZER["weight_decay"], lr_scheduler_type="linear",
                    warmup_steps=SCHEDULE["num_warmup_steps"], optim="adamw_torch",
                    max_grad_norm=1.0, report_to=[], save_strategy="no", logging_steps=1000,
                    use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    settings.update(args)
    callback = LoRASCCallback(seed=0, **lorasc)
    trainer = InOrderTrainer(model=model, args=transformers.TrainingArguments(**settings),
                             train_dataset=tiny_data(), callbacks=[callback])
    return trainer, model, callback


@pytest.mark.parametrize("lorasc", [
    {"slow_alpha": 0.5, "noise_lambda": 1.0},
    {"slow_alpha": 0.6, "noise_lambda": 1.0, "lr_ratio_B": 16.0, "steps_per_expert": 3},
    {"cascade": False},
])
def test_trainer_callback_matches_the_driver_in_a_plain_loop(tmp_path, lorasc):
    trainer, model, callback = run_trainer(tmp_path, lorasc)
    trainer.train()
    reference, cascade = plain_loop(lorasc)
    assert callback.cascade.engine.expert == cascade.engine.expert
    got = merged_state_dict(model, callback.cascade.engine.master_weights())
    want = merged_state_dict(reference, cascade.engine.master_weights())
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_trainer_callback_resumes_from_a_trainer_checkpoint(tmp_path):
    lorasc = {"slow_alpha": 0.5, "noise_lambda": 1.0, "steps_per_expert": 3}
    # Step 5 is inside expert 2 (steps 3-5): the resume must restore an open expert.
    trainer, model, _ = run_trainer(tmp_path / "a", lorasc, save_strategy="steps", save_steps=5)
    trainer.train()
    assert (tmp_path / "a" / "checkpoint-5" / "lorasc_cascade.pt").is_file()
    trainer, model, callback = run_trainer(tmp_path / "a", lorasc, save_strategy="steps",
                                           save_steps=5)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    reference, cascade = plain_loop(lorasc)
    got = merged_state_dict(model, callback.cascade.engine.master_weights())
    want = merged_state_dict(reference, cascade.engine.master_weights())
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_trainer_callback_refuses_bad_keys_and_schedules(tmp_path):
    from lorasc_tune.config import LoRASCConfigError

    pytest.importorskip("transformers")
    from lorasc_tune.hf import LoRASCCallback

    with pytest.raises(LoRASCConfigError, match="slow_alpha"):
        LoRASCCallback(slow_alpha=1.5)
    trainer, _, _ = run_trainer(tmp_path, {}, lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match="lr_scheduler_type='cosine' is not supported"):
        trainer.train()


def test_clip_grad_norm_inf_logs_the_norm_without_clipping():
    """torchtune's `clip_grad_norm: inf` (YAML gives the string): the norm is measured and
    nothing is clipped, so the weights equal an unclipped run."""
    unclipped, _ = plain_loop({}, clip=None)
    model, rows = tiny_model(), tiny_data()
    norms = []

    class Spy:
        def log_dict(self, metrics, step):
            if "grad_norm" in metrics:
                norms.append(metrics["grad_norm"])

    cascade = Cascade(model, {}, seed=0, steps_per_epoch=4, epochs=3, optimizer=OPTIMIZER,
                      lr_scheduler=SCHEDULE, clip_grad_norm="inf", metric_logger=Spy())
    expected = []
    for _ in range(3):
        for x, y in batches(rows, 4):
            cascade.begin_step()
            loss = model(x, y)["loss"]
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            expected.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())
            cascade.step(loss)
    assert norms == pytest.approx(expected, rel=1e-6)
    # Not vacuous: clipping at a norm these steps exceed changes the weights.
    assert max(norms) > 0.05
    clipped, _ = plain_loop({}, clip=0.05)
    assert any(not torch.equal(clipped.state_dict()[k], v)
               for k, v in unclipped.state_dict().items())
    for k, v in unclipped.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_cascade_with_one_expert_warns_how_to_get_more():
    import warnings

    with pytest.warns(UserWarning, match=r"single expert .* set lorasc\.num_experts: T"):
        Cascade(tiny_model(), {}, seed=0, steps_per_epoch=4, epochs=1, optimizer=OPTIMIZER)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Cascade(tiny_model(), {"num_experts": 4}, seed=0, steps_per_epoch=4, epochs=1,
                optimizer=OPTIMIZER)
        Cascade(tiny_model(), {"cascade": False}, seed=0, steps_per_epoch=4, epochs=1,
                optimizer=OPTIMIZER)
    assert not [w for w in record if "single expert" in str(w.message)]


@pytest.mark.parametrize("value,expected", [(None, None), (1, 1.0), (0.5, 0.5), ("inf", math.inf),
                                            (math.inf, math.inf)])
def test_clip_grad_norm_accepts_numbers_and_inf(value, expected):
    from lorasc_tune.config import clip_grad_norm_value

    assert clip_grad_norm_value(value) == expected


@pytest.mark.parametrize("value", [0, -1.0, "abc", True, float("nan")])
def test_clip_grad_norm_refuses_the_rest_naming_the_key(value):
    from lorasc_tune.config import LoRASCConfigError, clip_grad_norm_value

    with pytest.raises(LoRASCConfigError, match="clip_grad_norm must be null, a number > 0 or inf"):
        clip_grad_norm_value(value)


def tiny_peft_llama():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))


def token_rows(n: int = 16):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


@pytest.mark.parametrize("lorasc", [{"slow_alpha": 0.5, "noise_lambda": 1.0},
                                    {"slow_alpha": 0.5, "lr_ratio_B": 16.0, "num_experts": 5}])
def test_trainer_callback_drives_a_peft_lora_model(tmp_path, lorasc):
    """A Hugging Face PEFT LoRA model: the callback in a Trainer and the driver in a plain loop
    reach the same weights; the cascade really merged into PEFT's base layers."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import SequentialSampler

    from lorasc_tune.adapters import PeftAdaptedLayer, find_adapters
    from lorasc_tune.hf import LoRASCCallback

    class InOrderTrainer(transformers.Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    rows = token_rows()
    trained = tiny_peft_llama()
    base_before = trained.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3,
        learning_rate=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"],
        lr_scheduler_type="linear", warmup_steps=SCHEDULE["num_warmup_steps"], optim="adamw_torch",
        max_grad_norm=1.0, report_to=[], save_strategy="no", use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True)
    callback = LoRASCCallback(seed=0, **lorasc)
    InOrderTrainer(model=trained, args=args, train_dataset=rows, callbacks=[callback]).train()

    reference = tiny_peft_llama()
    layers = find_adapters(reference)
    assert len(layers) == 4 and all(isinstance(l, PeftAdaptedLayer) for l in layers)
    cascade = Cascade(reference, lorasc, seed=0, steps_per_epoch=4, epochs=3,
                      optimizer=OPTIMIZER, lr_scheduler=SCHEDULE, clip_grad_norm=1.0)
    for _ in range(3):
        for i in range(0, len(rows), 4):
            batch = {k: torch.stack([r[k] for r in rows[i:i + 4]]) for k in rows[0]}
            cascade.begin_step()
            loss = reference(**batch).loss
            loss.backward()
            cascade.step(loss)
    assert callback.cascade.engine.expert == cascade.engine.expert > 1
    got, want = trained.state_dict(), reference.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    merged_q = got["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (merged_q - base_before).abs().max() > 1e-4
