"""Exported epoch folders as other tools take them: complete Hugging Face folders."""

from __future__ import annotations

import pytest
import torch

import lorasc_tune.recipe_common as common


def test_the_demos_epoch_folders_load_in_transformers_as_they_are(tmp_path):
    """A demo epoch folder is a complete Hugging Face folder: AutoTokenizer gives torchtune's
    ids, AutoModelForCausalLM gives torchtune's logits (the export of the base model here)."""
    transformers = pytest.importorskip("transformers")
    from torchtune.models.llama2 import llama2

    from lorasc_tune.demo import DEMO_MODEL_ARGS, demo_checkpointer, demo_tokenizer

    cache = tmp_path / "cache"
    checkpointer = demo_checkpointer(str(tmp_path / "out"), cache_dir=str(cache))
    state = checkpointer.load_checkpoint()["model"]
    folder = common.save_with_checkpointer(checkpointer, state, tmp_path / "out", 0)
    for name in ("config.json", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json"):
        assert (folder / name).is_file(), name

    text = "Reverse the order of the words: orange river light garden"
    ours = demo_tokenizer(str(cache)).encode(text, add_eos=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok(text)["input_ids"] == ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tt = llama2(**DEMO_MODEL_ARGS)
    tt.load_state_dict(state)
    ids = torch.tensor([ours])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, tt.eval()(ids), atol=1e-5, rtol=1e-5)
    assert hf.generation_config.eos_token_id == 2


def test_stock_lm_eval_hf_scores_a_demo_epoch_folder_as_the_lorasc_model_does(tmp_path):
    """`lm_eval --model hf --model_args pretrained=<epoch folder>,add_bos_token=True` on the
    folder as exported: the same loglikelihoods as our `lorasc` model (BOS first, as the
    recipes trained)."""
    pytest.importorskip("accelerate")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evals.lm_adapter import LoraScLM
    from lorasc_tune.demo import demo_checkpointer

    checkpointer = demo_checkpointer(str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    folder = common.save_with_checkpointer(checkpointer, checkpointer.load_checkpoint()["model"],
                                           tmp_path / "out", 0)
    pairs = [("Add the two numbers: 46 and 4.", " 50"), ("Reverse the words: orange river",
                                                        " river orange"),
             ("Name a colour.", " green"), ("Name a colour.", " yellow pencil")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                for i, p in enumerate(pairs)]
    stock = HFLM(pretrained=str(folder), add_bos_token=True, device="cpu", batch_size=2)
    ours = LoraScLM(checkpoint_dir=str(folder), tokenizer_path=str(folder / "tokenizer.model"),
                    device="cpu", dtype="fp32", batch_size=2)
    got = [score for score, _ in stock.loglikelihood(requests)]
    want = [score for score, _ in ours.loglikelihood(requests)]
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(round(w, 3) for w in want)) == len(want)  # distinct scores: not vacuous
