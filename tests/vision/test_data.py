"""Datasets on real folders: a GIF, a file name with a space, an undecodable file."""

import logging

import pytest
import torch

from lorasc_tune.vision.data import (
    BadImageError,
    build_dataset,
    build_loader,
    eval_transform,
    image_folder,
    load_rgb,
    train_transform,
)


def test_real_hymenoptera_folder_with_odd_files(shared_data):
    root = shared_data("hymenoptera_data")
    ds = build_dataset(root, "imagefolder", "train", eval_transform(28))
    assert ds.class_ids == ["ants", "bees"]
    paths = [p for p, _ in ds.samples]
    assert len(paths) == 245
    gif = next(i for i, p in enumerate(paths) if p.endswith("imageNotFound.gif"))
    spaced = next(i for i, p in enumerate(paths) if p.endswith("ant photos.jpg"))
    for i in (gif, spaced):
        image, label = ds[i]
        assert image.shape == (3, 28, 28) and image.dtype == torch.float32 and label == 0
    assert load_rgb(paths[gif]).mode == "RGB"  # palette GIF converted

    ds.set_transform(train_transform(28, scale=(0.5, 1.0)))
    images, labels = next(iter(build_loader(ds, 8, shuffle=True, num_workers=2)))
    assert images.shape == (8, 3, 28, 28) and labels.shape == (8,)


def _folder_with_a_broken_file(tmp_path, shared_data):
    src = sorted(shared_data("hymenoptera_data", "val", "bees").iterdir())[:2]
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "ok.jpg").write_bytes(src[0 if cls == "a" else 1].read_bytes())
    (tmp_path / "a" / "broken image.jpg").write_bytes(b"not a jpeg at all")
    return tmp_path


def test_undecodable_file_raises_naming_it(tmp_path, shared_data):
    ds = image_folder(_folder_with_a_broken_file(tmp_path, shared_data), eval_transform(28))
    bad = next(i for i, (p, _) in enumerate(ds.samples) if "broken" in p)
    with pytest.raises(BadImageError, match="broken image.jpg.*on_bad_file='skip'"):
        ds[bad]


def test_undecodable_file_can_be_skipped_with_a_warning(tmp_path, shared_data, caplog):
    ds = image_folder(_folder_with_a_broken_file(tmp_path, shared_data), eval_transform(28),
                      on_bad_file="skip")
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 3 and all(x.shape == (3, 28, 28) for x, _ in items)
    assert "broken image.jpg" in caplog.text


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(tmp_path / "nowhere", None)
    with pytest.raises(ValueError, match="'imagefolder' or 'imagenet'"):
        build_dataset(tmp_path, "webdataset", "train", None)
