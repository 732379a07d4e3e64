"""A start-up estimate of peak accelerator memory for one training step of the tower.

An analytic count, not a measurement: it tells a user before the first step whether batch 64
of bigG fits their card. It counts

* weights: every parameter in the run dtype;
* training state: gradients and AdamW's two moments for the trainable parameters (adapters,
  DoRA magnitudes, head), in the run dtype as torch keeps them, plus the cascade engine's fp32
  slow factors (A and B per adapted matrix);
* activations saved for backward, per block and token (``D`` = width, ``M`` = MLP size):
  two fp32 LayerNorm inputs (4 bytes each: torchtune's ``Fp32LayerNorm`` upcasts), the two
  norm outputs, q/k/v and the attention output (SDPA's flash/memory-efficient kernels keep no
  ``T x T`` matrix), the MLP's pre- and post-GELU activations: ``(8 D + 2 M) x b + 2 D x 4`` bytes.
  With activation checkpointing only each block's input (``D x b``) is kept, plus one block's
  full set while it is recomputed and its gradient;
* a fixed 10 % for allocator fragmentation and workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorasc_tune.vision.model import VisionArch, is_adapter_param

GiB = 1024**3


@dataclass
class MemoryEstimate:
    weights: float
    training_state: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.training_state + self.activations + self.overhead

    def describe(self) -> str:
        unit, div = ("GiB", GiB) if self.total >= GiB else ("MiB", 1024**2)
        return (f"~{self.total / div:.1f} {unit} (weights {self.weights / div:.1f}, grads+AdamW+"
                f"slow expert {self.training_state / div:.2f}, activations "
                f"{self.activations / div:.1f}, +10% overhead {self.overhead / div:.1f})")


def estimate_peak_memory(model: nn.Module, arch: VisionArch, batch_size: int, dtype_bytes: int,
                         activation_checkpointing: bool) -> MemoryEstimate:
    """Estimated peak bytes of a training step at ``batch_size`` (works on a meta-device model)."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_adapter = sum(p.numel() for n, p in model.named_parameters()
                    if is_adapter_param(n) and not n.endswith("magnitude"))
    weights = n_all * dtype_bytes
    state = 3 * n_train * dtype_bytes + n_adapter * 4

    tokens = batch_size * ((arch.image_size // arch.patch_size) ** 2 + 1)
    D, M, b = arch.width, arch.mlp_dim, dtype_bytes
    per_block = tokens * ((8 * D + 2 * M) * b + 2 * D * 4)
    if activation_checkpointing:
        acts = arch.layers * tokens * D * b + 2 * per_block
    else:
        acts = arch.layers * per_block
    acts += tokens * D * b + batch_size * 3 * arch.image_size**2 * 4  # patch embed + fp32 input
    overhead = 0.1 * (weights + state + acts)
    return MemoryEstimate(weights, state, acts, overhead)
