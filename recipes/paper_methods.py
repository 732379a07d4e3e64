"""Table 1's columns (tasks) and rows (methods): what each method overrides in a task config.

A method either trains at the α and λ its overrides fix (LoRA, LoRA+, DoRA and COLA, where
both are 0), or is a LoRASC method, whose α (``lorasc.slow_alpha``) and λ
(``lorasc.noise_lambda``) each cell sets from the sweep's grid (§4.1 of the paper), so that
they are chosen on validation like the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

# This folder is on sys.path when the sweep runs (it has no __init__.py on purpose: torchtune
# installs a top-level package named `recipes`).
from make_ablation_configs import ROWS, VARIANTS as ADAPTERS  # noqa: E402
from paper_grids import EXPERT_COUNTS  # noqa: E402

# Table 1's columns, in the paper's (MeZO's) order, with their display names.
TASK_LABELS = {
    "sst2": "SST-2", "rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC",
    "multirc": "MultiRC", "copa": "COPA", "record": "ReCoRD", "squad": "SQuAD", "drop": "DROP",
    "gsm8k": "GSM8K",
}

# The keys a LoRASC method leaves to its cells: the searched α and λ.
SEARCHED_KEYS = ("lorasc.slow_alpha", "lorasc.noise_lambda")


@dataclass(frozen=True)
class Variant:
    """A row of Table 1: a display label and the overrides that turn the task config into it.

    ``searches_slow_noise``: a LoRASC method; its ``overrides`` omit ``SEARCHED_KEYS``, which
    every one of its cells sets.
    """

    name: str
    label: str
    overrides: tuple
    searches_slow_noise: bool = False


def override_value(value) -> str:
    """``value`` as a ``tune run`` command-line override spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _variant(name: str, label: str, row: str, adapter: str) -> Variant:
    """``row`` is an ablation row of make_ablation_configs.ROWS (lora = no cascade, cola, noise =
    full LoRASC); ``adapter`` picks LoRA / LoRA+ (lr_ratio_B 16) / DoRA. Every ``lorasc`` key is
    set, by the method or by its cells, so a row never depends on what the task config says."""
    ratio, dora = ADAPTERS[adapter]
    lorasc = dict(ROWS[row], num_experts=None, lr_ratio_B=ratio)
    # The full LoRASC row is the one with a slow expert and noise: those are searched.
    searched = lorasc["slow_alpha"] > 0 and lorasc["noise_lambda"] > 0
    overrides = [f"lorasc.{k}={override_value(v)}" for k, v in lorasc.items()
                 if not (searched and f"lorasc.{k}" in SEARCHED_KEYS)]
    overrides.append(f"model.use_dora={override_value(dora)}")
    return Variant(name, label, tuple(overrides), searches_slow_noise=searched)


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    _variant("lora", "LoRA", "lora", "lora"),
    _variant("cola", "COLA", "cola", "lora"),
    _variant("lorasc_lora", "LoRA + LoRASC", "noise", "lora"),
    _variant("loraplus", "LoRA+", "lora", "loraplus"),
    _variant("lorasc_loraplus", "LoRA+ + LoRASC", "noise", "loraplus"),
    _variant("dora", "DoRA", "lora", "dora"),
    _variant("lorasc_dora", "DoRA + LoRASC", "noise", "dora"),
)}
# The sweep's default: Table 1's rows.
DEFAULT_VARIANTS = tuple(VARIANTS)

# Table 4's cascade frequency: LoRA + LoRASC with T experts spread evenly over the whole run
# (5 epochs) instead of one per epoch, T as in the paper. Not in the default sweep: name them
# in --variants, e.g. lorasc_lora_T2,lorasc_lora_T25.
for _t in EXPERT_COUNTS:
    _base = VARIANTS["lorasc_lora"]
    VARIANTS[f"lorasc_lora_T{_t}"] = Variant(
        f"lorasc_lora_T{_t}", f"LoRA + LoRASC, T = {_t}",
        tuple(o for o in _base.overrides if not o.startswith("lorasc.num_experts="))
        + (f"lorasc.num_experts={_t}",),
        searches_slow_noise=True)
