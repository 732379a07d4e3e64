"""Reading the recipes' metric logs: training steps, expert starts and the noise widths.

The recipes log two kinds of record. A training record (``loss``, ``lr``, ``expert`` & co.) per
logged optimizer step, and at every expert start a boundary record: the mean noise width and
one width per adapted layer. The width is ``λ·std(s·B_slow·A_slow)``: ``W`` gets
``U(-1/2, 1/2)`` times it. Recipes name it ``noise_width_mean`` and ``noise_width/<layer>``;
logs written before that rename say ``noise_std_mean`` and ``noise_std/<layer>`` for the same
number, so both spellings are read.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from lorasc_tune.diagnostics.errors import DiagnosticsError

# Per-step keys of the recipes' training records (``Step N | loss:... lr:... expert:...``).
STEP_KEYS = ("loss", "lr", "lr_B", "grad_norm", "tokens_per_second_per_gpu")
# Boundary-record names, current spelling first: when a record somehow has both, it wins.
NOISE_MEAN_KEYS = ("noise_width_mean", "noise_std_mean")
NOISE_LAYER_PREFIXES = ("noise_width/", "noise_std/")

Record = Dict[str, float]


def is_noise_key(key: str) -> bool:
    """Whether ``key`` is part of a boundary record's noise widths (either spelling)."""
    return key in NOISE_MEAN_KEYS or key.startswith(NOISE_LAYER_PREFIXES)


def noise_fields(record: Mapping[str, float]) -> Tuple[Optional[float], Dict[str, float]]:
    """The mean noise width and ``{layer: width}`` of a record, whichever spelling it uses."""
    mean = next((record[k] for k in NOISE_MEAN_KEYS if k in record), None)
    layers: Dict[str, float] = {}
    # Old spelling first, so that a new-spelling value for the same layer overwrites it.
    for prefix in reversed(NOISE_LAYER_PREFIXES):
        layers.update({k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)})
    return mean, layers


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


def parse_disk_log(path: Path) -> List[Tuple[int, Record]]:
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
    # DiskLogger names its files log_<unix time>.txt: that number orders a resumed run's files.
    m = re.search(r"(\d+)", path.stem)
    return (float(m.group(1)) if m else path.stat().st_mtime, path.name)


def tensorboard_records(log_dir: Path) -> Tuple[List[str], List[Tuple[int, Record]]]:
    """Rebuild the recipes' records from TensorBoard event files (one scalar per tag there).

    TensorBoard keeps no record boundaries, so the two kinds of record are told apart by
    their tags: a mean noise width at step N is an expert start, ``loss`` & co. a training
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
            if tag in NOISE_MEAN_KEYS:
                starts.append((wall, step))
            if tag != "expert":
                old = scalars.get((step, tag))
                if old is None or wall >= old[0]:
                    scalars[(step, tag)] = (wall, value)
    # A record carrying both spellings of the mean is one start, not two: drop a start that
    # repeats the step of the one just before it.
    start_steps = [s for s, _ in itertools.groupby(s for _, s in sorted(starts))]
    # A restart from scratch in the same folder begins again at step 0: keep the last run.
    if 0 in start_steps:
        start_steps = start_steps[len(start_steps) - 1 - start_steps[::-1].index(0):]
    records: List[Tuple[int, Record]] = []
    for e, s in enumerate(start_steps, start=1):
        rec = {"expert": float(e)}
        rec.update({tag: v for (step, tag), (_, v) in scalars.items()
                    if step == s and (is_noise_key(tag) or tag == "boundary_seconds")})
        records.append((s, rec))
    by_step: Dict[int, Record] = {}
    for (step, tag), (_, v) in scalars.items():
        if tag in STEP_KEYS:
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
    per_file = [(str(p), parse_disk_log(p)) for p in files]
    per_file = [(p, r) for p, r in per_file if r]
    if not per_file:
        sources, records = tensorboard_records(log_dir)
        if not records:
            raise DiagnosticsError(
                f"no metric log in {log_dir}: expected torchtune DiskLogger files "
                f"(log_<time>.txt with 'Step N | key:value' lines) or TensorBoard event files "
                f"(readable only with `tensorboard` installed)")
        per_file = [(", ".join(sources), records)]
    fresh = [i for i, (_, recs) in enumerate(per_file)
             if any(r.get("expert") == 1 and noise_fields(r)[0] is not None for _, r in recs)]
    if fresh:
        per_file = per_file[fresh[-1]:]

    train: Dict[int, Record] = {}
    metrics = Metrics(sources=[p for p, _ in per_file])
    for _, recs in per_file:
        for step, rec in recs:
            mean, layers = noise_fields(rec)
            if mean is not None or layers:
                e = int(rec.get("expert", len(metrics.starts) + 1))
                metrics.starts[e] = step
                if mean is not None:
                    metrics.noise_mean[e] = mean
                if layers:
                    metrics.noise[e] = layers
            elif "loss" in rec:
                train[step] = rec
    for step in sorted(train):
        rec = train[step]
        metrics.step.append(step)
        metrics.expert.append(int(rec.get("expert", 0)))
    for key in STEP_KEYS:
        if any(key in train[s] for s in train):
            metrics.series[key] = [train[s].get(key) for s in metrics.step]
    if not metrics.step:
        raise DiagnosticsError(f"the metric log in {log_dir} has no training step (no 'loss')")
    return metrics
