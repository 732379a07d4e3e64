"""The vision recipe's setup() refuses a bad ``eval.sets`` before it builds or writes anything.

``eval.sets`` is only read after the last epoch, so without this check a typo there would cost
a whole training run. Each case runs setup() in-process on the ants-vs-bees config and expects
an error naming the set, and no output folder.
"""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorasc_tune.recipes.lorasc_clip_imagenet import LoRASCClipImageNetRecipe

REPO = Path(__file__).resolve().parents[2]


def _cfg(data: Path, out: Path, sets: dict, index_dir=None):
    cfg = OmegaConf.load(REPO / "configs" / "clip_tiny_hymenoptera.yaml")
    cfg.output_dir = str(out)
    cfg.data.root = str(data)
    cfg.data.num_workers = 0
    # merge=False: replace the config's own `folder` set instead of adding to it.
    OmegaConf.update(cfg, "eval.sets", {k: str(v) for k, v in sets.items()}, merge=False)
    OmegaConf.update(cfg, "eval.imagenet_index", None if index_dir is None else str(index_dir))
    return cfg


def _setup(cfg):
    recipe = LoRASCClipImageNetRecipe(cfg)
    recipe.setup(cfg)
    return recipe


def _partial_index(tmp_path: Path, shared: Path) -> Path:
    """An index folder with the 1k class list but no IN-R/IN-A lists."""
    folder = tmp_path / "partial_index"
    folder.mkdir()
    name = "imagenet_class_index.json"
    (folder / name).write_bytes((shared / name).read_bytes())
    return folder


# (sets, index: None = shared, "empty" = an empty folder, "partial" = no IN-R/IN-A lists,
#  exception, message). "VAL" stands for the real val folder, "NOWHERE" for a missing one.
BAD_SETS = [
    ({"imagenet_x": "VAL"}, None, ValueError,
     r"unknown evaluation set 'eval\.sets\.imagenet_x'; kinds are imagenet_val"),
    ({"folder": "NOWHERE"}, None, FileNotFoundError,
     r"evaluation set 'eval\.sets\.folder': folder not found: .*nowhere"),
    # A good set first: every entry is checked, not only the first.
    ({"folder": "VAL", "folder:extra": "NOWHERE"}, None, FileNotFoundError,
     r"'eval\.sets\.folder:extra': folder not found"),
    ({"imagenet_r": "VAL"}, "empty", FileNotFoundError,
     r"'eval\.sets\.imagenet_r': ImageNet class index not found"),
    ({"imagenet_a": "VAL"}, "partial", FileNotFoundError,
     r"'eval\.sets\.imagenet_a': no class list for imagenet_a"),
    # The index is fine but the ants/bees head has no logits for IN-R's classes.
    ({"imagenet_r": "VAL"}, None, ValueError,
     r"'eval\.sets\.imagenet_r': imagenet_r: the classifier head has no logit .* ImageNet-1k head"),
]


@pytest.mark.parametrize("sets,index,exc,match", BAD_SETS)
def test_bad_eval_set_fails_in_setup_and_writes_nothing(tmp_path, shared_data, sets, index,
                                                        exc, match):
    data = shared_data("hymenoptera_data")
    shared_index = shared_data("imagenet_index")
    paths = {"VAL": data / "val", "NOWHERE": tmp_path / "nowhere"}
    index_dir = None
    if index == "empty":
        index_dir = tmp_path / "empty_index"
        index_dir.mkdir()
    elif index == "partial":
        index_dir = _partial_index(tmp_path, shared_index)
    out = tmp_path / "run"
    cfg = _cfg(data, out, {k: paths[v] for k, v in sets.items()}, index_dir)
    with pytest.raises(exc, match=match):
        _setup(cfg)
    assert not out.exists()


def test_good_eval_sets_pass_setup(tmp_path, shared_data):
    """The check accepts what evaluate() can score (so it cannot pass the tests above by
    refusing everything)."""
    data = shared_data("hymenoptera_data")
    out = tmp_path / "run"
    recipe = _setup(_cfg(data, out, {"folder": data / "val", "folder:train": data / "train"}))
    recipe.cleanup()
