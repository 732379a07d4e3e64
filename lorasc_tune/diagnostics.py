"""Plots and numbers that show what a LoRASC run did, read from the run's own outputs.

    python -m lorasc_tune.diagnostics OUTPUT_DIR [--out DIR] [--matrices q_proj,v_proj]
                                      [--layers 0,1] [--base CKPT_DIR] [--top-k 64]

Writes into ``OUTPUT_DIR/diagnostics/`` (or ``--out``):

* ``loss.png``: training loss per optimizer step, the expert boundaries marked;
* ``lr.png``: the learning rates (``lr`` and LoRA+'s ``lr_B``) per step, where the schedule
  restarts at each expert is visible;
* ``spectrum.png``: singular values of ``W_T - W_0`` for chosen adapted matrices, with
  markers at ``r`` and ``T·r``: one LoRA expert can add at most rank ``r``, the cascade of
  ``T`` experts up to ``T·r`` (plus the full-rank cascading noise when ``λ > 0``);
* ``noise.png``: the noise scale ``λ·std(s·B_slow·A_slow)`` each expert started with, per layer
  (the width of the uniform noise on ``W``; the logs call it ``noise_std``);
* ``diagnostics.json``: every number that went into the plots.

Nothing here adds a logging path. The numbers come from what the recipes already write: the
metric log (torchtune's ``DiskLogger`` text files, or TensorBoard event files when
``tensorboard`` is importable), the saved ``torchtune_config.yaml`` (LoRA rank, adapted
modules, base checkpoint), the base checkpoint (``W_0``) and the last ``epoch_N/`` folder
(``W_T``, the merged model in Hugging Face safetensors).

matplotlib is imported only when plotting, so the rest of the package does not need it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lorasc_tune.io import atomic_write_bytes, atomic_write_text

CONFIG_FILE = "torchtune_config.yaml"
# Per-step keys of the recipes' training records (``Step N | loss:... lr:... expert:...``).
_STEP_KEYS = ("loss", "lr", "lr_B", "grad_norm", "tokens_per_second_per_gpu")
_NOISE_PREFIX = "noise_std/"
# torchtune module names as in ``lora_attn_modules``; Hugging Face spellings map onto them.
_ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")
_MLP = ("w1", "w2", "w3")
_ALIASES = {"o_proj": "output_proj", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
            "lm_head": "output"}


class DiagnosticsError(RuntimeError):
    """A run directory lacks what a plot needs; the message names the missing file or folder."""


# ---- metric logs ----------------------------------------------------------------------------


@dataclass
class Metrics:
    """What the metric log says about the run, one entry per logged optimizer step."""

    sources: List[str]
    step: List[int] = field(default_factory=list)
    expert: List[int] = field(default_factory=list)
    series: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    # expert -> the global step after which it began (0 for expert 1)
    starts: Dict[int, int] = field(default_factory=dict)
    noise_mean: Dict[int, float] = field(default_factory=dict)
    noise: Dict[int, Dict[str, float]] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return max([*self.starts, *self.expert, 0])

    def boundaries(self) -> List[Dict[str, int]]:
        """Where each expert begins: ``after_step`` (global step) and its ``first_step``.

        The start records give this exactly even when ``log_every_n_steps > 1``; runs whose
        logger missed them (e.g. the start of an expert logged by an older file) fall back to
        the first step logged with the new expert number.
        """
        starts = dict(self.starts)
        prev = None
        for s, e in zip(self.step, self.expert):
            if e != prev and e not in starts:
                starts[e] = s - 1
            prev = e
        return [{"expert": e, "after_step": starts[e], "first_step": starts[e] + 1}
                for e in sorted(starts)]


def _parse_value(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_disk_log(path: Path) -> List[Tuple[int, Dict[str, float]]]:
    """``Step N | key:value key:value`` lines (torchtune's ``DiskLogger``) as (step, record)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"\s*Step (\d+) \|(.*)$", line)
        if not m:
            continue
        rec = {}
        for token in m.group(2).split():
            key, sep, value = token.rpartition(":")
            v = _parse_value(value) if sep else None
            if key and v is not None:
                rec[key] = v
        if rec:
            records.append((int(m.group(1)), rec))
    return records


def _log_file_order(path: Path) -> Tuple[float, str]:
    m = re.search(r"(\d+)", path.stem)
    return (float(m.group(1)) if m else path.stat().st_mtime, path.name)


def _tensorboard_records(log_dir: Path) -> Tuple[List[str], List[Tuple[int, Dict[str, float]]]]:
    """Rebuild the recipes' records from TensorBoard event files (one scalar per tag there).

    TensorBoard keeps no record boundaries, so the two kinds of record are told apart by
    their tags: a ``noise_std_mean`` at step N is an expert start, ``loss`` & co. a training
    step. The expert of a training step is then implied by the starts.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return [], []
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    if not files:
        return [], []
    # (step, tag) -> (wall_time, value); the latest write wins, as after a resume.
    scalars: Dict[Tuple[int, str], Tuple[float, float]] = {}
    starts: List[Tuple[float, int]] = []
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        events = [(tag, e.wall_time, e.step, float(e.value))
                  for tag in tags.get("scalars", []) for e in acc.Scalars(tag)]
        for tag in tags.get("tensors", []):  # add_scalar(new_style=True) stores tensors
            for e in acc.Tensors(tag):
                events.append((tag, e.wall_time, e.step, _tensor_proto_value(e.tensor_proto)))
        for tag, wall, step, value in events:
            if tag == "noise_std_mean":
                starts.append((wall, step))
            if tag != "expert":
                old = scalars.get((step, tag))
                if old is None or wall >= old[0]:
                    scalars[(step, tag)] = (wall, value)
    start_steps = [s for _, s in sorted(starts)]
    # A restart from scratch in the same folder begins again at step 0: keep the last run.
    if 0 in start_steps:
        start_steps = start_steps[len(start_steps) - 1 - start_steps[::-1].index(0):]
    records: List[Tuple[int, Dict[str, float]]] = []
    for e, s in enumerate(start_steps, start=1):
        rec = {"expert": float(e)}
        rec.update({tag: v for (step, tag), (_, v) in scalars.items()
                    if step == s and (tag == "noise_std_mean" or tag.startswith(_NOISE_PREFIX)
                                      or tag == "boundary_seconds")})
        records.append((s, rec))
    by_step: Dict[int, Dict[str, float]] = {}
    for (step, tag), (_, v) in scalars.items():
        if tag in _STEP_KEYS:
            by_step.setdefault(step, {})[tag] = v
    for step in sorted(by_step):
        if "loss" not in by_step[step]:
            continue
        expert = sum(1 for s in start_steps if s < step) or 1
        records.append((step, {**by_step[step], "expert": float(expert)}))
    return [str(f) for f in files], records


def _tensor_proto_value(proto) -> float:
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(proto).item())


def read_metrics(log_dir: Path) -> Metrics:
    """Training records and expert starts from the metric log under ``log_dir``.

    Several ``log_*.txt`` files arise when a run is resumed: each later file supersedes the
    steps it logs again. A file that logs the start of expert 1 began the run anew, so it
    supersedes all earlier files.
    """
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise DiagnosticsError(f"metric log folder not found: {log_dir}")
    files = sorted((p for p in log_dir.glob("*.txt") if p.is_file()), key=_log_file_order)
    per_file = [(str(p), _parse_disk_log(p)) for p in files]
    per_file = [(p, r) for p, r in per_file if r]
    if not per_file:
        sources, records = _tensorboard_records(log_dir)
        if not records:
            raise DiagnosticsError(
                f"no metric log in {log_dir}: expected torchtune DiskLogger files "
                f"(log_<time>.txt with 'Step N | key:value' lines) or TensorBoard event files "
                f"(readable only with `tensorboard` installed)")
        per_file = [(", ".join(sources), records)]
    fresh = [i for i, (_, recs) in enumerate(per_file)
             if any(r.get("expert") == 1 and "noise_std_mean" in r for _, r in recs)]
    if fresh:
        per_file = per_file[fresh[-1]:]

    train: Dict[int, Dict[str, float]] = {}
    metrics = Metrics(sources=[p for p, _ in per_file])
    for _, recs in per_file:
        for step, rec in recs:
            if "noise_std_mean" in rec or any(k.startswith(_NOISE_PREFIX) for k in rec):
                e = int(rec.get("expert", len(metrics.starts) + 1))
                metrics.starts[e] = step
                if "noise_std_mean" in rec:
                    metrics.noise_mean[e] = rec["noise_std_mean"]
                layers = {k[len(_NOISE_PREFIX):]: v for k, v in rec.items()
                          if k.startswith(_NOISE_PREFIX)}
                if layers:
                    metrics.noise[e] = layers
            elif "loss" in rec:
                train[step] = rec
    for step in sorted(train):
        rec = train[step]
        metrics.step.append(step)
        metrics.expert.append(int(rec.get("expert", 0)))
    for key in _STEP_KEYS:
        if any(key in train[s] for s in train):
            metrics.series[key] = [train[s].get(key) for s in metrics.step]
    if not metrics.step:
        raise DiagnosticsError(f"the metric log in {log_dir} has no training step (no 'loss')")
    return metrics


# ---- run folder: config, checkpoints ---------------------------------------------------------


def load_run_config(output_dir: Path):
    """The config the recipe saved (``metric_logger.log_config``), or None when absent."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def _cfg_get(cfg, dotted: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, dotted, default=default)
    except Exception:  # an interpolation that no longer resolves, e.g. a removed env var
        return default
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def find_log_dir(output_dir: Path, cfg) -> Path:
    configured = _cfg_get(cfg, "metric_logger.log_dir")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path(output_dir) / "logs")
    for c in candidates:
        if c.is_dir():
            return c
    raise DiagnosticsError("metric log folder not found: looked in "
                           + ", ".join(str(c) for c in candidates))


