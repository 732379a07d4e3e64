"""Evaluate a checkpoint on lm-eval tasks (InstructEval by default) from a torchtune config.

    tune run lorasc_tune/recipes/lorasc_eval.py --config configs/lorasc_eval.yaml \\
        checkpoint_dir=/tmp/lorasc_demo/epoch_2 tokenizer_path=/tmp/lorasc_demo_assets/demo_spm_512.model

It wraps the same adapter as ``python -m evals.lm_eval_cli`` (:class:`evals.lm_adapter.LoraScLM`), so
both paths give the same numbers. The model comes either from ``checkpoint_dir`` (an HF folder such as
the ``epoch_N`` our training recipe writes; the architecture is read from its ``config.json``) or,
torchtune style, from ``model`` + ``checkpointer`` components; the tokenizer from ``tokenizer_path``
or a ``tokenizer`` component. Results: lm-eval's JSON and a markdown table under ``output_dir``.

The config is checked before the model is built: unknown top-level keys, unknown ``data`` keys and
unknown task names stop the run with an error naming the key (or task) and what is allowed.
``tasks`` may be a list or, from the command line, one name or comma-separated names
(``tasks=instructeval_mmlu``).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, training


#: Every top-level key the recipe reads (see configs/lorasc_eval.yaml); ``model``, ``checkpointer``
#: and ``tokenizer`` are the torchtune-style components.
ALLOWED_KEYS = frozenset({
    "checkpoint_dir", "tokenizer_path", "output_dir", "tasks", "limit", "allow_code_execution",
    "log_samples", "max_gen_toks_override", "data", "device", "dtype", "batch_size", "max_seq_len",
    "max_gen_toks", "use_cache", "seed", "model", "checkpointer", "tokenizer",
})


def task_names(value: Any) -> List[str]:
    """``cfg.tasks`` as a list of names. A string is one name, or several separated by commas: a
    command-line ``tasks=instructeval_mmlu`` arrives as a string, and ``list()`` would split it into
    characters."""
    if value is None:
        return ["instructeval"]
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (ListConfig, list, tuple)):
        return [str(t) for t in value]
    raise ValueError(f"config key 'tasks' must be a task name or a list of names, got {value!r}")


def validate_config(cfg: DictConfig) -> Tuple[List[str], Dict[str, Any]]:
    """``(task names, data options)`` of ``cfg``, or a ``ValueError`` for an unknown top-level key,
    ``data`` key or task. Cheap (reads YAMLs only), so it runs before the model is built."""
    from evals.suite import check_task_names, task_manager

    unknown = sorted(set(cfg.keys()) - ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; allowed: {sorted(ALLOWED_KEYS)}")
    data = cfg.get("data", None) or {}
    if not isinstance(data, (DictConfig, dict)):
        raise ValueError(f"config key 'data' must be a mapping of data options, got {data!r}")
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    data_options = {k: v for k, v in data.items() if v is not None}  # null: use the default location
    manager = task_manager(data_options)  # raises on an unknown data key, listing the allowed ones
    return check_task_names(task_names(cfg.get("tasks", None)), manager), data_options


def _model_from_components(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """torchtune style: instantiate ``cfg.model`` and load ``cfg.checkpointer``'s weights into it."""
    from lorasc_tune.families import prepare_checkpoint_conversion

    prepare_checkpoint_conversion(cfg)  # Gemma2: torchtune's conversion corrected (families.py)
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    checkpointer = config.instantiate(cfg.checkpointer)
    model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY])
    return model.eval().requires_grad_(False)


def build_lm(cfg: DictConfig):
    """The :class:`LoraScLM` a config describes."""
    from evals.lm_adapter import LoraScLM
    from evals.model_loading import resolve_device, resolve_dtype

    device = resolve_device(cfg.get("device"))
    dtype = resolve_dtype(cfg.get("dtype"), device)
    common: Dict[str, Any] = dict(
        batch_size=cfg.get("batch_size", 8), max_seq_len=cfg.get("max_seq_len"),
        max_gen_toks=cfg.get("max_gen_toks", 256), use_cache=cfg.get("use_cache", True),
    )
    tokenizer = config.instantiate(cfg.tokenizer) if cfg.get("tokenizer") else None
    if cfg.get("model") is not None:
        model = _model_from_components(cfg, device, dtype)
        return LoraScLM(model=model, tokenizer=tokenizer, tokenizer_path=cfg.get("tokenizer_path"), **common)
    return LoraScLM(checkpoint_dir=cfg.get("checkpoint_dir"), tokenizer_path=cfg.get("tokenizer_path"),
                    tokenizer=tokenizer, device=str(device), dtype=dtype, **common)


class LoraScEvalRecipe:
    """Build the model adapter from ``cfg`` and run lm-eval on ``cfg.tasks``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def evaluate(self) -> Dict[str, Any]:
        from evals.suite import evaluate

        cfg = self.cfg
        tasks, data_options = validate_config(cfg)  # before the (slow) model build
        if cfg.get("seed") is not None:
            training.set_seed(cfg.seed)
        results = evaluate(
            lm=build_lm(cfg), tasks=tasks, limit=cfg.get("limit"),
            allow_code_execution=bool(cfg.get("allow_code_execution", False)),
            output_dir=cfg.get("output_dir"), log_samples=bool(cfg.get("log_samples", False)),
            data_options=data_options,
            gen_kwargs=(f"max_gen_toks={int(cfg.max_gen_toks_override)}"
                        if cfg.get("max_gen_toks_override") else None),
        )
        print(results.get("markdown", ""), end="")
        return results


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run lorasc_tune/recipes/lorasc_eval.py --config <yaml> [k=v ...]``."""
    config.log_config(recipe_name="LoraScEvalRecipe", cfg=cfg)
    LoraScEvalRecipe(cfg).evaluate()


if __name__ == "__main__":
    sys.exit(recipe_main())
