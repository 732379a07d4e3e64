"""Reading adapted matrices from a checkpoint folder, one at a time, under either spelling."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from lorasc_tune.diagnostics.errors import DiagnosticsError
from lorasc_tune.diagnostics.run_folder import cfg_get

# torchtune module names as in ``lora_attn_modules``; Hugging Face spellings map onto them.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
MLP_MODULES = ("w1", "w2", "w3")
MODULE_ALIASES = {"o_proj": "output_proj", "gate_proj": "w1", "down_proj": "w2",
                  "up_proj": "w3", "lm_head": "output"}

# torchtune parameter name -> Hugging Face name, for the adapted Llama matrices (the table
# torchtune's HF checkpointer uses; spelled out so that this command does not import torchtune).
TUNE_TO_HF = {
    "layers.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.output_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.mlp.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "output.weight": "lm_head.weight",
}


class WeightFolder:
    """Lazy access to the tensors of a checkpoint folder: read one matrix at a time, so a 7B
    model's shards are never loaded whole."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DiagnosticsError(f"checkpoint folder not found: {self.folder}")
        self._where: Dict[str, Path] = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f
        self._bins = [] if self._where else sorted(self.folder.glob("*.bin"))
        self._bin_state: Optional[Dict[str, torch.Tensor]] = None
        if not self._where and not self._bins:
            raise DiagnosticsError(f"no *.safetensors or *.bin weights in {self.folder}")

    def keys(self) -> Iterable[str]:
        return self._where.keys() if self._where else self._load_bins().keys()

    def _load_bins(self) -> Dict[str, torch.Tensor]:
        if self._bin_state is None:
            self._bin_state = {}
            for f in self._bins:
                self._bin_state.update(torch.load(f, map_location="cpu", mmap=True,
                                                  weights_only=True))
        return self._bin_state

    def get(self, key: str) -> torch.Tensor:
        if self._where:
            from safetensors import safe_open

            with safe_open(str(self._where[key]), framework="pt") as h:
                return h.get_tensor(key)
        return self._load_bins()[key]


def hf_key(tune_key: str) -> Optional[str]:
    """The Hugging Face name of a torchtune parameter name, or None outside the table."""
    layer = re.search(r"\.(\d+)\.", tune_key)
    abstract = re.sub(r"\.\d+\.", ".{}.", tune_key, count=1)
    hf = TUNE_TO_HF.get(abstract)
    return hf.format(layer.group(1)) if hf and layer else hf


def adapted_modules(cfg) -> List[str]:
    """The torchtune module names LoRA was applied to, as the model config says."""
    mods = list(cfg_get(cfg, "model.lora_attn_modules", []) or [])
    if cfg_get(cfg, "model.apply_lora_to_mlp", False):
        mods += list(MLP_MODULES)
    if cfg_get(cfg, "model.apply_lora_to_output", False):
        mods.append("output")
    return mods


def select_matrices(weights: WeightFolder, modules: Sequence[str],
                    layers: Optional[Sequence[int] | str], num_layers: Optional[int]
                    ) -> Dict[str, str]:
    """``{torchtune matrix name: key in the checkpoint}`` for the chosen modules and layers.

    A module containing a dot is taken as a full parameter name (for models outside the
    Llama family); otherwise ``q_proj``-style names expand to ``layers.{i}.attn.q_proj``.
    The default layers are all of them for small models, else the first, middle and last:
    one SVD of a 4096² matrix takes seconds on a CPU, and three layers show the trend.
    """
    keys = set(weights.keys())
    if num_layers is None:
        idx = {int(m.group(1)) for k in keys for m in [re.search(r"layers\.(\d+)\.", k)] if m}
        num_layers = max(idx) + 1 if idx else 0
    if layers == "all":
        layers = list(range(num_layers))
    elif layers is None:
        layers = (list(range(num_layers)) if num_layers <= 4
                  else sorted({0, num_layers // 2, num_layers - 1}))
    out: Dict[str, str] = {}
    for mod in modules:
        mod = MODULE_ALIASES.get(mod, mod)
        if "." in mod:
            names = [mod[: -len(".weight")] if mod.endswith(".weight") else mod]
        elif mod == "output":
            names = ["output"]
        elif mod in ATTN_MODULES:
            names = [f"layers.{i}.attn.{mod}" for i in layers]
        elif mod in MLP_MODULES:
            names = [f"layers.{i}.mlp.{mod}" for i in layers]
        else:
            raise DiagnosticsError(
                f"unknown matrix {mod!r}: use {', '.join(ATTN_MODULES + MLP_MODULES)}, output, "
                f"or a full parameter name")
        for name in names:
            tune_key = f"{name}.weight"
            for key in (tune_key, hf_key(tune_key), name):
                if key and key in keys:
                    out[name] = key
                    break
            else:
                sample = ", ".join(sorted(keys)[:4])
                raise DiagnosticsError(
                    f"matrix {name} not in {weights.folder} (looked for {tune_key}"
                    f"{' / ' + hf_key(tune_key) if hf_key(tune_key) else ''}; it has e.g. "
                    f"{sample})")
    return out
