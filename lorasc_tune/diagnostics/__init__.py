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
* ``noise.png``: the noise width ``λ·std(s·B_slow·A_slow)`` each expert started with, per
  layer (``W`` gets ``U(-1/2, 1/2)`` times it; the logs call it ``noise_width``, or
  ``noise_std`` in logs written before the rename);
* ``diagnostics.json``: every number that went into the plots.

Nothing here adds a logging path. The numbers come from what the recipes already write: the
metric log (torchtune's ``DiskLogger`` text files, or TensorBoard event files when
``tensorboard`` is importable), the saved ``torchtune_config.yaml`` (LoRA rank, adapted
modules, base checkpoint), the base checkpoint (``W_0``) and the last ``epoch_N/`` folder
(``W_T``, the merged model in Hugging Face safetensors).

The modules follow those inputs: :mod:`.logs` (metric logs), :mod:`.run_folder` (config and
checkpoint folders), :mod:`.weights` (reading matrices), :mod:`.spectrum` (the SVD),
:mod:`.plots`, :mod:`.report` (the numbers, and writing them) and :mod:`.cli`.
"""

from lorasc_tune.diagnostics.cli import main
from lorasc_tune.diagnostics.errors import DiagnosticsError
from lorasc_tune.diagnostics.logs import Metrics, read_metrics
from lorasc_tune.diagnostics.plots import plot_loss, plot_lr, plot_noise, plot_spectrum
from lorasc_tune.diagnostics.report import collect, write_diagnostics
from lorasc_tune.diagnostics.run_folder import (CONFIG_FILE, find_base_checkpoint,
                                                find_final_epoch, find_log_dir, load_run_config)
from lorasc_tune.diagnostics.spectrum import spectrum
from lorasc_tune.diagnostics.weights import WeightFolder, adapted_modules, select_matrices

__all__ = [
    "CONFIG_FILE", "DiagnosticsError", "Metrics", "WeightFolder", "adapted_modules", "collect",
    "find_base_checkpoint", "find_final_epoch", "find_log_dir", "load_run_config", "main",
    "plot_loss", "plot_lr", "plot_noise", "plot_spectrum", "read_metrics", "select_matrices",
    "spectrum", "write_diagnostics",
]
