"""The TFDS builder voc2012_segmentation on the real VOC samples and on SBD .mat files made here."""
import io
import os
import shutil

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

import tensorflow as tf
import tensorflow_datasets as tfds

from deeplab_keras import data
from deeplab_keras.data import voc


def _ids(root, split):
    with open(os.path.join(root, "VOC2012", "ImageSets", "Segmentation", split + ".txt")) as f:
        return sorted(line.strip() for line in f if line.strip())


def _by_name(ds):
    return {ex["file_name"].decode(): ex for ex in tfds.as_numpy(ds)}


def _png_indices(path):
    im = Image.open(path)
    assert im.mode == "P"
    return np.array(im)


def _write_sbd_mat(path, seg):
    """An SBD cls/*.mat in the real layout: struct GTcls {Boundaries: 20x1 cell of sparse, Segmentation: uint8
    [H, W], CategoriesPresent: column of class ids}."""
    present = [c for c in np.unique(seg) if 0 < c < 21]
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(1, 21):
        mask = seg == c
        edge = mask & ~np.pad(mask, 1)[1:-1, 2:] if mask.any() else mask
        boundaries[c - 1, 0] = scipy.sparse.csc_matrix(edge)
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg.astype(np.uint8),
                                      "CategoriesPresent": np.array(present, np.uint8).reshape(-1, 1)}})


def _copy_voc(src, dst):
    shutil.copytree(os.path.join(src, "VOC2012"), os.path.join(dst, "VOC2012"))
    return dst