def find_final_epoch(output_dir: Path) -> Path:
    """``W_T``: the highest complete ``epoch_N/`` folder (staging leftovers are ignored)."""
    found = []
    for p in Path(output_dir).iterdir() if Path(output_dir).is_dir() else []:
        m = re.fullmatch(r"epoch_(\d+)", p.name)
        if m and p.is_dir() and any(p.glob("*.safetensors")):
            found.append((int(m.group(1)), p))
    if not found:
        raise DiagnosticsError(
            f"no merged model in {output_dir}: expected an epoch_N/ folder with *.safetensors "
            f"(pass --no-spectrum to plot the logs only)")
    return max(found)[1]


def find_base_checkpoint(output_dir: Path, cfg) -> Path:
    """``W_0``: ``checkpointer.checkpoint_dir`` from the saved config.

    Checkpointer factories that compute their folder (the demo's) are instantiated with a
    throw-away output folder and asked for it; stock checkpointers only read metadata there.
    """
    ckpt_dir = _cfg_get(cfg, "checkpointer.checkpoint_dir")
    if ckpt_dir:
        return Path(ckpt_dir)
    if _cfg_get(cfg, "checkpointer._component_"):
        from omegaconf import OmegaConf
        from torchtune import config as tt_config

        with tempfile.TemporaryDirectory() as tmp:
            node = OmegaConf.create(_cfg_get(cfg, "checkpointer"))
            node.output_dir = tmp
            try:
                ckpt = tt_config.instantiate(node)
            except Exception as e:
                raise DiagnosticsError(
                    f"could not find the base checkpoint from {Path(output_dir) / CONFIG_FILE} "
                    f"({type(e).__name__}: {e}); pass --base CKPT_DIR") from e
            found = getattr(ckpt, "_checkpoint_dir", None)
        if found:
            return Path(found)
    raise DiagnosticsError(
        f"no base checkpoint: {Path(output_dir) / CONFIG_FILE} is missing or names no "
        f"checkpointer.checkpoint_dir; pass --base CKPT_DIR")


