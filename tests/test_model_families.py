"""Model families beyond Llama-2: each one trained through the single-device recipe, its export
read back by transformers; the shipped Alpaca configs; the Gemma2 corrections.

For each family a tiny random checkpoint of the family's architecture is saved by transformers
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``...), with a tiny tokenizer in the family's own
format (tiktoken for Llama-3, vocab.json + merges.txt for Qwen2.5 and Phi-4, SentencePiece for
Mistral, Phi-3 and Gemma2; the special tokens renumbered to fit the tiny vocabulary). Two
experts train through the recipe with LoRA on every attention and MLP projection; the final
epoch folder then loads in the family's transformers class with no missing or unexpected key,
and gives, in fp32 and to 1e-5, the logits of a plain torchtune model of the family holding the
merged weights the recipe exported (an independent forward: other code, other conversion
direction).
"""

from __future__ import annotations

import base64
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from omegaconf import OmegaConf

from shared_paths import REPO_ROOT
from lorasc_tune import families
from lorasc_tune.adapters import merged_state_dict
from lorasc_tune.demo import write_demo_data, write_demo_tokenizer
from recipe_utils import run_recipe, tiny_cfg

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(REPO_ROOT / "recipes"))
import paper_grids  # noqa: E402

VOCAB = 512      # every tiny model's vocabulary (tokenizer ids and specials fit below it)
SPM_VOCAB = 512  # the demo SentencePiece model's size; Phi-3's specials go above it
HF_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
TT_COMMON = dict(embed_dim=64, intermediate_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=256)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama3_rope(factor: float) -> Dict[str, Any]:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


@dataclass
class Family:
    hf_class: str                 # transformers model class (its config class is derived)
    hf_config: Dict[str, Any]     # beyond HF_COMMON
    builder: str                  # torchtune LoRA component builder (tiny dims given here)
    plain: str                    # the same without LoRA, for the independent forward
    tt_args: Dict[str, Any]       # beyond TT_COMMON
    model_type: str               # FullModelHFCheckpointer model_type
    tokenizer: str                # key of _tokenizer_cfg
    lora_output: bool = True      # whether the builder takes apply_lora_to_output
    vocab_size: int = VOCAB
    norm_one: float = 1.0         # the stored norm weight that means "scale by one"


