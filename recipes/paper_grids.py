"""The paper's hyperparameter grids, each checked against the paper's text (section cited).

These are the sweep's defaults (``recipes/paper_table1.py``) and the values the configs and
READMEs quote; ``tests/test_paper_sweep.py`` reads the grids back out of the paper's text.
"""

# §4.2.1, in-domain tasks (Table 1): "the initial learning rate selected from {1e-5, 5e-5, 1e-4,
# 5e-4, 1e-3}. By default the batch size was set to 4 and the LoRA rank was set to 8"; AdamW,
# linear schedule, 5 epochs, following Malladi et al. (2023) (1000 train / 500 validation /
# 1000 test rows).
IN_DOMAIN_LRS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3)
IN_DOMAIN_BATCH_SIZE = 4
IN_DOMAIN_LORA_RANK = 8
IN_DOMAIN_EPOCHS = 5

# §4.2.1, instruction tuning on Alpaca (Table 2): batch 128, 3 epochs, linear schedule, "initial
# learning rate selected from {1e-4, 3e-4, 5e-4, 1e-3}".
ALPACA_LRS = (1e-4, 3e-4, 5e-4, 1e-3)
ALPACA_BATCH_SIZE = 128
ALPACA_EPOCHS = 3

# §4.2.2, CLIP ViT-bigG/14 on ImageNet-1K (Table 3): AdamW, cosine schedule, 10 epochs, batch
# 64, "the learning rate was chosen from {1e-4, 5e-4, 1e-3}".
VISION_LRS = (1e-4, 5e-4, 1e-3)
VISION_BATCH_SIZE = 64
VISION_EPOCHS = 10

# §4.1, for every experiment: "we explored the factor α of Slow-Fast Update in {0.5, 0.6, 0.8}
# ... we selected the noise intensity from {0.1, 1, 10}"; "averaged across 3 distinct random
# seeds".
SLOW_ALPHAS = (0.5, 0.6, 0.8)
NOISE_LAMBDAS = (0.1, 1.0, 10.0)
SEEDS = (0, 1, 2)

# The one (α, λ) the configs ship with and LoRASC is also reported at, so that its score can be
# read without the 9x larger search beside it. The paper names no default; these are the
# smallest α of its grid and the middle λ.
FIXED_SLOW_ALPHA = 0.5
FIXED_NOISE_LAMBDA = 1.0

# §4.3, Table 4 (cascade frequency): 2, 5, 25, 125 and 1250 experts over a 5-epoch run of 250
# steps per epoch (5 = one expert per epoch, 1250 = a new expert every step).
EXPERT_COUNTS = (2, 5, 25, 125, 1250)


def lr_text(value: float) -> str:
    """A learning rate as the paper writes it: 0.0003 -> ``3e-4``."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def grid_text(values, fmt=lambda v: f"{v:g}") -> str:
    """A grid as the paper writes it: ``{0.5, 0.6, 0.8}``."""
    return "{" + ", ".join(fmt(v) for v in values) + "}"
