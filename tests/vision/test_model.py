"""The towers: bigG's exact size (meta device), biases kept under LoRA/DoRA, clear errors."""

import pytest
import torch
from torch import nn
from torchtune.modules.peft import DoRALinear, LoRALinear

from lorasc_tune.vision.memory import estimate_peak_memory
from lorasc_tune.vision.model import (
    BIGG14_ARCH,
    BIGG14_NUM_PARAMS,
    VisionArch,
    build_classifier,
    clip_vision_lora,
    clip_vit_bigg14,
    clip_vit_bigg14_classifier,
    count_params,
    init_head,
)
from vision_helpers import TINY


def test_bigg14_has_exactly_the_published_parameter_count():
    with torch.device("meta"):
        plain = clip_vit_bigg14(lora_modules=())
        lora = clip_vit_bigg14(lora_rank=16)
    assert count_params(plain) == (BIGG14_NUM_PARAMS, 0)
    base, adapter = count_params(lora)
    assert base == 1_844_907_264
    assert adapter == 48 * 2 * 16 * (1664 + 1664)  # A [16, 1664] and B [1664, 16] on q and v
    block = plain.layers[0]
    assert block.mlp.w1.weight.shape == (8192, 1664)
    assert plain.cls_projection.weight.shape == (1664, 1280)
    assert isinstance(block.mlp.activation, nn.GELU) and block.mlp.activation.approximate == "none"


def test_bigg14_memory_estimate_is_printed_scale():
    with torch.device("meta"):
        model = clip_vit_bigg14_classifier(1000)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n or n.startswith("head."))
    arch = VisionArch(**BIGG14_ARCH)
    ckpt = estimate_peak_memory(model, arch, 64, 2, activation_checkpointing=True)
    full = estimate_peak_memory(model, arch, 64, 2, activation_checkpointing=False)
    assert 3.4e9 < ckpt.weights < 3.8e9  # 1.85 B parameters in bf16
    assert ckpt.total < full.total
    assert "GiB" in ckpt.describe()


@pytest.mark.parametrize("cls, use_dora", [(LoRALinear, False), (DoRALinear, True)])
def test_adapters_on_q_and_v_keep_their_biases(cls, use_dora):
    tower = clip_vision_lora(**TINY, use_dora=use_dora)
    attn = tower.layers[0].attn
    for name in ("q_proj", "v_proj"):
        proj = getattr(attn, name)
        assert isinstance(proj, cls) and proj.bias is not None and proj.bias.shape == (32,)
    assert type(attn.k_proj) is nn.Linear and attn.k_proj.bias is not None


def test_classifier_shapes_and_head_init(tmp_path):
    model = build_classifier(VisionArch(**TINY), num_classes=5)
    init_head(model.head, "zeros")
    logits = model(torch.randn(2, 3, 28, 28))
    assert logits.shape == (2, 5) and torch.count_nonzero(logits) == 0
    torch.save({"weight": torch.ones(5, 16)}, tmp_path / "h.pt")
    init_head(model.head, "file", str(tmp_path / "h.pt"))
    assert torch.all(model.head.weight == 1) and torch.all(model.head.bias == 0)
    torch.save({"weight": torch.ones(4, 16)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\(5, 16\)"):
        init_head(model.head, "file", str(tmp_path / "bad.pt"))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown \\['fc1'\\]"):
        clip_vision_lora(**TINY, lora_modules=("q_proj", "fc1"))
    with pytest.raises(ValueError, match="not a multiple"):
        clip_vision_lora(**{**TINY, "image_size": 30})
    with pytest.raises(ValueError, match="quick_gelu"):
        clip_vision_lora(**TINY, activation="relu")