@pytest.fixture(scope="module")
def voc_prepared(voc_samples_dir, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.load_voc("train", config="voc", manual_dir=str(voc_samples_dir), data_dir=data_dir)
    return str(voc_samples_dir), data_dir


@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_labels_equal_png_indices_and_images_equal_jpeg(voc_prepared, split):
    root, data_dir = voc_prepared
    examples = _by_name(data.load_voc(split, config="voc", data_dir=data_dir))
    assert sorted(n[:-4] for n in examples) == _ids(root, split)  # split membership, nothing else
    for name, ex in examples.items():
        stem = name[:-4]
        want = _png_indices(os.path.join(root, "VOC2012", "SegmentationClass", stem + ".png"))
        assert ex["label"].dtype == np.uint8 and ex["label"].shape == want.shape
        np.testing.assert_array_equal(ex["label"], want)
        jpeg = open(os.path.join(root, "VOC2012", "JPEGImages", name), "rb").read()
        np.testing.assert_array_equal(ex["image"], tf.io.decode_jpeg(jpeg).numpy())  # original bytes kept
    assert any((ex["label"] == 255).any() for ex in examples.values())  # the boundary band is kept


def test_registered_name_loads_with_tfds(voc_prepared):
    _, data_dir = voc_prepared
    assert "voc2012_segmentation" in tfds.list_builders()
    ds = tfds.load("voc2012_segmentation/voc", split="val", data_dir=data_dir)
    assert ds.element_spec["label"].shape.as_list() == [None, None]
    assert ds.element_spec["label"].dtype == tf.uint8
    assert ds.element_spec["image"].shape.as_list() == [None, None, 3]
    assert len(list(ds)) == 2


def test_prepared_from_other_manual_dir_is_refused(voc_prepared, tmp_path):
    _, data_dir = voc_prepared
    other = _copy_voc(voc_prepared[0], str(tmp_path / "other"))
    with pytest.raises(ValueError, match="overwrite=True"):
        data.load_voc("train", manual_dir=other, data_dir=data_dir)


def test_missing_manual_dir_says_where_to_put_what(tmp_path, voc_samples_dir):
    with pytest.raises(FileNotFoundError, match="not prepared") as e:
        data.load_voc("train", data_dir=str(tmp_path / "tfds"))
    assert "VOC2012/JPEGImages" in str(e.value) and "manual_dir" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_voc("train", manual_dir=str(tmp_path / "nowhere"), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="VOC2012 folder itself"):
        data.load_voc("train", manual_dir=str(voc_samples_dir / "VOC2012"), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="benchmark_RELEASE/dataset/cls") as e:
        data.load_voc("train", config="aug", manual_dir=str(voc_samples_dir), data_dir=str(tmp_path / "tfds"))
    assert "benchmark.tgz" in str(e.value)
    with pytest.raises(ValueError, match="split"):
        data.load_voc("test", manual_dir=str(voc_samples_dir), data_dir=str(tmp_path / "tfds"))


@pytest.fixture(scope="module")
def aug_dir(voc_samples_dir, tmp_path_factory):
    """VOC samples + SBD: 2007_000032 (VOC train), 2007_000033 (VOC val: must be left out) and two SBD-only
    images whose JPEGs live in benchmark_RELEASE/dataset/img."""
    root = str(tmp_path_factory.mktemp("aug"))
    _copy_voc(str(voc_samples_dir), root)
    cls_dir = os.path.join(root, "benchmark_RELEASE", "dataset", "cls")
    img_dir = os.path.join(root, "benchmark_RELEASE", "dataset", "img")
    os.makedirs(cls_dir)
    os.makedirs(img_dir)
    rng = np.random.default_rng(0)
    labels = {}
    for stem in ("2007_000032", "2007_000033"):
        h, w = Image.open(os.path.join(root, "VOC2012", "JPEGImages", stem + ".jpg")).size[::-1]
        labels[stem] = np.full((h, w), 7, np.uint8)  # differs from the VOC PNG on purpose
    for stem, (h, w) in {"2008_900001": (41, 57), "2011_900002": (66, 38)}.items():
        seg = np.zeros((h, w), np.uint8)
        seg[5:30, 4:30] = rng.integers(1, 21)
        seg[20:, 20:] = 20
        labels[stem] = seg
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        open(os.path.join(img_dir, stem + ".jpg"), "wb").write(buf.getvalue())
    for stem, seg in labels.items():
        _write_sbd_mat(os.path.join(cls_dir, stem + ".mat"), seg)
    return root, labels


def test_generated_mat_has_real_sbd_structure(aug_dir):
    root, labels = aug_dir
    mat = scipy.io.loadmat(os.path.join(root, "benchmark_RELEASE", "dataset", "cls", "2008_900001.mat"))
    gt = mat["GTcls"]
    assert gt.dtype.names == ("Boundaries", "Segmentation", "CategoriesPresent")
    assert gt[0, 0]["Boundaries"].shape == (20, 1) and scipy.sparse.issparse(gt[0, 0]["Boundaries"][0, 0])
    np.testing.assert_array_equal(voc.read_sbd_mat(os.path.join(root, "benchmark_RELEASE", "dataset", "cls",
                                                                "2008_900001.mat")), labels["2008_900001"])


@pytest.mark.parametrize("spelling", [dict(split="train", config="aug"), dict(split="train_aug")])
def test_aug_train_is_voc_train_plus_sbd_minus_voc_val(aug_dir, tmp_path_factory, spelling):
    root, labels = aug_dir
    data_dir = str(tmp_path_factory.getbasetemp() / "tfds_aug")
    examples = _by_name(data.load_voc(manual_dir=root, data_dir=data_dir, **spelling))
    voc_train, voc_val = _ids(root, "train"), _ids(root, "val")
    want = sorted((set(voc_train) | set(labels)) - set(voc_val))
    assert sorted(n[:-4] for n in examples) == want
    assert "2007_000033" not in {n[:-4] for n in examples}  # in SBD but VOC val: left out
    for stem in ("2008_900001", "2011_900002"):  # SBD-only: GTcls.Segmentation exactly
        np.testing.assert_array_equal(examples[stem + ".jpg"]["label"], labels[stem])
        jpeg = open(os.path.join(root, "benchmark_RELEASE", "dataset", "img", stem + ".jpg"), "rb").read()
        np.testing.assert_array_equal(examples[stem + ".jpg"]["image"], tf.io.decode_jpeg(jpeg).numpy())
    # in VOC train and SBD: the VOC PNG (with its 255 band) wins
    png = _png_indices(os.path.join(root, "VOC2012", "SegmentationClass", "2007_000032.png"))
    np.testing.assert_array_equal(examples["2007_000032.jpg"]["label"], png)
    val = _by_name(data.load_voc("val", config="aug", data_dir=data_dir))
    assert sorted(n[:-4] for n in val) == voc_val


def _broken_copy(voc_samples_dir, tmp_path, stem, how):
    root = _copy_voc(str(voc_samples_dir), str(tmp_path / "voc"))
    png = os.path.join(root, "VOC2012", "SegmentationClass", stem + ".png")
    jpg = os.path.join(root, "VOC2012", "JPEGImages", stem + ".jpg")
    if how == "label_value":
        im = Image.open(png)
        arr = np.array(im)
        arr[0, 0] = 30
        out = Image.fromarray(arr)
        out.putpalette(im.getpalette())
        out.save(png)
        return root, png
    if how == "truncated":
        raw = open(jpg, "rb").read()
        open(jpg, "wb").write(raw[: len(raw) // 2])
        return root, jpg
    if how == "size":
        im = Image.open(png)
        out = im.crop((0, 0, im.size[0] - 3, im.size[1]))
        out.save(png)
        return root, png
    raise AssertionError(how)


@pytest.mark.parametrize("how,match", [("label_value", "outside"), ("truncated", "cannot decode"),
                                       ("size", "size")])
def test_bad_voc_files_are_named(voc_samples_dir, tmp_path, how, match):
    root, bad = _broken_copy(voc_samples_dir, tmp_path, "2007_000063", how)
    with pytest.raises(data.BadDataError, match=match) as e:
        data.load_voc("train", manual_dir=root, data_dir=str(tmp_path / "tfds"))
    assert bad in str(e.value)


def test_voc_through_training_pipeline(voc_prepared):
    _, data_dir = voc_prepared
    ds = data.load_voc("train", data_dir=data_dir, shuffle_files=True, seed=0)
    images, labels = next(iter(data.make_pipeline(ds, training=True, batch_size=2, crop_size=(97, 97),
                                                  num_classes=21, seed=0)))
    assert images.shape == (2, 97, 97, 3) and labels.shape == (2, 97, 97) and labels.dtype == tf.uint8
    assert set(np.unique(labels.numpy())) <= set(range(21)) | {255}


def test_listed_but_missing_image_is_named(voc_samples_dir, tmp_path):
    root = _copy_voc(str(voc_samples_dir), str(tmp_path / "voc"))
    missing = os.path.join(root, "VOC2012", "JPEGImages", "2009_000006.jpg")
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match="2009_000006") as e:
        data.load_voc("train", manual_dir=root, data_dir=str(tmp_path / "tfds"))
    assert missing in str(e.value)
