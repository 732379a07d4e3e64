"""Finding a run's inputs: the saved config, the metric log folder, ``W_T`` and ``W_0``."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from lorasc_tune.diagnostics.errors import DiagnosticsError

CONFIG_FILE = "torchtune_config.yaml"


def load_run_config(output_dir: Path):
    """The config the recipe saved (``metric_logger.log_config``), or None when absent."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def cfg_get(cfg, dotted: str, default: Any = None) -> Any:
    """``cfg.<dotted>`` as plain Python, or ``default`` when the config or the key is absent."""
    if cfg is None:
        return default
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, dotted, default=default)
    except Exception:  # an interpolation that no longer resolves, e.g. a removed env var
        return default
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def find_log_dir(output_dir: Path, cfg) -> Path:
    """The configured ``metric_logger.log_dir``, else ``OUTPUT_DIR/logs``."""
    configured = cfg_get(cfg, "metric_logger.log_dir")
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
    ckpt_dir = cfg_get(cfg, "checkpointer.checkpoint_dir")
    if ckpt_dir:
        return Path(ckpt_dir)
    if cfg_get(cfg, "checkpointer._component_"):
        from omegaconf import OmegaConf
        from torchtune import config as tt_config

        with tempfile.TemporaryDirectory() as tmp:
            node = OmegaConf.create(cfg_get(cfg, "checkpointer"))
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
