"""The expert plan: per-expert warmup and the resume-position check."""

import pytest

from lorasc_tune.config import LoRASCConfig
from lorasc_tune.plan import ExpertPlan, expert_warmup_steps


@pytest.mark.parametrize("run_warmup,expert_steps,total,expected", [
    (30, 400, 2000, 6),    # proportional share
    (30, 10, 2000, 0),     # 0.15 steps: no warmup rather than a wasted lr-0 step
    (30, 1, 2000, 0),      # one-step experts train at the full rate
    (2, 4, 12, 1),
    (12, 4, 12, 3),        # all-warmup would never reach the peak: one step is left past it
    (0, 4, 12, 0),
])
def test_expert_warmup_is_the_runs_share_without_a_floor(run_warmup, expert_steps, total, expected):
    assert expert_warmup_steps(run_warmup, expert_steps, total) == expected


def test_resume_position_must_fit_the_plan():
    plan = ExpertPlan.build(LoRASCConfig(steps_per_expert=3), steps_per_epoch=4, epochs=2)
    assert plan.starts == (0, 3, 6)
    plan.check_resume_position(4, expert=2, expert_open=True)    # mid-expert 2
    plan.check_resume_position(3, expert=1, expert_open=False)   # saved at the boundary
    for step, expert, is_open in [(4, 1, True), (4, 2, False), (3, 2, False), (6, 2, True)]:
        with pytest.raises(ValueError, match=r"does not fit this run's plan"):
            plan.check_resume_position(step, expert=expert, expert_open=is_open)
    with pytest.raises(ValueError, match=r"had already finished"):
        plan.check_resume_position(8, expert=3, expert_open=False)


def test_num_experts_spreads_boundaries_evenly():
    plan = ExpertPlan.build(LoRASCConfig(num_experts=5), steps_per_epoch=4, epochs=3)
    assert plan.starts == (0, 2, 4, 7, 9)  # k * 12 // 5
    assert [plan.num_steps(k) for k in range(5)] == [2, 2, 3, 2, 3]
    # Table 4's extremes over 5 epochs of 250 steps: 2 and 1250 experts.
    assert ExpertPlan.build(LoRASCConfig(num_experts=2), 250, 5).starts == (0, 625)
    assert ExpertPlan.build(LoRASCConfig(num_experts=1250), 250, 5).starts == tuple(range(1250))
