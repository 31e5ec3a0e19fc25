"""folder_dataset (images/ + masks/ index PNGs) and the synthetic data that feeds it."""
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deeplab_keras import data
from deeplab_keras.data import synthetic


def _examples(ds):
    return [{k: v.numpy() for k, v in ex.items()} for ex in ds]


@pytest.fixture()
def shapes(tmp_path):
    return data.write_synthetic_folder(str(tmp_path / "shapes"), 5, size=(45, 61), num_classes=4, seed=3,
                                       boundary_width=1)


def test_folder_layout_and_exact_labels(shapes):
    assert sorted(os.listdir(os.path.join(shapes, "images")))[0] == "synthetic_00000.jpg"
    assert data.read_class_names(shapes) == ["background", "class_1", "class_2", "class_3"]
    examples = _examples(data.folder_dataset(shapes))
    assert len(examples) == 5
    for i, ex in enumerate(examples):
        image_path = os.path.join(shapes, "images", f"synthetic_{i:05d}.jpg")
        mask = Image.open(os.path.join(shapes, "masks", f"synthetic_{i:05d}.png"))
        assert mask.mode == "P" and ex["file_name"].decode() == image_path
        np.testing.assert_array_equal(ex["label"], np.array(mask))  # palette indices, not colours
        np.testing.assert_array_equal(ex["image"], np.array(Image.open(image_path).convert("RGB")))
        # same labels as the in-memory generator with the same seed
        np.testing.assert_array_equal(ex["label"], synthetic.generate_example(i, (45, 61), 4, 3, 1)[1])
    assert any((ex["label"] == 255).any() for ex in examples)


def test_folder_shuffle_is_seeded_and_grayscale_masks_work(shapes):
    def names(s):
        return [ex["file_name"] for ex in _examples(data.folder_dataset(shapes, shuffle=True, seed=s))]

    assert names(1) == names(1) and sorted(names(1)) == sorted(names(2))
    path = os.path.join(shapes, "masks", "synthetic_00002.png")
    values = np.array(Image.open(path))
    Image.fromarray(values).save(path)  # mode "L"
    np.testing.assert_array_equal(_examples(data.folder_dataset(shapes))[2]["label"], values)


def test_folder_structure_errors(shapes, tmp_path):
    with pytest.raises(ValueError, match="lists 4 classes"):
        data.folder_dataset(shapes, num_classes=3)
    os.remove(os.path.join(shapes, "masks", "synthetic_00001.png"))
    with pytest.raises(FileNotFoundError, match="synthetic_00001.png"):
        data.folder_dataset(shapes)
    with pytest.raises(FileNotFoundError, match="images"):
        data.folder_dataset(str(tmp_path / "empty"))


def _break(root, how):
    """Breaks example 1 (or 3) in one way; returns the path the error must name."""
    image = os.path.join(root, "images", "synthetic_00001.jpg")
    mask = os.path.join(root, "masks", "synthetic_00001.png")
    if how == "truncated":
        raw = open(image, "rb").read()
        open(image, "wb").write(raw[: len(raw) * 2 // 3])
        return image
    if how == "garbage":
        open(image, "wb").write(b"not an image at all")
        return image
    if how == "size":
        Image.open(mask).crop((0, 0, 30, 45)).save(mask)
        return mask
    if how == "value":
        im = Image.open(mask)
        arr = np.array(im)
        arr[3, 3] = 9
        out = Image.fromarray(arr)
        out.putpalette(im.getpalette())
        out.save(mask)
        return mask
    if how == "rgb":
        Image.open(mask).convert("RGB").save(mask)
        return mask
    if how == "dangling":
        os.remove(image)
        os.symlink(os.path.join(root, "gone.jpg"), image)
        return image
    if how == "loop":
        os.remove(mask)
        os.symlink(mask, mask)
        return mask
    if how == "float":
        Image.fromarray(np.zeros((45, 61), np.float32), "F").save(image.replace(".jpg", ".tif"))
        os.replace(image.replace(".jpg", ".tif"), image)
        return image
    raise AssertionError(how)


@pytest.mark.parametrize("how,match", [("truncated", "cannot decode image"), ("garbage", "cannot decode image"),
                                       ("size", "label size"), ("value", "outside"), ("rgb", "mode 'RGB'"),
                                       ("dangling", "dangling symbolic link"), ("loop", "symbolic link loop"),
                                       ("float", "image mode 'F'")])
def test_bad_files_raise_naming_the_file(shapes, how, match):
    bad = _break(shapes, how)
    with pytest.raises(tf.errors.OpError, match=match) as e:
        _examples(data.folder_dataset(shapes))
    assert bad in str(e.value)


def test_skip_bad_files_logs_count(shapes, caplog):
    _break(shapes, "truncated")
    mask = os.path.join(shapes, "masks", "synthetic_00003.png")
    Image.open(mask).convert("RGB").save(mask)
    with caplog.at_level(logging.WARNING, logger="deeplab_keras.data"):
        examples = _examples(data.folder_dataset(shapes, skip_bad=True))
        again = _examples(data.folder_dataset(shapes, skip_bad=True))
    assert [os.path.basename(ex["file_name"].decode()) for ex in examples] == [
        "synthetic_00000.jpg", "synthetic_00002.jpg", "synthetic_00004.jpg"]
    assert len(again) == 3
    assert "synthetic_00001.jpg" in caplog.text and "synthetic_00003" in caplog.text
    assert caplog.text.count("skipped 2 bad file(s)") == 2  # once per pass


def test_folder_through_pipeline_png_images(tmp_path):
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["RGBA", "L", "RGB"]):
        h, w = 30 + i, 40
        Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode).save(
            root / "images" / f"im{i}.png")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(root / "masks" / f"im{i}.png")
    ds = data.folder_dataset(str(root), num_classes=3)
    shapes_seen = [ex["image"].shape for ex in _examples(ds)]
    assert shapes_seen == [(30, 40, 3), (31, 40, 3), (32, 40, 3)]
    images, labels = next(iter(data.make_pipeline(ds, training=True, batch_size=3, crop_size=(25, 25),
                                                  num_classes=3, seed=0)))
    assert images.shape == (3, 25, 25, 3) and set(np.unique(labels.numpy())) <= {0, 1, 2, 255}


def test_16_bit_grayscale_images_are_scaled(tmp_path):
    root = tmp_path / "g16"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    gray16 = np.random.default_rng(0).integers(0, 65536, (30, 40)).astype(np.uint16)
    Image.fromarray(gray16).save(root / "images" / "a.png")  # mode I;16
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "a.png")
    (ex,) = _examples(data.folder_dataset(str(root), num_classes=2))
    expected = np.round(gray16 / 257.0).astype(np.uint8)  # 0..65535 -> 0..255, not clipped to white
    np.testing.assert_array_equal(ex["image"], np.repeat(expected[..., None], 3, -1))
