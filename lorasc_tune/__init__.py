"""lorasc-tune: LoRA Slow Cascade learning (LoRASC) for torchtune.

``lorasc_tune.Cascade`` is the driver every training loop uses (see :mod:`lorasc_tune.driver`).
It is imported on first use, so ``import lorasc_tune.<module>`` stays light.
"""


def __getattr__(name: str):
    if name == "Cascade":
        from lorasc_tune.driver import Cascade

        return Cascade
    raise AttributeError(f"module 'lorasc_tune' has no attribute {name!r}")
