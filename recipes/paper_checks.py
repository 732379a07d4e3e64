"""Validation of a whole sweep before any cell trains: every failure names its culprit."""

from __future__ import annotations

from omegaconf import DictConfig

from lorasc_tune.config import LoRASCConfig
from lorasc_tune.data import MissingDataError
from lorasc_tune.data.mezo import load_split, resolve_file
from lorasc_tune.plan import steps_per_epoch

from paper_cells import CELL_KEYS, Sweep, SweepError, format_value, load_train_config  # noqa: E402
from paper_methods import TASK_LABELS, VARIANTS  # noqa: E402


def check_sweep(sweep: Sweep) -> None:
    """Validate every input before any training: bad names, a grid value out of range, a
    missing config or data file, an override that clashes with a cell or method key, or an
    invalid ``lorasc`` block fail here, naming the culprit."""
    unknown = [t for t in sweep.tasks if t not in TASK_LABELS]
    if unknown:
        raise SweepError(f"unknown task(s) {unknown}; known: {', '.join(TASK_LABELS)}")
    unknown = [v for v in sweep.variants if v not in VARIANTS]
    if unknown:
        raise SweepError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if not (sweep.tasks and sweep.variants and sweep.seeds and sweep.lrs):
        raise SweepError("the sweep is empty: --tasks, --variants, --seeds and --lrs each "
                         "need a value")
    searched = [v for v in sweep.variants if VARIANTS[v].searches_slow_noise]
    for flag, values in (("--alphas", sweep.alphas), ("--lambdas", sweep.lambdas)):
        if searched and not values:
            raise SweepError(f"{flag} is empty, but the LoRASC method(s) {', '.join(searched)} "
                             f"choose their α and λ from it")
    # A repeated value would make two cells one, and no seed would ever count as complete.
    for flag, values in (("--tasks", sweep.tasks), ("--variants", sweep.variants),
                         ("--seeds", [str(x) for x in sweep.seeds]),
                         ("--lrs", [format_value(x) for x in sweep.lrs]),
                         ("--alphas", [format_value(x) for x in sweep.alphas]),
                         ("--lambdas", [format_value(x) for x in sweep.lambdas])):
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            raise SweepError(f"{flag} repeats {', '.join(map(str, repeated))}")
    for flag, key, values in (("--alphas", "slow_alpha", sweep.alphas),
                              ("--lambdas", "noise_lambda", sweep.lambdas)):
        for value in values:
            try:
                LoRASCConfig.from_config({key: value})
            except ValueError as e:
                raise SweepError(f"{flag} {format_value(value)}: {e}") from e
    variant_keys = {o.split("=")[0] for v in VARIANTS.values() for o in v.overrides}
    for override in sweep.overrides:
        if "=" not in override and not override.startswith("~"):
            raise SweepError(f"--override {override!r} must be key=value (or ~key to delete)")
        key = override.split("=")[0].lstrip("~")
        if key in CELL_KEYS:
            raise SweepError(f"--override {override!r} sets {key}, which the sweep sets per cell "
                             f"(use {CELL_KEYS[key]})")
        if key in variant_keys:
            raise SweepError(f"--override {override!r} sets {key}, which the sweep sets per "
                             f"method (choose methods with --variants)")
    for task in sweep.tasks:
        num_experts = {}
        for variant in sweep.variants:
            # The method's config at one point of the grid: each grid value was checked above.
            cell = sweep.seed_cells(task, variant, sweep.seeds[0])[0]
            cfg = load_train_config(sweep.config_path(task), [*sweep.overrides,
                                                              *VARIANTS[variant].overrides,
                                                              *cell.overrides()])
            try:
                lorasc = LoRASCConfig.from_config(cfg.get("lorasc"))
            except ValueError as e:
                raise SweepError(f"{task} / {variant}: {e}") from e
            if lorasc.num_experts is not None:
                num_experts[variant] = lorasc.num_experts
        check_data_files(task, cfg.dataset)
        if num_experts:  # Table 4: every expert needs at least one step of the task's run
            steps = run_steps(task, cfg)
            for variant, t in num_experts.items():
                if t > steps:
                    raise SweepError(
                        f"{task} / {variant}: lorasc.num_experts={t}, but a {task} run has only "
                        f"{steps} optimizer steps; every expert needs one")


def run_steps(task: str, cfg: DictConfig) -> int:
    """Optimizer steps of one run of ``task`` under ``cfg``: its MeZO train split's size (read
    from the data file; the same for every seed) in whole batches, times the epochs."""
    ds = cfg.dataset
    rows = load_split(task, "train", seed=0, num_train=ds.num_train, num_dev=ds.get("num_dev"),
                      num_eval=ds.num_eval, data_dir=ds.get("data_dir"),
                      train_file=ds.get("train_file"))
    per_epoch = steps_per_epoch(len(rows) // cfg.batch_size, cfg.gradient_accumulation_steps,
                                cfg.get("max_steps_per_epoch"))
    return per_epoch * cfg.epochs


def check_data_files(task: str, cfg_dataset: DictConfig) -> None:
    """Fail now, not hours into the sweep, when a task's original files are missing."""
    for which, explicit in (("train", "train_file"), ("valid", "valid_file")):
        try:
            resolve_file(task, which, cfg_dataset.get("data_dir"), cfg_dataset.get(explicit))
        except MissingDataError as e:
            raise SweepError(f"{e} (for the sweep: --override dataset.data_dir=<root holding "
                             f"the files in that layout>, or set $LORASC_SHARED_DATA)") from e