FAMILIES = {
    "llama3_1": Family("LlamaForCausalLM", dict(rms_norm_eps=1e-5, rope_parameters=_llama3_rope(8.0),
                                                tie_word_embeddings=False, **IDS),
                       "torchtune.models.llama3_1.lora_llama3_1", "torchtune.models.llama3_1.llama3_1",
                       dict(rope_base=500000, scale_factor=8, norm_eps=1e-5), "LLAMA3", "llama3"),
    "llama3_2": Family("LlamaForCausalLM", dict(rms_norm_eps=1e-5, rope_parameters=_llama3_rope(32.0),
                                                tie_word_embeddings=True, **IDS),
                       "torchtune.models.llama3_2.lora_llama3_2", "torchtune.models.llama3_2.llama3_2",
                       dict(rope_base=500000, scale_factor=32, norm_eps=1e-5,
                            tie_word_embeddings=True), "LLAMA3_2", "llama3"),
    "qwen2_5": Family("Qwen2ForCausalLM", dict(rms_norm_eps=1e-6, tie_word_embeddings=False, **IDS,
                                               rope_parameters={"rope_type": "default",
                                                                "rope_theta": 1000000.0}),
                      "torchtune.models.qwen2.lora_qwen2", "torchtune.models.qwen2.qwen2",
                      dict(rope_base=1000000.0, norm_eps=1e-6), "QWEN2", "qwen2_5"),
    "mistral": Family("MistralForCausalLM", dict(rms_norm_eps=1e-5, sliding_window=None, **IDS,
                                                 rope_parameters={"rope_type": "default",
                                                                  "rope_theta": 10000.0}),
                      "torchtune.models.mistral.lora_mistral", "torchtune.models.mistral.mistral",
                      dict(rope_base=10000, norm_eps=1e-5), "MISTRAL", "mistral"),
    # Phi-3-mini attends with as many key/value heads as query heads; Phi-4 groups them.
    "phi3": Family("Phi3ForCausalLM", dict(rms_norm_eps=1e-5, num_key_value_heads=4, **IDS),
                   "torchtune.models.phi3.lora_phi3", "torchtune.models.phi3.phi3",
                   dict(norm_eps=1e-5, num_kv_heads=4), "PHI3_MINI", "phi3",
                   vocab_size=SPM_VOCAB + 32),  # Phi-3's special tokens follow the SentencePiece ids
    "phi4": Family("Phi3ForCausalLM", dict(rms_norm_eps=1e-5, **IDS),
                   "torchtune.models.phi3.lora_phi3", "torchtune.models.phi3.phi3",
                   dict(norm_eps=1e-5), "PHI4", "phi4"),
    # Gemma2: head_dim * heads != hidden (as in Gemma-2-2B), a sliding window shorter than the
    # sequences, and small caps so that where the caps apply shows in the logits.
    "gemma2": Family("Gemma2ForCausalLM", dict(rms_norm_eps=1e-6, head_dim=24, query_pre_attn_scalar=24,
                                               sliding_window=48, attn_logit_softcapping=20.0,
                                               final_logit_softcapping=5.0),
                     "lorasc_tune.families.lora_gemma2", "lorasc_tune.families.gemma2",
                     dict(head_dim=24, query_pre_attn_scalar=24, sliding_window_size=48,
                          hidden_capping_value=20.0, final_capping_value=5.0, norm_eps=1e-6),
                     "GEMMA2", "gemma", lora_output=False, norm_one=0.0),  # Gemma scales by 1 + w
}


# ---- tiny checkpoints and tokenizers -------------------------------------------------------


