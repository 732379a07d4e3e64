"""Evaluate a checkpoint on lm-eval tasks (InstructEval by default) from a torchtune config.

    tune run lorasc_tune/recipes/lorasc_eval.py --config configs/lorasc_eval.yaml \\
        checkpoint_dir=/tmp/lorasc_demo/epoch_2 tokenizer_path=/tmp/lorasc_demo_assets/demo_spm_512.model

It wraps the same adapter as ``python -m evals.lm_eval_cli`` (:class:`evals.lm_adapter.LoraScLM`), so
both paths give the same numbers. The model comes either from ``checkpoint_dir`` (an HF folder such as
the ``epoch_N`` our training recipe writes; the architecture is read from its ``config.json``) or,
torchtune style, from ``model`` + ``checkpointer`` components; the tokenizer from ``tokenizer_path``
or a ``tokenizer`` component. Results: lm-eval's JSON and a markdown table under ``output_dir``.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training


def _model_from_components(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """torchtune style: instantiate ``cfg.model`` and load ``cfg.checkpointer``'s weights into it."""
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
        if cfg.get("seed") is not None:
            training.set_seed(cfg.seed)
        data_options = OmegaConf.to_container(cfg.get("data", None) or OmegaConf.create({}), resolve=True)
        results = evaluate(
            lm=build_lm(cfg), tasks=list(cfg.get("tasks", ["instructeval"])), limit=cfg.get("limit"),
            allow_code_execution=bool(cfg.get("allow_code_execution", False)),
            output_dir=cfg.get("output_dir"), log_samples=bool(cfg.get("log_samples", False)),
            data_options={k: v for k, v in data_options.items() if v is not None},
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
