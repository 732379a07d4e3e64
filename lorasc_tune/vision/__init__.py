"""LoRASC for CLIP image towers: model builders, weight conversion, data, robustness evaluation.

See ``lorasc_tune/vision/README.md`` for the commands; the recipe is
``lorasc_tune/recipes/lorasc_clip_imagenet.py``.
"""

from lorasc_tune.vision.model import (
    BIGG14_ARCH,
    BIGG14_NUM_PARAMS,
    CLIPImageClassifier,
    VisionArch,
    build_classifier,
    clip_classifier,
    clip_vision_lora,
    clip_vit_bigg14,
    clip_vit_bigg14_classifier,
    init_head,
)

__all__ = [
    "BIGG14_ARCH",
    "BIGG14_NUM_PARAMS",
    "CLIPImageClassifier",
    "VisionArch",
    "build_classifier",
    "clip_classifier",
    "clip_vision_lora",
    "clip_vit_bigg14",
    "clip_vit_bigg14_classifier",
    "init_head",
]
