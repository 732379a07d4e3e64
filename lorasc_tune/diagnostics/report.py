"""Every number of a run's diagnostics as one JSON-ready dict, and writing it with the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lorasc_tune.diagnostics.errors import DiagnosticsError
from lorasc_tune.diagnostics.logs import read_metrics
from lorasc_tune.diagnostics.plots import plot_loss, plot_lr, plot_noise, plot_spectrum
from lorasc_tune.diagnostics.run_folder import (CONFIG_FILE, cfg_get, find_base_checkpoint,
                                                find_final_epoch, find_log_dir, load_run_config)
from lorasc_tune.diagnostics.spectrum import spectrum
from lorasc_tune.diagnostics.weights import WeightFolder, adapted_modules, select_matrices
from lorasc_tune.io import atomic_write_bytes, atomic_write_text


def _finite(v: Optional[float]) -> Optional[float]:
    # diagnostics.json is strict JSON: NaN/Inf become null.
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
    lora_rank = cfg_get(cfg, "model.lora_rank")
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
        w_t, w_0 = WeightFolder(final), WeightFolder(base_dir)
        modules = list(matrices) if matrices else adapted_modules(cfg)
        if not modules:
            raise DiagnosticsError(
                f"no adapted matrices named in {output_dir / CONFIG_FILE} "
                f"(model.lora_attn_modules); pass --matrices")
        chosen = select_matrices(w_t, modules, layers, cfg_get(cfg, "model.num_layers"))
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
