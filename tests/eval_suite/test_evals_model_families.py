"""The ``lorasc`` model builds each family from a checkpoint saved by transformers (Llama-2, Llama-3
with rope_theta 500000 and llama3 RoPE scaling, Llama-3.2 with tied embeddings, Qwen2.5, Mistral,
Phi-3) and scores exactly as transformers does; settings it cannot build are refused by name."""

from __future__ import annotations

import json
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE)),
    "llama3_2_tied": ("LlamaConfig", "LlamaForCausalLM",
                      dict(rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "qwen2_5": ("Qwen2Config", "Qwen2ForCausalLM",
                dict(rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(head_dim=16, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(head_dim=8, sliding_window=24)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def _save_checkpoint(family: str, path):
    """A tiny random model of ``family`` saved by transformers (weights spread wide so scores differ)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(sorted(FAMILIES).index(family))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
    model.save_pretrained(path)
    return model


def _requests(max_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    lengths = [(5, 1), (17, 3), (2, 6), (max_len - 4, 4), (30, 2), (max_len + 9, 2)]  # last: truncated
    return [(ids(c), ids(k)) for c, k in lengths]


def _hf_scores(model, requests, max_length):
    """Reference: transformers' forward on each request alone, left-truncated like lm-eval's HF model."""
    out = []
    with torch.no_grad():
        for ctx, cont in requests:
            inp = (ctx + cont)[-(max_length + 1):][:-1]
            logprobs = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
            rows = logprobs[len(inp) - len(cont):]
            out.append(float(rows.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loglikelihoods_equal_transformers(family, tmp_path):
    from evals.model_loading import load_model
    from evals.scoring import score_requests

    hf_model = _save_checkpoint(family, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    model = load_model(tmp_path)
    spec = model.spec
    rope = saved.get("rope_parameters") or {}
    assert spec.rope_base == float(rope.get("rope_theta", saved.get("rope_theta", 10000.0)))
    if family.startswith("llama3"):
        assert spec.rope_base == 500000.0 and spec.rope_scaling["scale_factor"] == 8.0
    assert spec.tie_word_embeddings == bool(saved.get("tie_word_embeddings", False))
    window = saved.get("sliding_window")
    assert model.max_seq_len == (min(window, 128) if window else 128)
    requests = _requests(model.max_seq_len)
    got = score_requests(model, requests, max_length=model.max_seq_len, batch_size=3)
    want = _hf_scores(hf_model, requests, model.max_seq_len)
    for (logprob, _), ref in zip(got, want):
        assert logprob == pytest.approx(ref, abs=1e-4)


def test_adapter_builds_from_checkpoint(tmp_path):
    """Through the lm-eval model class: the same numbers as transformers for a Llama-3 checkpoint."""
    from evals.lm_adapter import LoraScLM

    hf_model = _save_checkpoint("llama3", tmp_path / "ckpt")

    class Ids:  # the adapter needs a tokenizer object; requests here are token ids already
        bos_id, eos_id, pad_id, stop_tokens = 1, 2, 0, [2]

    lm = LoraScLM(checkpoint_dir=str(tmp_path / "ckpt"), tokenizer=Ids(), device="cpu", dtype="fp32", batch_size=2)
    requests = _requests(lm.max_length, seed=1)
    got = lm._loglikelihood_tokens([(None, c, k) for c, k in requests])
    for (logprob, _), ref in zip(got, _hf_scores(hf_model, requests, lm.max_length)):
        assert logprob == pytest.approx(ref, abs=1e-4)


BASE = {"model_type": "llama", **COMMON, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("change, named", [
    ({"model_type": "gemma"}, "model_type='gemma'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling: rope_type='linear'"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
    ({"model_type": "qwen2", "rope_parameters": dict(LLAMA3_ROPE)}, "rope_type='llama3' on model_type='qwen2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
])
def test_unbuildable_settings_are_refused_by_name(change, named):
    from evals.model_loading import UnsupportedConfigError, decoder_spec

    with pytest.raises(UnsupportedConfigError) as err:
        decoder_spec({**BASE, **change})
    assert named in str(err.value)


def test_sliding_window_caps_context_and_refuses_longer():
    from evals.model_loading import UnsupportedConfigError, decoder_spec

    config = {**BASE, "model_type": "mistral", "sliding_window": 64}
    assert decoder_spec(config).max_seq_len == 64
    assert decoder_spec(config, max_seq_len=48).max_seq_len == 48
    with pytest.raises(UnsupportedConfigError, match="sliding_window=64"):
        decoder_spec(config, max_seq_len=100)


def test_transformers4_style_rope_keys_are_read():
    """Older configs: rope_theta at the top level and rope_scaling for Llama-3.1."""
    from evals.model_loading import decoder_spec

    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    spec = decoder_spec({**{k: v for k, v in BASE.items() if k != "rope_parameters"},
                         "rope_theta": 500000.0, "rope_scaling": scaling})
    assert spec.rope_base == 500000.0
    assert spec.rope_scaling == {"scale_factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "old_context_len": 32}


def test_every_problem_is_listed():
    from evals.model_loading import unsupported_settings

    problems = unsupported_settings({**BASE, "mlp_bias": True, "hidden_act": "relu"})
    assert len(problems) == 2
    assert any(p.startswith("mlp_bias=") for p in problems) and any(p.startswith("hidden_act=") for p in problems)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies), as
    transformers writes it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def test_tokenizer_follows_the_checkpoint_family(tmp_path, shared_data):
    """Llama-3's tiktoken file, Qwen2.5's vocab.json + merges.txt (tiny byte-level stand-ins written
    here), Mistral's and Phi-3's SentencePiece model (the shared Llama-2 file stands in)."""
    import base64

    from evals.model_loading import load_tokenizer

    text = "Answer: 12 apples!"
    tiktoken_file = tmp_path / "tokenizer.model"
    tiktoken_file.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    (tmp_path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(_bytes_to_unicode().values())}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    spm = shared_data("llama2_tokenizer", "tokenizer.model")
    cases = {"llama": (tiktoken_file, "Llama3Tokenizer"), "qwen2": (tmp_path, "Qwen2_5Tokenizer"),
             "mistral": (spm, "MistralTokenizer"), "phi3": (spm, "Phi3MiniTokenizer")}
    for model_type, (path, cls) in cases.items():
        tok = load_tokenizer(path, model_type=model_type)
        assert type(tok).__name__ == cls
        assert tok.decode(tok.encode(text, add_bos=False, add_eos=False)) == text
    assert type(load_tokenizer(spm)).__name__ == "Llama2Tokenizer"  # Llama-2's SentencePiece file
    # Llama-3's byte tokens: one id per byte of the text, BOS first.
    ids = load_tokenizer(tiktoken_file).encode(text, add_bos=True, add_eos=False)
    assert ids[1:] == list(text.encode())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "elsewhere" / "vocab.json", model_type="qwen2")


@pytest.mark.parametrize("family", ["llama3_2_tied", "qwen2_5", "phi3"])
def test_greedy_generation_equals_transformers(family, tmp_path):
    """Generation (KV cache, a batch with left padding) continues as transformers' greedy decoding."""
    from evals.decoding import greedy_generate
    from evals.model_loading import load_model

    hf_model = _save_checkpoint(family, tmp_path)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 4)]
    ours = greedy_generate(model, prompts, max_new_tokens=6, pad_id=0, use_cache=True)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
