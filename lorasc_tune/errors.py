"""Errors every LoRASC training loop can raise, and the exit code that reports a divergence.

A recipe that stops because training diverged (a NaN/Inf loss or gradient norm, or a fast
expert with NaN/Inf values) exits with :data:`DIVERGED_EXIT_CODE`, so a sweep can tell "this
learning rate diverged" from "this run crashed" without reading logs.
"""

from __future__ import annotations

# Distinct from 1 (any uncaught exception) and 2 (argparse / usage errors).
DIVERGED_EXIT_CODE = 3


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient norm became NaN/Inf; nothing from that step was applied."""


__all__ = ["DIVERGED_EXIT_CODE", "NonFiniteLossError"]
