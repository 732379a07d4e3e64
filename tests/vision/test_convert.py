"""Converter parity with the reference implementations, and exact round trips.

Reference models (open_clip_torch, transformers) are test-only dependencies; they are built
small and random, never downloaded.
"""

import pytest
import torch
from torch import nn

from lorasc_tune.adapters import merged_state_dict
from lorasc_tune.vision.convert import (
    detect_layout,
    export_vision,
    import_vision,
    read_checkpoint,
    save_like_source,
)
from lorasc_tune.vision.model import clip_vision_lora
from vision_helpers import TINY, randomize_

open_clip_transformer = pytest.importorskip("open_clip.transformer")
transformers = pytest.importorskip("transformers")


def _ours(output_dim=TINY["output_dim"], **kw):
    return clip_vision_lora(**{**TINY, "output_dim": output_dim, **kw}).eval()


def _embed(model, x):
    out, _ = model(x[:, None, None])
    return out[:, 0, 0, 0]


def _open_clip_tower(act=nn.GELU):
    return randomize_(open_clip_transformer.VisionTransformer(
        image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp_ratio=2.0,
        output_dim=16, act_layer=act)).eval()


def _hf_config(**kw):
    return transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=16, hidden_act="gelu", **kw)


def _load(model, ours):
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected
    assert all(".lora_" in k or k.endswith("magnitude") for k in missing)


@pytest.mark.parametrize("use_dora", [False, True])
def test_open_clip_parity(use_dora):
    ref = _open_clip_tower()
    ours, layout = import_vision({f"visual.{k}": v for k, v in ref.state_dict().items()})
    assert layout.kind == "open_clip" and layout.prefix == "visual."
    model = _ours(use_dora=use_dora)
    _load(model, ours)
    if use_dora:
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_embed(model, x), ref(x), atol=1e-5, rtol=0)


def test_open_clip_quick_gelu_parity():
    from open_clip.transformer import QuickGELU

    ref = _open_clip_tower(act=QuickGELU)
    ours, _ = import_vision(ref.state_dict())  # bare tower, no "visual." prefix
    model = _ours(activation="quick_gelu")
    _load(model, ours)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_embed(model, x), ref(x), atol=1e-5, rtol=0)


def test_hf_parity_with_and_without_projection():
    x = torch.randn(3, 3, 28, 28)
    ref = randomize_(transformers.CLIPVisionModelWithProjection(_hf_config())).eval()
    ours, layout = import_vision(ref.state_dict())
    assert layout.kind == "hf"
    model = _ours()
    _load(model, ours)
    with torch.no_grad():
        torch.testing.assert_close(_embed(model, x), ref(pixel_values=x).image_embeds,
                                   atol=1e-5, rtol=0)

    # CLIPVisionModel has no projection: the embedding is the post-LayerNorm class token.
    ref = randomize_(transformers.CLIPVisionModel(_hf_config()), seed=1).eval()
    ours, _ = import_vision(ref.state_dict())
    model = _ours(output_dim=None)
    _load(model, ours)
    with torch.no_grad():
        ours_cls = model(x[:, None, None])[0][:, 0, 0, 0]
        torch.testing.assert_close(ours_cls, ref(pixel_values=x).pooler_output, atol=1e-5, rtol=0)


def _assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_round_trip_open_clip_full_model_file(tmp_path):
    """A whole OpenCLIP CLIP (text tower included) read, imported, exported: bit-identical."""
    open_clip_model = pytest.importorskip("open_clip.model")
    clip = open_clip_model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=2, head_width=8,
                        mlp_ratio=2.0),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1))
    src = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(randomize_(clip).state_dict(), src)

    full, files = read_checkpoint(src)
    ours, layout = import_vision(full)
    _assert_same(export_vision(ours, layout, full), full)
    save_like_source(ours, layout, files, tmp_path / "out")
    _assert_same(torch.load(tmp_path / "out" / src.name, weights_only=True), full)


def test_round_trip_hf_sharded_folder(tmp_path):
    """An HF CLIPModel folder with two safetensors shards comes back with the same files."""
    cfg = transformers.CLIPConfig(
        vision_config=_hf_config().to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=50, max_position_embeddings=8),
        projection_dim=16)
    model = randomize_(transformers.CLIPModel(cfg))
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()

    full, files = read_checkpoint(src)
    assert len(files.shards) > 1
    ours, layout = import_vision(full)
    out = tmp_path / "out"
    save_like_source(ours, layout, files, out)
    again, _ = read_checkpoint(out)
    _assert_same({k: again[k] for k in full}, full)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    # transformers itself loads the exported folder
    transformers.CLIPModel.from_pretrained(out)


def test_merged_lora_export_matches_adapted_model():
    """Export after training = the adapted model's function, in OpenCLIP's fused layout."""
    ref = _open_clip_tower()
    ours, layout = import_vision(ref.state_dict())
    model = _ours(use_dora=True, lora_rank=4)
    _load(model, ours)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or name.endswith("magnitude"):
                p.add_(0.1 * torch.randn_like(p))
    exported = export_vision(merged_state_dict(model), layout, ref.state_dict())
    ref.load_state_dict(exported)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), _embed(model, x), atol=1e-5, rtol=0)


def test_unknown_layout_and_unsupported_keys_are_named():
    with pytest.raises(ValueError, match="neither an OpenCLIP"):
        detect_layout(["foo.weight"])
    sd = {f"visual.{k}": v for k, v in _open_clip_tower().state_dict().items()}
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    with pytest.raises(KeyError, match="ls_1.gamma"):
        import_vision(sd)