def save_hf_checkpoint(name: str, folder: Path):
    """A tiny random model of family ``name``, saved by transformers; returns it (eval, fp32).
    Weights are spread wide (norms away from one) so that every mapping shows in the logits."""
    fam = FAMILIES[name]
    config_cls = getattr(transformers, fam.hf_class.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=fam.vocab_size, **{**HF_COMMON, **fam.hf_config})
    torch.manual_seed(sorted(FAMILIES).index(name))
    model = getattr(transformers, fam.hf_class)(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.copy_(fam.norm_one + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return model


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies), as
    transformers writes it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _special_tokens_file(folder: Path, name: str, tokens, first_id: int) -> Path:
    """A ``tokenizer.json`` holding only ``added_tokens``, as torchtune's special_tokens_path
    reads it: the family's special tokens, numbered from ``first_id``."""
    path = folder / f"{name}_special_tokens.json"
    path.write_text(json.dumps({"added_tokens": [{"content": t, "id": first_id + i}
                                                 for i, t in enumerate(tokens)]}))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Dict[str, Path]:
    """Instruction data, the demo SentencePiece model, and a byte-level BPE trained on the same
    text, written both as vocab.json + merges.txt (Qwen2.5, Phi-4) and as a tiktoken file
    (Llama-3): 256 byte tokens, then the merges in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from torchtune.models.llama3._tokenizer import SPECIAL_TOKENS as LLAMA3_SPECIALS
    from torchtune.models.phi3._tokenizer import PHI3_SPECIAL_TOKENS
    from torchtune.models.phi4._tokenizer import PHI4_SPECIAL_TOKENS
    from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

    root = tmp_path_factory.mktemp("family_assets")
    data = write_demo_data(str(root), num_examples=32)
    rows = json.loads(data.read_text())
    lines = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    lines += ["Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n\n### Input:\n\n### Response:\n"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    merges = [m.split(" ") if isinstance(m, str) else m
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    b2u = _bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()}
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ranked = sorted(vocab.items(), key=lambda kv: kv[1])
    (root / "tiktoken.model").write_text("".join(
        f"{base64.b64encode(bytes(u2b[c] for c in tok)).decode()} {i}\n" for tok, i in ranked))
    n = len(vocab)
    assert n + len(PHI4_SPECIAL_TOKENS) <= VOCAB
    return {
        "data": data, "spm": write_demo_tokenizer(str(root)), "root": root,
        "llama3_special": _special_tokens_file(root, "llama3", LLAMA3_SPECIALS, n),
        "qwen2_5_special": _special_tokens_file(root, "qwen2_5", QWEN2_5_SPECIAL_TOKENS, n),
        "phi4_special": _special_tokens_file(root, "phi4", PHI4_SPECIAL_TOKENS, n),
        "phi3_special": _special_tokens_file(root, "phi3", PHI3_SPECIAL_TOKENS, SPM_VOCAB),
    }


def tokenizer_cfg(kind: str, assets: Dict[str, Path]) -> Dict[str, Any]:
    """The tokenizer component of family ``kind`` over the tiny stand-in files."""
    root = assets["root"]
    return {
        "llama3": {"_component_": "torchtune.models.llama3.llama3_tokenizer",
                   "path": str(root / "tiktoken.model"),
                   "special_tokens_path": str(assets["llama3_special"])},
        "qwen2_5": {"_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer",
                    "path": str(root / "vocab.json"), "merges_file": str(root / "merges.txt"),
                    "special_tokens_path": str(assets["qwen2_5_special"])},
        "phi4": {"_component_": "torchtune.models.phi4.phi4_tokenizer",
                 "vocab_path": str(root / "vocab.json"), "merges_path": str(root / "merges.txt"),
                 "special_tokens_path": str(assets["phi4_special"])},
        "mistral": {"_component_": "torchtune.models.mistral.mistral_tokenizer",
                    "path": str(assets["spm"])},
        "phi3": {"_component_": "torchtune.models.phi3.phi3_mini_tokenizer",
                 "path": str(assets["spm"]), "special_tokens_path": str(assets["phi3_special"])},
        "gemma": {"_component_": "torchtune.models.gemma.gemma_tokenizer",
                  "path": str(assets["spm"])},
    }[kind] | {"max_seq_len": 256, "prompt_template": None}


def _instantiate(component: str, **kwargs):
    from torchtune import config

    return config.instantiate(OmegaConf.create({"_component_": component, **kwargs}))


# ---- each family through the recipe --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_trains_and_its_export_is_the_hf_model(name, assets, tmp_path):
    fam = FAMILIES[name]
    base = save_hf_checkpoint(name, tmp_path / "base")
    tt_args = {**TT_COMMON, "vocab_size": fam.vocab_size, **fam.tt_args}
    lora = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
            "apply_lora_to_mlp": True, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    if fam.lora_output:
        lora["apply_lora_to_output"] = False
    out = tmp_path / "run"
    cfg = tiny_cfg({"tokenizer": assets["spm"], "data": assets["data"], "ckpt": tmp_path / "base"},
                   out, epochs=2, max_steps_per_epoch=2, save_final_model_only=True)
    cfg.model = OmegaConf.create({"_component_": fam.builder, **lora, **tt_args})
    cfg.tokenizer = OmegaConf.create(tokenizer_cfg(fam.tokenizer, assets))
    cfg.checkpointer.model_type = fam.model_type
    cfg.checkpointer.checkpoint_files = ["model.safetensors"]

    recipe = run_recipe(cfg)
    assert recipe._cascade.engine.expert == 2
    merged = merged_state_dict(recipe._model, recipe._cascade.engine.master_weights())
    plain = _instantiate(fam.plain, **tt_args).eval()
    plain.load_state_dict(merged, strict=True)

    folder = out / "epoch_1"
    hf, info = getattr(transformers, fam.hf_class).from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info

    # Only the adapted projections moved; the norms and embeddings are the checkpoint's own.
    before, after = base.state_dict(), hf.state_dict()
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("proj.weight") for k in moved), sorted(moved)

    ids = torch.randint(3, 300, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = hf.eval()(ids).logits, plain(ids)
        trained_away = (base(ids).logits - want).abs().max()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert trained_away > 1e-3  # the comparison is of a trained model, not the base


# ---- the shipped configs -------------------------------------------------------------------

SHIPPED = {  # config -> (family's tiny tokenizer, model_type, torchtune builder)
    "llama3_1_8b_alpaca.yaml": ("llama3", "LLAMA3", "torchtune.models.llama3_1.lora_llama3_1_8b"),
    "llama3_2_1b_alpaca.yaml": ("llama3", "LLAMA3_2", "torchtune.models.llama3_2.lora_llama3_2_1b"),
    "llama3_2_3b_alpaca.yaml": ("llama3", "LLAMA3_2", "torchtune.models.llama3_2.lora_llama3_2_3b"),
    "qwen2_5_7b_alpaca.yaml": ("qwen2_5", "QWEN2", "torchtune.models.qwen2_5.lora_qwen2_5_7b_base"),
    "mistral_7b_alpaca.yaml": ("mistral", "MISTRAL", "torchtune.models.mistral.lora_mistral_7b"),
    "phi3_mini_alpaca.yaml": ("phi3", "PHI3_MINI", "torchtune.models.phi3.lora_phi3_mini"),
    "gemma2_2b_alpaca.yaml": ("gemma", "GEMMA2", "lorasc_tune.families.lora_gemma2_2b"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_is_the_papers_alpaca_setting_on_its_family(name, assets):
    from torchtune import config
    from torchtune.modules.peft import get_adapter_params

    from lorasc_tune.config import LoRASCConfig

    cfg = OmegaConf.load(REPO_ROOT / "configs" / name)
    reference = OmegaConf.load(REPO_ROOT / "configs" / "llama2_7b_alpaca.yaml")
    kind, model_type, builder = SHIPPED[name]
    # §4.2.1: batch 128, 3 epochs, lr from the Alpaca grid; the same lorasc block and LoRA as
    # the Llama-2-7B config.
    assert cfg.batch_size * cfg.gradient_accumulation_steps == paper_grids.ALPACA_BATCH_SIZE
    assert cfg.epochs == paper_grids.ALPACA_EPOCHS
    assert cfg.optimizer.lr in paper_grids.ALPACA_LRS
    shared = set(cfg.lorasc) & set(reference.lorasc)
    assert {"cascade", "steps_per_expert", "slow_alpha", "noise_lambda", "schedule"} <= shared
    assert all(cfg.lorasc[k] == reference.lorasc[k] for k in shared), name
    LoRASCConfig.from_config(cfg.lorasc)
    for key in ("lora_attn_modules", "lora_rank", "lora_alpha", "lora_dropout", "use_dora"):
        assert cfg.model[key] == reference.model[key], key
    assert cfg.model._component_ == builder
    assert cfg.checkpointer.model_type == model_type
    assert cfg.tokenizer.prompt_template is None

    # The model section builds (on the meta device: no memory), LoRA on q and v only.
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    adapted = {k.rsplit(".", 2)[0] for k in get_adapter_params(model)}
    assert adapted and all(k.endswith(("q_proj", "v_proj")) for k in adapted)
    if kind == "gemma":  # Gemma-2's caps, on the attention scores and on the logits
        assert model.layers[0].attn.softcapping == 50.0
        assert model.output.capping_value == 30.0

    # The tokenizer section builds over the family's stand-in files; an Alpaca row carries the
    # plain Alpaca prompt (no [INST] template).
    tok_cfg = OmegaConf.merge(cfg.tokenizer, {k: v for k, v in tokenizer_cfg(kind, assets).items()
                                              if k != "_component_" and k != "prompt_template"})
    assert tok_cfg._component_ == tokenizer_cfg(kind, assets)["_component_"]
    tokenizer = config.instantiate(tok_cfg)
    data = config.instantiate(cfg.dataset, tokenizer, source="json", split="train",
                              data_files=str(assets["data"]))
    specials = set(getattr(tokenizer, "special_tokens", {}).values())
    text = tokenizer.decode([i for i in data[0]["tokens"] if i not in specials])
    assert "Below is an instruction that describes a task" in text
    assert "[INST]" not in text


# ---- Gemma2 --------------------------------------------------------------------------------


def _gemma2_logits(builder, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from torchtune.training import FullModelHFCheckpointer

    state = FullModelHFCheckpointer(checkpoint_dir=str(folder), checkpoint_files=["model.safetensors"],
                                    model_type="GEMMA2", output_dir=str(folder.parent / "out")
                                    ).load_checkpoint()["model"]
    model = builder(**{**TT_COMMON, "vocab_size": VOCAB, **FAMILIES["gemma2"].tt_args}).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(ids)


def test_gemma2_needs_each_correction(tmp_path, monkeypatch):
    """torchtune 0.6.1's Gemma2, as it stands, is not the HF model; with the corrected norm
    mapping and the cap on the logits it is, to 1e-5."""
    from torchtune.models.gemma2 import _convert_weights
    from torchtune.models.gemma2 import gemma2 as stock_gemma2

    hf = save_hf_checkpoint("gemma2", tmp_path / "ckpt")
    ids = torch.randint(3, 300, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    families.fix_gemma2_conversion()
    torch.testing.assert_close(_gemma2_logits(families.gemma2, tmp_path / "ckpt", ids), want,
                               atol=1e-5, rtol=1e-5)
    # The cap on the normalised hidden state instead of the logits:
    assert (_gemma2_logits(stock_gemma2, tmp_path / "ckpt", ids) - want).abs().max() > 1e-2
    # torchtune's own mapping of the feed-forward norms (restored for this test only):
    mapping = _convert_weights._GEMMA2_FROM_HF
    pre, post = families._HF_PRE_FF, families._HF_POST_FF
    monkeypatch.setitem(mapping, pre, "layers.{}.mlp_scale.scale")  # as torchtune 0.6.1
    monkeypatch.setitem(mapping, post, "layers.{}.mlp_norm.scale")  # ships it
    assert (_gemma2_logits(families.gemma2, tmp_path / "ckpt", ids) - want).abs().max() > 1e-2
    assert families.fix_gemma2_conversion() is True
    assert families.fix_gemma2_conversion() is False  # idempotent
    assert mapping[pre] == "layers.{}.mlp_norm.scale" and mapping[post] == "layers.{}.mlp_scale.scale"


def test_gemma2_with_torchtunes_builder_warns_once(monkeypatch):
    monkeypatch.setattr(families, "_warned", False)
    stock = OmegaConf.create({"checkpointer": {"model_type": "GEMMA2"},
                              "model": {"_component_": "torchtune.models.gemma2.lora_gemma2_2b"}})
    with pytest.warns(UserWarning, match="lorasc_tune.families.lora_gemma2_2b"):
        families.prepare_checkpoint_conversion(stock)
    ours = OmegaConf.create({"checkpointer": {"model_type": "GEMMA2"},
                             "model": {"_component_": "lorasc_tune.families.lora_gemma2_2b"}})
    other = OmegaConf.create({"checkpointer": {"model_type": "LLAMA3"},
                              "model": {"_component_": "torchtune.models.gemma2.lora_gemma2_2b"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        families.prepare_checkpoint_conversion(stock)  # once only
        monkeypatch.setattr(families, "_warned", False)
        families.prepare_checkpoint_conversion(ours)
        families.prepare_checkpoint_conversion(other)
