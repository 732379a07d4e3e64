"""The four PNGs, drawn from the dict :func:`lorasc_tune.diagnostics.report.collect` returns.

matplotlib is imported only here and only when a plot is drawn, so the rest of the package
does not need it.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List

from lorasc_tune.diagnostics.errors import DiagnosticsError

# The quantity noise.png shows: the width of the uniform noise each expert put on W.
NOISE_WIDTH_LABEL = "noise width  λ·std(s·B_slow·A_slow)"


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
    ax.set_ylabel(NOISE_WIDTH_LABEL)
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
        fig.colorbar(im, ax=hm, label="noise width")
    return _png(fig)
