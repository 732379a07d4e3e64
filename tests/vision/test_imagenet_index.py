"""IN-R / IN-A masking against the shared wnid lists."""

import json

import pytest
import torch

from lorasc_tune.vision.imagenet_index import ImageNetIndex, keep_indices, masked_argmax


@pytest.fixture
def index(shared_data):
    return ImageNetIndex.load(shared_data("imagenet_index"))


@pytest.mark.parametrize("subset", ["imagenet_r", "imagenet_a"])
def test_masking_maps_each_wnid_to_its_logit(index, shared_data, subset):
    folder = shared_data("imagenet_index")
    stem = subset
    wnids = (folder / f"{stem}_wnids.txt").read_text().split()
    raw = json.loads((folder / "imagenet_class_index.json").read_text())
    wnid_to_1k = {v[0]: int(k) for k, v in raw.items()}
    keep = keep_indices(index, subset, index.wnids)
    assert len(keep) == len(set(keep)) == 200
    assert keep == [wnid_to_1k[w] for w in wnids]

    outside = sorted(set(range(1000)) - set(keep))
    for w in wnids[::37]:
        target = wnid_to_1k[w]
        logits = torch.zeros(1, 1000)
        logits[0, target] = 5.0
        logits[0, outside[0]] = 50.0  # a bigger logit outside the subset must be ignored
        assert masked_argmax(logits, keep).item() == target
        assert masked_argmax(logits).item() == outside[0]


def test_head_in_another_order_is_looked_up_by_wnid(index):
    shuffled = list(reversed(index.wnids))
    keep = keep_indices(index, "imagenet_r", shuffled)
    assert [shuffled[i] for i in keep] == [index.wnids[i] for i in index.subsets["imagenet_r"]]
    with pytest.raises(ValueError, match="ImageNet-1k head"):
        keep_indices(index, "imagenet_a", ["ants", "bees"])


def test_inconsistent_lists_fail_loudly(tmp_path, shared_data):
    src = shared_data("imagenet_index")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    idx = (tmp_path / "imagenet_r_indices_in_1k.txt").read_text().split()
    idx[0], idx[1] = idx[1], idx[0]
    (tmp_path / "imagenet_r_indices_in_1k.txt").write_text("\n".join(idx))
    with pytest.raises(ValueError, match="does not match"):
        ImageNetIndex.load(tmp_path)
