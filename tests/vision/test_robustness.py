"""Folder layouts of the robustness sets, scored with a stub model whose answer is known."""


import pytest
import torch
from torch import nn

from lorasc_tune.vision.data import eval_transform
from lorasc_tune.vision.imagenet_index import ImageNetIndex
from lorasc_tune.vision.robustness import check_eval_sets, evaluate_sets, format_table


class Always(nn.Module):
    """Logit 50 for class 0 (not in IN-R), 5 for class 1 (in IN-R), 0 elsewhere."""

    def forward(self, images):
        logits = torch.zeros(images.shape[0], 1000)
        logits[:, 0], logits[:, 1] = 50.0, 5.0
        return logits


@pytest.fixture
def layout(tmp_path, shared_data):
    jpgs = sorted(shared_data("hymenoptera_data", "val", "ants").iterdir())
    idx = ImageNetIndex.load(shared_data("imagenet_index"))
    w0, w1, w2 = idx.wnids[0], idx.wnids[1], idx.wnids[2]
    files = iter(jpgs)

    def put(folder, n):
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            f = next(files)
            (folder / f.name).write_bytes(f.read_bytes())

    put(tmp_path / "inval" / "val" / w0, 2)  # torchvision layout: root/val/<wnid>
    put(tmp_path / "inval" / "val" / w1, 2)
    put(tmp_path / "v2" / "0", 1)  # IN-V2: folders named by 1k index
    put(tmp_path / "v2" / "1", 1)
    put(tmp_path / "r" / w1, 2)
    put(tmp_path / "r" / w2, 1)
    put(tmp_path / "c" / "gaussian_noise" / "1" / w0, 1)
    put(tmp_path / "c" / "gaussian_noise" / "2" / w1, 1)
    put(tmp_path / "c" / "zoom_blur" / "1" / w0, 1)
    put(tmp_path / "c" / "zoom_blur" / "3" / w0, 1)
    put(tmp_path / "odd" / "not_a_class", 1)
    return tmp_path, idx


def test_each_layout_is_scored_as_specified(layout, shared_data):
    root, idx = layout
    sets = {"imagenet_val": root / "inval", "imagenet_v2": root / "v2",
            "imagenet_r": root / "r", "imagenet_c": root / "c"}
    res = evaluate_sets(Always(), sets, idx.wnids, eval_transform(28), torch.device("cpu"),
                        batch_size=4, num_workers=0,
                        index_dir=str(shared_data("imagenet_index")))
    assert res["imagenet_val"] == {"top1": 50.0, "n": 4}
    assert res["imagenet_v2"] == {"top1": 50.0, "n": 2}
    # masked to IN-R's 200 classes, class 1 wins over the bigger logit of class 0
    assert res["imagenet_r"]["top1"] == pytest.approx(200 / 3) and res["imagenet_r"]["n"] == 3
    c = res["imagenet_c"]
    assert c["per_severity"] == {"gaussian_noise": {"1": 100.0, "2": 0.0},
                                 "zoom_blur": {"1": 100.0, "3": 100.0}}
    assert c["per_corruption"] == {"gaussian_noise": 50.0, "zoom_blur": 100.0}
    assert c["top1"] == 75.0 and c["n"] == 4
    table = format_table(res)
    assert "| imagenet_c (mean) | 75.00 | 4 |" in table and "imagenet_c/zoom_blur | 100.00" in table


def test_unknown_class_folder_and_set_are_named(layout):
    root, idx = layout
    with pytest.raises(ValueError, match="not_a_class"):
        evaluate_sets(Always(), {"imagenet_sketch": root / "odd"}, idx.wnids, eval_transform(28),
                      torch.device("cpu"), num_workers=0)
    with pytest.raises(ValueError, match="unknown evaluation set 'imagenet_x'"):
        evaluate_sets(Always(), {"imagenet_x": root / "odd"}, idx.wnids, eval_transform(28),
                      torch.device("cpu"), num_workers=0)


class NeverScore(nn.Module):
    """Fails the test if any image is scored: the checks must all come first."""

    def forward(self, images):
        raise AssertionError("a set was scored before every set was checked")


def test_every_set_is_checked_before_any_is_scored(layout, shared_data):
    root, idx = layout
    index_dir = str(shared_data("imagenet_index"))
    keeps = check_eval_sets({"imagenet_val": root / "inval", "imagenet_r": root / "r"},
                            idx.wnids, index_dir)
    assert keeps == {"imagenet_r": idx.subsets["imagenet_r"]}  # 1k head: the 1k indices
    # The bad set comes last; the good one before it must not be scored first.
    for bad, exc, match in [
        ({"imagenet_x": root / "odd"}, ValueError, "unknown evaluation set 'imagenet_x'"),
        ({"imagenet_sketch": root / "missing"}, FileNotFoundError,
         r"evaluation set 'imagenet_sketch': folder not found: .*missing"),
        ({"imagenet_a": root / "r"}, FileNotFoundError,
         r"evaluation set 'imagenet_a': ImageNet class index not found"),
    ]:
        with pytest.raises(exc, match=match):
            evaluate_sets(NeverScore(), {"imagenet_val": root / "inval", **bad}, idx.wnids,
                          eval_transform(28), torch.device("cpu"), num_workers=0,
                          index_dir=str(root / "no_index_here"))
