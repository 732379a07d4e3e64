"""The ``lorasc:`` config block: one dataclass, and every check with its error message.

Every key is read and validated here, once. Recipes receive a :class:`LoRASCConfig` and never
re-check it.

.. code-block:: yaml

    lorasc:
      cascade: true           # false = plain LoRA: one expert, merged only in the exported copy
      steps_per_expert: null  # null = one expert per epoch; N = a new expert every N optimizer steps
      num_experts: null       # or T: T experts spread evenly over the whole run (Table 4's
                              # cascade frequency, 2 … 1250 over 5 epochs, whatever the data size)
      slow_alpha: 0.5         # α in [0, 1): A_slow ← α·A_slow + (1-α)·A_fast (0 = COLA-style)
                              # auto = per matrix, α = (1 - c)/2, c = cosine between this
                              #        fast expert's B·A and the previous one's (0.5 when c = 0)
      noise_lambda: 1.0       # λ >= 0: W̃ = W + U(-λ/2, λ/2)·std(s·B_slow·A_slow) (0 = off)
                              # auto = per matrix, λ = 1 - c with the latest c (1 when c = 0)
      lr_ratio_B: 1.0         # LoRA+: lr(B) = lr_ratio_B × lr(A); the paper uses 16
      schedule: expert        # expert = the LR schedule restarts, compressed, for every expert
                              # run = one schedule over the whole run (our COLA baseline)
      merge_precision: fp32_master  # how merges and noise are stored in a bf16 base:
                              # fp32_master = fp32 copy of the adapted matrices, 4 bytes/element
                              #               (host RAM on one device; per-GPU shard on FSDP2)
                              # stochastic  = unbiased stochastic rounding, no extra memory
                              # nearest     = round-to-nearest (sub-half-ulp deltas vanish)
                              # fp32 bases are exact in every mode; NF4 (QLoRA) bases always
                              # keep a full-precision master on CPU (see docs/merge_precision.md)
      adapter_export_rank: null  # PEFT adapters in epoch_N/adapter/ (lorasc_tune/peft_export.py):
                              # null = exact (W_T - W_0 has rank <= experts x r), written only
                              #        when noise is off or the cascade is off
                              # k    = rank-k truncated SVD of W_T - W_0 (approximate with noise
                              #        on); each matrix's relative error is reported
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union


MERGE_PRECISIONS = ("nearest", "stochastic", "fp32_master")
# Chosen from bench/merge_precision.py (docs/merge_precision.md): the fp32 master loses none of
# the update and had the smallest error at every T measured (W is always the nearest bf16
# value of the exact fp32 result). On one device it lives in host memory: no GPU memory.
DEFAULT_MERGE_PRECISION = "fp32_master"
# slow_alpha / noise_lambda value that lets the engine set them from the experts themselves
# (lorasc_tune.cascade, "Automatic α and λ").
AUTO = "auto"


class LoRASCConfigError(ValueError):
    """A ``lorasc:`` key (or another recipe key this project checks) has a bad value."""


@dataclass(frozen=True)
class LoRASCConfig:
    cascade: bool = True
    steps_per_expert: Optional[int] = None
    num_experts: Optional[int] = None
    slow_alpha: Union[float, str] = 0.5
    noise_lambda: Union[float, str] = 1.0
    lr_ratio_B: float = 1.0
    schedule: str = "expert"
    merge_precision: str = DEFAULT_MERGE_PRECISION
    adapter_export_rank: Optional[int] = None

    @property
    def auto_alpha(self) -> bool:
        return self.slow_alpha == AUTO

    @property
    def auto_lambda(self) -> bool:
        return self.noise_lambda == AUTO

    @property
    def slow_enabled(self) -> bool:
        return self.cascade and (self.auto_alpha or self.slow_alpha > 0.0)

    @property
    def noise_enabled(self) -> bool:
        return self.cascade and (self.auto_lambda or self.noise_lambda > 0.0)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, block: Optional[Mapping[str, Any]]) -> "LoRASCConfig":
        """Build and validate from a ``lorasc:`` block (dict or OmegaConf); ``None`` = defaults.

        Raises:
            LoRASCConfigError: naming the key, the allowed range and the value given.
        """
        if block is None:
            return cls()
        raw = dict(_to_plain(block))
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise LoRASCConfigError(
                f"unknown key(s) in lorasc: {', '.join('lorasc.' + k for k in unknown)}; "
                f"allowed keys are {', '.join(allowed)}"
            )
        cfg = cls(**{**asdict(cls()), **raw})
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if not isinstance(self.cascade, bool):
            raise LoRASCConfigError(
                f"lorasc.cascade must be true or false; got {self.cascade!r}"
            )
        spe = self.steps_per_expert
        if spe is not None:
            if isinstance(spe, bool) or not isinstance(spe, int):
                raise LoRASCConfigError(
                    f"lorasc.steps_per_expert must be null (one expert per epoch) or an "
                    f"integer >= 1; got {spe!r}"
                )
            if spe <= 0:
                raise LoRASCConfigError(
                    f"lorasc.steps_per_expert must be >= 1 (or null for one expert per epoch); "
                    f"got {spe}"
                )
            if not self.cascade:
                raise LoRASCConfigError(
                    f"lorasc.steps_per_expert={spe} sets a cascade frequency, but "
                    f"lorasc.cascade is false (plain LoRA has a single expert); set "
                    f"lorasc.steps_per_expert to null or lorasc.cascade to true"
                )
        t = self.num_experts
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise LoRASCConfigError(
                    f"lorasc.num_experts must be null or an integer >= 1; got {t!r}")
            if spe is not None:
                raise LoRASCConfigError(
                    f"lorasc.num_experts={t} and lorasc.steps_per_expert={spe} both set the "
                    f"cascade frequency; set one of them to null")
            if not self.cascade and t != 1:
                raise LoRASCConfigError(
                    f"lorasc.num_experts={t}, but lorasc.cascade is false (plain LoRA has a "
                    f"single expert); set lorasc.num_experts to null or lorasc.cascade to true")
        if self.schedule not in ("expert", "run"):
            raise LoRASCConfigError(
                f"lorasc.schedule must be 'expert' (restart per expert) or 'run' (one schedule "
                f"for the whole run); got {self.schedule!r}")
        if self.merge_precision not in MERGE_PRECISIONS:
            raise LoRASCConfigError(
                f"lorasc.merge_precision must be one of {', '.join(MERGE_PRECISIONS)} "
                f"(nearest = round-to-nearest, stochastic = stochastic rounding, fp32_master = "
                f"an fp32 copy of the adapted matrices); got {self.merge_precision!r}")
        if not self.auto_alpha:
            _check_float("slow_alpha", self.slow_alpha, lo=0.0, hi=1.0, hi_open=True,
                         rng="[0, 1)", or_auto=True)
        if not self.auto_lambda:
            _check_float("noise_lambda", self.noise_lambda, lo=0.0, hi=math.inf,
                         rng="[0, inf)", or_auto=True)
        _check_float("lr_ratio_B", self.lr_ratio_B, lo=0.0, hi=math.inf, lo_open=True,
                     rng="(0, inf)")
        k = self.adapter_export_rank
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise LoRASCConfigError(
                f"lorasc.adapter_export_rank must be null (exact PEFT adapters, noise off only) "
                f"or an integer >= 1 (the rank of an approximate, truncated-SVD adapter); "
                f"got {k!r}")


def _check_float(key: str, value: Any, lo: float, hi: float, rng: str,
                 lo_open: bool = False, hi_open: bool = False, or_auto: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad:
        v = float(value)
        bad = (not math.isfinite(v) or v < lo or v > hi
               or (lo_open and v == lo) or (hi_open and v == hi))
    if bad:
        also = f" or '{AUTO}'" if or_auto else ""
        raise LoRASCConfigError(f"lorasc.{key} must be a number in {rng}{also}; got {value!r}")


def _to_plain(block: Any) -> Mapping[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(block, DictConfig):
            return OmegaConf.to_container(block, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(block, Mapping):
        raise LoRASCConfigError(f"lorasc must be a mapping of keys to values; got {block!r}")
    return block


# ---- recipe-level inputs ----------------------------------------------------------------------


LLM_SECTIONS = ("model", "tokenizer", "checkpointer", "dataset", "optimizer", "output_dir")


# Every top-level key a recipe reads. A key outside these is refused (a typo such as
# `save_every_n_step` would otherwise run silently without what it meant to ask for).
_COMMON_KEYS = frozenset({
    "output_dir", "model", "optimizer", "lr_scheduler", "loss", "metric_logger", "device",
    "dtype", "seed", "shuffle", "batch_size", "epochs", "max_steps_per_epoch",
    "gradient_accumulation_steps", "clip_grad_norm", "enable_activation_checkpointing",
    "enable_activation_offloading", "resume_from_checkpoint", "save_every_n_steps",
    "save_final_model_only", "keep_last_n_states", "log_every_n_steps", "log_peak_memory_stats",
    "cudnn_deterministic_mode", "restart_expert", "lorasc"})
LLM_KEYS = _COMMON_KEYS | {"tokenizer", "checkpointer", "dataset", "compile", "profiler",
                           "validate_dataset", "collate_fn", "fsdp_cpu_offload",
                           "fsdp_reshard_after_forward", "custom_sharded_layers",
                           "save_adapter_weights_only"}
VISION_KEYS = _COMMON_KEYS | {"data", "checkpoint", "head", "eval"}
# torchtune's stock LoRA configs carry these; the LoRASC recipes knowingly do without them.
IGNORED_STOCK_KEYS = {
    "optimizer_in_bwd": "each expert needs a fresh optimizer, which a fused backward step "
                        "cannot give",
    "run_val_every_n_steps": "no validation runs during training",
    "dataset_val": "no validation runs during training",
    "log_level": "the recipes log at INFO",
}


def check_top_level_keys(cfg: Any, known: frozenset) -> None:
    """Refuse unknown top-level keys, naming each and the nearest known one; warn once about
    stock torchtune keys the recipe ignores. Keys that only feed ``${...}`` interpolation
    elsewhere in the config (e.g. a shared ``cache_dir``) are allowed."""
    import difflib
    import logging
    import re

    try:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_yaml(cfg, resolve=False)
    except Exception:  # a plain mapping: no interpolation to follow
        raw = ""
    referenced = set(re.findall(r"\$\{([A-Za-z_][\w]*)", raw))
    keys = set(cfg.keys())
    ignored = sorted(keys & IGNORED_STOCK_KEYS.keys())
    if ignored:
        logging.getLogger(__name__).warning(
            "LoRASC: ignoring torchtune key(s) this recipe does not use: "
            + "; ".join(f"{k} ({IGNORED_STOCK_KEYS[k]})" for k in ignored))
    unknown = sorted(keys - known - IGNORED_STOCK_KEYS.keys() - referenced)
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise LoRASCConfigError(f"unknown top-level config key(s): {', '.join(hints)}")


def clip_grad_norm_value(clip: Any) -> Optional[float]:
    """``clip_grad_norm`` as a float: null (no clipping, the norm is not computed), a number
    > 0, or ``inf`` (torchtune's way to log the norm without clipping; YAML reads it as the
    string "inf")."""
    if clip is None:
        return None
    try:
        value = float(clip) if not isinstance(clip, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or math.isnan(value) or value <= 0:
        raise LoRASCConfigError(f"clip_grad_norm must be null, a number > 0 or inf; got {clip!r}")
    return value


def validate_recipe_config(cfg: Any, sections: tuple = LLM_SECTIONS,
                           known_keys: frozenset = LLM_KEYS) -> None:
    """Check the top-level training keys a LoRASC recipe reads, before anything is written.

    ``sections`` are the top-level keys the recipe cannot run without; ``known_keys`` all the
    top-level keys it reads (anything else is refused).
    """
    check_top_level_keys(cfg, known_keys)
    def positive_int(key: str, optional: bool = False) -> None:
        value = cfg.get(key, None)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "null or an integer >= 1" if optional else "an integer >= 1"
            raise LoRASCConfigError(f"{key} must be {allowed}; got {value!r}")

    positive_int("epochs")
    positive_int("batch_size")
    positive_int("gradient_accumulation_steps")
    positive_int("max_steps_per_epoch", optional=True)
    positive_int("save_every_n_steps", optional=True)
    positive_int("keep_last_n_states", optional=True)
    positive_int("log_every_n_steps", optional=True)  # null: every step
    clip_grad_norm_value(cfg.get("clip_grad_norm", None))
    if "save_adapter_weights_only" in known_keys:
        check_adapters_only(cfg)
    for key in sections:
        if cfg.get(key, None) is None:
            raise LoRASCConfigError(f"the config has no `{key}` section, which this recipe needs")


def check_adapters_only(cfg: Any) -> None:
    """``save_adapter_weights_only: true`` (PEFT adapters, no merged model) is refused here,
    before anything is built, where the config alone shows that no adapter can be written
    (DoRA). Whether noise makes the adapter inexact depends on the number of experts (one
    expert gets no noise), and a rounded bf16 base on the built model; those, and what only the
    built checkpointer shows (its class, ``model_type``), are refused by
    ``recipe_common.check_adapter_export`` at set-up, still before any write."""
    only = cfg.get("save_adapter_weights_only", False)
    if not isinstance(only, bool):
        raise LoRASCConfigError(f"save_adapter_weights_only must be true or false; got {only!r}")
    if not only:
        return
    from lorasc_tune.peft_export import peft_adapter_problem

    model = cfg.get("model", None) or {}
    problem = peft_adapter_problem(LoRASCConfig.from_config(cfg.get("lorasc", None)),
                                   dora=bool(model.get("use_dora", False)))
    if problem is not None:
        raise LoRASCConfigError(f"save_adapter_weights_only is true, but {problem}; nothing was "
                                f"written")


def check_checkpoint_files(cfg_checkpointer: Any) -> None:
    """Fail early, naming the path, if a torchtune checkpointer's input files are missing.

    Runs before the checkpointer is built (building it creates ``output_dir``), so a typo in
    a path leaves the file system untouched. Components that make their own files (the
    demo's) have no ``checkpoint_files`` key and are skipped.
    """
    files = cfg_checkpointer.get("checkpoint_files", None)
    ckpt_dir = cfg_checkpointer.get("checkpoint_dir", None)
    if files is None or ckpt_dir is None:
        return
    root = Path(str(ckpt_dir))
    if not root.is_dir():
        raise FileNotFoundError(f"checkpointer.checkpoint_dir does not exist: {root}")
    if isinstance(files, Mapping) or hasattr(files, "filename_format"):
        return  # torchtune's {filename_format, max_filename} form; the checkpointer checks it
    for name in files:
        if not (root / str(name)).is_file():
            raise FileNotFoundError(
                f"checkpointer.checkpoint_files: {root / str(name)} does not exist")
    if "HFCheckpointer" in str(cfg_checkpointer.get("_component_", "")):
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"checkpointer.checkpoint_dir has no config.json, which the HF checkpointer "
                f"needs: {root / 'config.json'}")


def check_tokenizer_file(cfg_tokenizer: Any) -> None:
    path = cfg_tokenizer.get("path", None)
    if path is not None and not Path(str(path)).is_file():
        raise FileNotFoundError(f"tokenizer.path does not exist: {path}")


def check_json_data_files(cfg_dataset: Any, name: str = "dataset") -> None:
    """Read a local JSON / JSON-lines dataset as the file it is, before HF ``datasets`` does.

    ``datasets`` reports a syntax error without a file or line, and infers one type per column:
    a single ``"output": 5`` among text outputs turns the column into numbers and the error
    surfaces at another row. Here a syntax error names the file, line and column, and a field
    whose type differs from its other rows names the file's own row.
    """
    import json

    if cfg_dataset.get("source", None) != "json":
        return
    files = cfg_dataset.get("data_files", None)
    files = [files] if isinstance(files, str) else list(files or [])
    for file in files:
        path = Path(str(file))
        if not path.is_file():
            raise FileNotFoundError(f"{name}.data_files: {path} does not exist")
        text = path.read_text(encoding="utf-8")
        # One JSON document ("[...]"), or JSON lines (one object per line).
        lines = [] if text.lstrip().startswith("[") else text.splitlines()
        try:
            rows = [json.loads(line) for line in lines if line.strip()] if lines \
                else json.loads(text)
        except json.JSONDecodeError as err:
            line_no = err.lineno
            if lines:  # the error is relative to the line it was parsing
                line_no = next(i for i, line in enumerate(lines, 1)
                               if line.strip() and not _parses(line))
            raise ValueError(f"{name}.data_files: {path} is not valid JSON: line {line_no}, "
                             f"column {err.colno}: {err.msg}") from None
        if isinstance(rows, dict):  # {"data": [...]}-style files: leave them to `field:`
            continue
        types: Dict[str, Dict[type, int]] = {}
        for row in rows:
            for key, value in (row.items() if isinstance(row, dict) else ()):
                if value is not None:
                    types.setdefault(key, {}).setdefault(type(value), 0)
                    types[key][type(value)] += 1
        for key, seen in types.items():
            if len(seen) < 2:
                continue
            usual = max(seen, key=seen.get)
            for i, row in enumerate(rows):
                value = row.get(key) if isinstance(row, dict) else None
                if value is not None and type(value) is not usual:
                    raise ValueError(
                        f"{name}.data_files: {path} row {i} has {key!r} = {value!r} of type "
                        f"{type(value).__name__}, where the other rows have type "
                        f"{usual.__name__}; fix that row")


def _parses(line: str) -> bool:
    import json

    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def check_dataset_rows(dataset: Any, name: str = "dataset",
                       max_seq_len: Optional[int] = None) -> int:
    """Transform every row once so a malformed one fails now, naming its index and field.

    torchtune datasets transform rows lazily, so without this a bad row surfaces hours into
    a run. Tokenising once up front costs seconds for instruction-sized data sets. The
    tokenizer cuts rows at ``max_seq_len`` without a word; the rows that reach it are counted
    and reported once.

    Returns:
        How many rows reach ``max_seq_len`` (were truncated), 0 without one.
    """
    raw = getattr(dataset, "_data", None)  # torchtune SFTDataset keeps the HF rows here
    truncated = 0
    for i in range(len(dataset)):
        try:
            row = dataset[i]
        except Exception as e:  # noqa: BLE001 - any failure here is a data problem
            # A JSON row missing a field comes back from HF datasets as None in that column.
            # Only a row the transform rejects is reported: optional fields (Alpaca's
            # ``input``) may be empty.
            empty = []
            if raw is not None and hasattr(raw, "column_names"):
                empty = [k for k, v in raw[i].items() if v is None]
            if empty:
                raise ValueError(f"{name} row {i} has no field '{empty[0]}' "
                                 f"(fields: {', '.join(raw.column_names)})") from e
            if isinstance(e, KeyError):
                raise ValueError(f"{name} row {i} has no field {e}; check the data file or "
                                 f"the dataset's column_map") from e
            raise ValueError(f"{name} row {i} could not be prepared: {type(e).__name__}: {e}") \
                from e
        tokens = row.get("tokens") if isinstance(row, Mapping) else None
        if tokens is not None and len(tokens) == 0:
            raise ValueError(f"{name} row {i} tokenises to an empty sequence")
        if tokens is not None and max_seq_len and len(tokens) >= max_seq_len:
            truncated += 1
    if truncated and not getattr(dataset, "packed", False):
        import logging

        logging.getLogger(__name__).warning(
            f"LoRASC: {truncated} of {len(dataset)} {name} rows truncated to {max_seq_len} "
            f"tokens (the tokenizer's max_seq_len)")
    return truncated