class _WeightFolder:
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


# ---- spectra ---------------------------------------------------------------------------------


# torchtune parameter name -> Hugging Face name, for the adapted Llama matrices (the table
# torchtune's HF checkpointer uses; spelled out so that this command does not import torchtune).
_TUNE_TO_HF = {
    "layers.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.output_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.mlp.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "output.weight": "lm_head.weight",
}


def _hf_key(tune_key: str) -> Optional[str]:
    layer = re.search(r"\.(\d+)\.", tune_key)
    abstract = re.sub(r"\.\d+\.", ".{}.", tune_key, count=1)
    hf = _TUNE_TO_HF.get(abstract)
    return hf.format(layer.group(1)) if hf and layer else hf


def adapted_modules(cfg) -> List[str]:
    """The torchtune module names LoRA was applied to, as the model config says."""
    mods = list(_cfg_get(cfg, "model.lora_attn_modules", []) or [])
    if _cfg_get(cfg, "model.apply_lora_to_mlp", False):
        mods += list(_MLP)
    if _cfg_get(cfg, "model.apply_lora_to_output", False):
        mods.append("output")
    return mods


def select_matrices(weights: _WeightFolder, modules: Sequence[str],
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
        mod = _ALIASES.get(mod, mod)
        if "." in mod:
            names = [mod[: -len(".weight")] if mod.endswith(".weight") else mod]
        elif mod == "output":
            names = ["output"]
        elif mod in _ATTN:
            names = [f"layers.{i}.attn.{mod}" for i in layers]
        elif mod in _MLP:
            names = [f"layers.{i}.mlp.{mod}" for i in layers]
        else:
            raise DiagnosticsError(
                f"unknown matrix {mod!r}: use {', '.join(_ATTN + _MLP)}, output, or a full "
                f"parameter name")
        for name in names:
            tune_key = f"{name}.weight"
            for key in (tune_key, _hf_key(tune_key), name):
                if key and key in keys:
                    out[name] = key
                    break
            else:
                sample = ", ".join(sorted(keys)[:4])
                raise DiagnosticsError(
                    f"matrix {name} not in {weights.folder} (looked for {tune_key}"
                    f"{' / ' + _hf_key(tune_key) if _hf_key(tune_key) else ''}; it has e.g. "
                    f"{sample})")
    return out


def spectrum(w_final: torch.Tensor, w_base: torch.Tensor, rtol: float, energy: float
             ) -> Dict[str, Any]:
    """Singular values of ``W_T - W_0`` (in float64: the difference of two fp32/bf16 tensors
    is exact there) and two ranks: numerical (``σ_i > rtol·σ_1``) and energy (fewest ``σ``
    holding ``energy`` of ``‖ΔW‖_F²``), the latter robust to the full-rank noise floor."""
    if w_final.shape != w_base.shape:
        raise DiagnosticsError(f"shape mismatch: W_T {tuple(w_final.shape)} vs W_0 "
                               f"{tuple(w_base.shape)}")
    delta = w_final.to(torch.float64) - w_base.to(torch.float64)
    sv = torch.linalg.svdvals(delta)
    top = float(sv[0]) if sv.numel() else 0.0
    sq = sv.square()
    total = float(sq.sum())
    numerical = int((sv > rtol * top).sum()) if top > 0 else 0
    energy_rank = (int((torch.cumsum(sq, 0) < energy * total).sum()) + 1) if total > 0 else 0
    return {"shape": list(delta.shape), "singular_values": sv.tolist(),
            "numerical_rank": numerical, "energy_rank": min(energy_rank, sv.numel()),
            "frobenius_norm": math.sqrt(total)}


# ---- plots -----------------------------------------------------------------------------------


def _figure(**kwargs):
    # Figure + its own Agg canvas: no pyplot, so no global backend switch for the caller.
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise DiagnosticsError("the plots need matplotlib: pip install matplotlib") from e

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _mark_experts(ax, boundaries: List[Dict[str, int]], last_step: int) -> None:
    """Vertical lines between experts and each expert's number above its stretch."""
    trans = ax.get_xaxis_transform()
    for i, b in enumerate(boundaries):
        x0 = b["after_step"] + 0.5
        x1 = (boundaries[i + 1]["after_step"] + 0.5) if i + 1 < len(boundaries) else last_step + 0.5
        if i > 0:
            ax.axvline(x0, color="0.4", ls="--", lw=0.8)
        if i % 2:
            ax.axvspan(x0, x1, color="0.93", zorder=0)
        ax.text((x0 + x1) / 2, 1.01, f"expert {b['expert']}", transform=trans, ha="center",
                va="bottom", fontsize=8)


def plot_loss(data: Dict[str, Any]) -> bytes:
    fig = _figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    train = data["train"]
    pts = [(s, v) for s, v in zip(train["step"], train["loss"]) if v is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color="C0")
    _mark_experts(ax, data["boundaries"], train["step"][-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss across experts", pad=16)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_lr(data: Dict[str, Any]) -> bytes:
    fig = _figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    train = data["train"]
    for key, style in (("lr", "-"), ("lr_B", "--")):
        values = train.get(key)
        if values and any(v is not None for v in values):
            pts = [(s, v) for s, v in zip(train["step"], values) if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, lw=1.2,
                    label=key if key == "lr" else "lr_B (LoRA+ B)")
    _mark_experts(ax, data["boundaries"], train["step"][-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per expert", pad=16)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_spectrum(data: Dict[str, Any]) -> bytes:
    spec = data["spectrum"]
    fig = _figure(figsize=(7, 4))
    ax = fig.add_subplot()
    mats = spec["matrices"]
    for name, m in mats.items():
        sv = [v for v in m["singular_values"] if v > 0]
        ax.semilogy(range(1, len(sv) + 1), sv, lw=1.0,
                    label=f"{name} (rank {m['numerical_rank']}, {m['energy_rank']} for "
                          f"{spec['energy']:.0%} energy)")
    r, T = data.get("lora_rank"), data.get("num_experts")
    trans = ax.get_xaxis_transform()
    for x, label in ((r, "r"), (r * T if r and T else None, "T·r")):
        if x:
            ax.axvline(x + 0.5, color="k", ls=":", lw=1)
            ax.text(x + 0.5, 0.02, f" {label}={x}", transform=trans, va="bottom", fontsize=8)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i of W_T − W_0")
    ax.set_title(f"Spectrum of the learned update ({spec['final']} vs base); "
                 f"rank at σ > {spec['rtol']:g}·σ₁", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2 if len(mats) > 6 else 1, loc="best")
    return _png(fig)


def plot_noise(data: Dict[str, Any]) -> bytes:
    noise = data["noise"]
    experts = noise["experts"]
    per_layer = noise["per_layer"]
    fig = _figure(figsize=(11 if per_layer else 6, 4))
    ax = fig.add_subplot(1, 2 if per_layer else 1, 1)
    for name, values in per_layer.items():
        ax.plot(experts, values, lw=0.8, alpha=0.6, marker=".")
    if noise["mean"]:
        ax.plot(experts, noise["mean"], lw=2, color="k", marker="o", label="mean over layers")
        ax.legend(fontsize=8)
    ax.set_xticks(experts)
    ax.set_xlabel("expert")
    ax.set_ylabel("noise scale  λ·std(s·B_slow·A_slow)")
    ax.set_title("Noise added before each expert", fontsize=10)
    ax.grid(alpha=0.3)
    if per_layer:
        hm = fig.add_subplot(1, 2, 2)
        grid = [[v if v is not None else float("nan") for v in vals] for vals in per_layer.values()]
        im = hm.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(experts[0] - 0.5, experts[-1] + 0.5, len(grid) - 0.5, -0.5))
        names = list(per_layer)
        step = max(1, len(names) // 24)
        hm.set_yticks(range(0, len(names), step))
        hm.set_yticklabels(names[::step], fontsize=6)
        hm.set_xticks(experts)
        hm.set_xlabel("expert")
        hm.set_title("per layer", fontsize=10)
        fig.colorbar(im, ax=hm, label="noise scale")
    return _png(fig)


# ---- the command -----------------------------------------------------------------------------


def _finite(v: Optional[float]) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def collect(output_dir: str | Path, *, matrices: Optional[Sequence[str]] = None,
            layers: Optional[Sequence[int] | str] = None, base: Optional[str | Path] = None,
            top_k: int = 64, rtol: float = 1e-4, energy: float = 0.99,
            log_dir: Optional[str | Path] = None, with_spectrum: bool = True) -> Dict[str, Any]:
    """Every number the plots show, as one JSON-ready dict."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise DiagnosticsError(f"run output folder not found: {output_dir}")
    cfg = load_run_config(output_dir)
    log_dir = Path(log_dir) if log_dir else find_log_dir(output_dir, cfg)
    metrics = read_metrics(log_dir)
    T = metrics.num_experts
    lora_rank = _cfg_get(cfg, "model.lora_rank")
    noise_experts = sorted(set(metrics.noise_mean) | set(metrics.noise))
    layer_names: List[str] = []
    for e in noise_experts:
        layer_names += [n for n in metrics.noise.get(e, {}) if n not in layer_names]
    data: Dict[str, Any] = {
        "output_dir": str(output_dir),
        "config": str(output_dir / CONFIG_FILE) if cfg is not None else None,
        "log_files": metrics.sources,
        "num_experts": T,
        "lora_rank": int(lora_rank) if lora_rank is not None else None,
        "train": {"step": metrics.step, "expert": metrics.expert,
                  **{k: [_finite(v) for v in vs] for k, vs in metrics.series.items()}},
        "boundaries": metrics.boundaries(),
        "noise": {"experts": noise_experts,
                  "mean": [_finite(metrics.noise_mean.get(e)) for e in noise_experts]
                  if metrics.noise_mean else [],
                  "per_layer": {n: [_finite(metrics.noise.get(e, {}).get(n)) for e in noise_experts]
                                for n in layer_names}},
        "spectrum": None,
    }
    if with_spectrum:
        final = find_final_epoch(output_dir)
        base_dir = Path(base) if base else find_base_checkpoint(output_dir, cfg)
        w_t, w_0 = _WeightFolder(final), _WeightFolder(base_dir)
        modules = list(matrices) if matrices else adapted_modules(cfg)
        if not modules:
            raise DiagnosticsError(
                f"no adapted matrices named in {output_dir / CONFIG_FILE} "
                f"(model.lora_attn_modules); pass --matrices")
        chosen = select_matrices(w_t, modules, layers, _cfg_get(cfg, "model.num_layers"))
        # Same names looked up in the base, whose key spelling may differ (HF vs torchtune).
        base_keys = select_matrices(w_0, list(chosen), None, None)
        mats = {}
        for name, key in chosen.items():
            s = spectrum(w_t.get(key), w_0.get(base_keys[name]), rtol, energy)
            s["key"] = key
            s["singular_values"] = s["singular_values"][:top_k]
            mats[name] = s
        data["spectrum"] = {"final": final.name, "final_dir": str(final), "base_dir": str(base_dir),
                            "rtol": rtol, "energy": energy, "top_k": top_k, "matrices": mats}
    return data


def write_diagnostics(data: Dict[str, Any], out_dir: str | Path) -> Dict[str, Path]:
    """Write the PNGs and ``diagnostics.json`` (each atomically); returns their paths."""
    out_dir = Path(out_dir)
    written = {}
    plots = [("loss.png", plot_loss), ("lr.png", plot_lr), ("noise.png", plot_noise)]
    if data.get("spectrum"):
        plots.append(("spectrum.png", plot_spectrum))
    for name, plot in plots:
        if name == "noise.png" and not data["noise"]["experts"]:
            continue
        atomic_write_bytes(out_dir / name, plot(data))
        written[name] = out_dir / name
    atomic_write_text(out_dir / "diagnostics.json",
                      json.dumps(data, indent=1, allow_nan=False) + "\n")
    written["diagnostics.json"] = out_dir / "diagnostics.json"
    return written


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lorasc_tune.diagnostics",
        description="Plot a LoRASC run: loss and LR across experts, the spectrum of W_T - W_0, "
                    "the noise per expert; the same numbers as diagnostics.json.")
    p.add_argument("output_dir", help="the run's output_dir (holds logs/, epoch_N/, "
                                      f"{CONFIG_FILE})")
    p.add_argument("--out", help="where to write (default: OUTPUT_DIR/diagnostics)")
    p.add_argument("--matrices", help="comma-separated modules for the spectrum, e.g. "
                                      "q_proj,v_proj (default: the adapted ones)")
    p.add_argument("--layers", help="comma-separated layer indices, or 'all' (default: all for "
                                    "<= 4 layers, else first, middle, last)")
    p.add_argument("--base", help="base checkpoint folder for W_0 (default: the config's "
                                  "checkpointer)")
    p.add_argument("--top-k", type=int, default=64, help="singular values kept per matrix")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="numerical rank counts σ_i > rtol·σ_1 (default 1e-4)")
    p.add_argument("--log-dir", help="metric log folder (default: the config's "
                                     "metric_logger.log_dir, else OUTPUT_DIR/logs)")
    p.add_argument("--no-spectrum", action="store_true",
                   help="plot the logs only (no checkpoints needed)")
    args = p.parse_args(argv)
    layers: Optional[List[int] | str] = args.layers
    if args.layers and args.layers != "all":
        try:
            layers = [int(x) for x in _csv(args.layers) or []]
        except ValueError:
            p.error(f"--layers: expected integers or 'all', got {args.layers!r}")
    try:
        data = collect(args.output_dir, matrices=_csv(args.matrices), layers=layers,
                       base=args.base, top_k=args.top_k, rtol=args.rtol, log_dir=args.log_dir,
                       with_spectrum=not args.no_spectrum)
        written = write_diagnostics(data, args.out or Path(args.output_dir) / "diagnostics")
    except DiagnosticsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
