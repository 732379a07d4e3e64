"""Everything the demo run needs, built locally so that it runs with no download.

The demo config (``configs/demo_tiny.yaml``) names these factories as ordinary torchtune
components. Each one creates its files under a cache folder on first use and reuses them
afterwards:

* :func:`demo_instruct_dataset`: a small, learnable instruction set in Alpaca's JSON
  layout (word reversal, addition, counting, sorting), generated from a fixed seed.
* :func:`demo_tokenizer`: a SentencePiece BPE model trained on that text, with Llama-2's
  special ids (unk 0, bos 1, eos 2), wrapped in torchtune's ``Llama2Tokenizer``.
* :func:`demo_checkpointer`: a randomly initialised Llama-2-shaped model written as a
  Hugging Face checkpoint (``config.json`` + safetensors), opened with torchtune's stock
  ``FullModelHFCheckpointer``, so the demo exercises the same loading and saving path a
  real Llama-2-7B run does.

:func:`write_tiny_llama2_hf_checkpoint` is public because tests and benchmarks use it too.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from lorasc_tune.io import atomic_write_bytes, atomic_write_text

# A Llama-2 shape, scaled down: ~1.2M parameters with the demo vocabulary.
DEMO_MODEL_ARGS: Dict[str, Any] = dict(
    vocab_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    embed_dim=128,
    intermediate_dim=344,
    max_seq_len=256,
    norm_eps=1e-5,
)

_WORDS = (
    "apple river stone cloud green quick seven table light music paper north "
    "tiger orange silver window garden bread ocean pencil summer winter yellow"
).split()


def _demo_examples(n: int, seed: int) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            words = rng.sample(_WORDS, rng.randint(3, 5))
            rows.append(
                dict(instruction="Reverse the order of the words.",
                     input=" ".join(words), output=" ".join(reversed(words)))
            )
        elif kind == 1:
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            rows.append(dict(instruction="Add the two numbers.",
                             input=f"{a} and {b}", output=str(a + b)))
        elif kind == 2:
            words = rng.sample(_WORDS, rng.randint(2, 6))
            rows.append(dict(instruction="How many words are there?",
                             input=" ".join(words), output=str(len(words))))
        else:
            words = rng.sample(_WORDS, rng.randint(3, 5))
            rows.append(dict(instruction="Sort the words alphabetically.",
                             input=" ".join(words), output=" ".join(sorted(words))))
    return rows


def _cache_dir(cache_dir: Optional[str]) -> Path:
    path = Path(cache_dir or os.environ.get("LORASC_DEMO_CACHE", "/tmp/lorasc_demo_assets"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_demo_data(cache_dir: Optional[str] = None, num_examples: int = 512, seed: int = 0) -> Path:
    """Write the demo instruction set as Alpaca-style JSON; returns its path."""
    path = _cache_dir(cache_dir) / f"demo_instruct_{num_examples}_{seed}.json"
    if not path.exists():
        atomic_write_text(path, json.dumps(_demo_examples(num_examples, seed), indent=1))
    return path


def write_demo_tokenizer(cache_dir: Optional[str] = None, vocab_size: int = 512) -> Path:
    """Train (once) a SentencePiece BPE model on the demo data; returns the ``.model`` path."""
    import sentencepiece as spm

    path = _cache_dir(cache_dir) / f"demo_spm_{vocab_size}.model"
    if path.exists():
        return path
    rows = json.loads(write_demo_data(cache_dir).read_text())
    lines = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    # Alpaca's prompt scaffolding is part of every training sequence, so the tokenizer sees it.
    lines += ["Below is an instruction that describes a task, paired with an input that "
              "provides further context. Write a response that appropriately completes "
              "the request. ### Instruction: ### Input: ### Response:"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    atomic_write_bytes(path, model.getvalue())
    return path


def hf_llama_config(model_args: Dict[str, Any]) -> Dict[str, Any]:
    """The ``config.json`` a Hugging Face ``LlamaForCausalLM`` needs for these torchtune args."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model_args["embed_dim"],
        "intermediate_size": model_args["intermediate_dim"],
        "num_attention_heads": model_args["num_heads"],
        "num_key_value_heads": model_args["num_kv_heads"],
        "num_hidden_layers": model_args["num_layers"],
        "vocab_size": model_args["vocab_size"],
        "max_position_embeddings": model_args["max_seq_len"],
        "rms_norm_eps": model_args.get("norm_eps", 1e-5),
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def write_tiny_llama2_hf_checkpoint(
    checkpoint_dir: str | Path,
    model_args: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random Llama-2-shaped model and write it as an HF checkpoint folder.

    Writes ``config.json``, ``model-00001-of-00001.safetensors`` and the safetensors index,
    the layout ``tune download meta-llama/Llama-2-7b-hf`` produces. Existing folders are reused.
    """
    from safetensors.torch import save_file
    from torchtune.models import convert_weights
    from torchtune.models.llama2 import llama2

    args = dict(DEMO_MODEL_ARGS if model_args is None else model_args)
    out = Path(checkpoint_dir)
    weights = out / "model-00001-of-00001.safetensors"
    if weights.exists() and (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = llama2(**args)
        # torchtune initialises norms to one and linears uniformly; give the output layer and
        # embeddings Llama-like scale so the logits are not degenerate.
        for name, p in model.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    hf_state = convert_weights.tune_to_hf(
        {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()},
        num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"],
    )
    tmp = weights.with_suffix(".safetensors.tmp")
    save_file(hf_state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in hf_state.values())},
        "weight_map": {k: weights.name for k in hf_state},
    }
    atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=1))
    cfg = hf_llama_config(args)
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=1))
    return out


# ---- torchtune components named by configs/demo_tiny.yaml -------------------------------


def demo_tokenizer(cache_dir: Optional[str] = None, max_seq_len: Optional[int] = 256):
    """torchtune ``Llama2Tokenizer`` over the demo SentencePiece model (no chat template)."""
    from torchtune.models.llama2 import llama2_tokenizer

    return llama2_tokenizer(str(write_demo_tokenizer(cache_dir)), max_seq_len=max_seq_len,
                            prompt_template=None)


def demo_instruct_dataset(tokenizer, cache_dir: Optional[str] = None, num_examples: int = 512,
                          train_on_input: bool = False, packed: bool = False):
    """The demo instruction set through torchtune's own ``alpaca_dataset`` (local JSON)."""
    from torchtune.datasets import alpaca_dataset

    path = write_demo_data(cache_dir, num_examples=num_examples)
    return alpaca_dataset(tokenizer, source="json", data_files=str(path), split="train",
                          train_on_input=train_on_input, packed=packed)


def write_hf_tokenizer_files(folder: Path, spm_model: Path, max_seq_len: int = 256) -> None:
    """The tokenizer and generation files of a Hugging Face Llama folder, for a SentencePiece
    model: ``AutoTokenizer`` then gives the ids torchtune's ``llama2_tokenizer`` does (BOS
    first), and greedy generation stops at EOS. Existing files are kept."""
    folder = Path(folder)
    if not (folder / "tokenizer.model").exists():
        atomic_write_bytes(folder / "tokenizer.model", Path(spm_model).read_bytes())
    files = {
        "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                  "add_eos_token": False, "bos_token": "<s>",
                                  "eos_token": "</s>", "unk_token": "<unk>",
                                  "model_max_length": max_seq_len},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>",
                                    "unk_token": "<unk>"},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False,
                                   "max_length": max_seq_len},
    }
    for name, content in files.items():
        if not (folder / name).exists():
            atomic_write_text(folder / name, json.dumps(content, indent=1))


def demo_checkpointer(output_dir: str, cache_dir: Optional[str] = None, **kwargs):
    """torchtune's stock ``FullModelHFCheckpointer`` over a freshly written tiny Llama-2, whose
    folder also holds the demo tokenizer in Hugging Face's layout: torchtune copies those files
    into every exported epoch, which transformers and ``lm_eval --model hf`` then load as is."""
    from torchtune.training import FullModelHFCheckpointer

    ckpt_dir = write_tiny_llama2_hf_checkpoint(_cache_dir(cache_dir) / "tiny_llama2_hf")
    write_hf_tokenizer_files(ckpt_dir, write_demo_tokenizer(cache_dir))
    return FullModelHFCheckpointer(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=["model-00001-of-00001.safetensors"],
        model_type="LLAMA2",
        output_dir=output_dir,
        **kwargs,
    )
