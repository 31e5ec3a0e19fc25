"""The dataset registry: every name loads a tiny fixture written here in its official layout, with exact labels;
a wrong layout, a label id outside the mapping and an image/label size mismatch are one line naming the file."""
import os
import zipfile

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
from PIL import Image

from deeplab_keras import data
from deeplab_keras.data import classes as C
from deeplab_keras.data._common import tf_error_line

H, W = 6, 8


def _image(path, seed, size=(H, W)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if size[0] * size[1] > 10_000:  # large images: a smooth pattern (small files, fast to write)
        rgb = ((np.indices(size).sum(0)[..., None] + [0, 50, seed]) % 256).astype(np.uint8)
    else:
        rgb = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=100) if path.endswith(".jpg") else Image.fromarray(rgb).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def _png(path, values, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(np.asarray(values, np.uint8), mode=mode)
    if mode == "P":  # a palette PNG as VOC's (without a palette PIL may renumber the indices)
        image.putpalette(data.voc_palette().reshape(-1).tolist())
    image.save(path)


def _lines(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(i + "\n" for i in ids))


def _labels(values, size=(H, W)):
    """An [H, W] label cycling through ``values`` (every value present)."""
    return np.resize(np.asarray(values), size[0] * size[1]).reshape(size)


def _examples(ds):
    return [{k: v.numpy() for k, v in ex.items()} for ex in ds]


def _error(ds):
    with pytest.raises((tf.errors.OpError, data.BadDataError)) as info:
        _examples(ds)
    return tf_error_line(info.value) if isinstance(info.value, tf.errors.OpError) else str(info.value)


CITY_IDS = [0, 7, 8, 26, 33, 24, 255, 5]
CITY_TRAIN = [255, 0, 1, 13, 18, 11, 255, 255]


def _cityscapes_files(root, splits=("val",), size=(H, W), beside=True):
    """{split: (image, train-id label)} of one image per split in the unpacked Cityscapes layout (``beside``: with
    the _instanceIds / _color files that are no labels)."""
    out = {}
    for k, split in enumerate(splits):
        stem = f"aachen_00000{k}_000019"
        image = _image(os.path.join(root, "leftImg8bit", split, "aachen", stem + "_leftImg8bit.png"), k, size)
        gt = os.path.join(root, "gtFine", split, "aachen", stem)
        _png(gt + "_gtFine_labelIds.png", _labels(CITY_IDS, size))
        if beside:
            _png(gt + "_gtFine_instanceIds.png", _labels([100, 200], size))  # beside the labels, not read
            Image.fromarray(np.full(size + (3,), 7, np.uint8)).save(gt + "_gtFine_color.png")
        out[split] = (image, _labels(CITY_TRAIN, size))
    return out


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = str(tmp_path / "cityscapes")
    image, label = _cityscapes_files(root)["val"]
    assert data.detect_dataset(root) == "cityscapes"
    [ex] = _examples(data.load_dataset("cityscapes", root, "val"))
    np.testing.assert_array_equal(ex["label"], label)
    np.testing.assert_array_equal(ex["image"], image)
    assert ex["file_name"].decode().endswith("aachen_000000_000019_leftImg8bit.png")
    lut = C.cityscapes_train_to_label_ids()
    assert [int(lut[t]) for t in range(19)] == list(C.CITYSCAPES_LABEL_IDS)  # predict --label-ids inverts it
    # a value that is no labelId (34..254): one line naming the label file
    bad = os.path.join(root, "gtFine", "val", "aachen", "aachen_000000_000019_gtFine_labelIds.png")
    _png(bad, _labels([7, 40]))
    line = _error(data.load_dataset("cityscapes", root, "val"))
    assert bad in line and "[40]" in line and "\n" not in line


def test_cityscapes_through_tfds_zips(tmp_path):
    unpacked = str(tmp_path / "unpacked")
    files = _cityscapes_files(unpacked, ("train", "val", "test"), size=(1024, 2048), beside=False)  # TFDS: this size
    root = tmp_path / "zips"
    root.mkdir()
    for zip_name, top in (("leftImg8bit_trainvaltest.zip", "leftImg8bit"), ("gtFine_trainvaltest.zip", "gtFine")):
        with zipfile.ZipFile(root / zip_name, "w") as z:
            for folder, _, names in os.walk(os.path.join(unpacked, top)):
                for name in names:
                    z.write(os.path.join(folder, name), os.path.relpath(os.path.join(folder, name), unpacked))
    assert data.detect_dataset(str(root)) == "cityscapes"
    [ex] = _examples(data.load_dataset("cityscapes", str(root), "val", data_dir=str(tmp_path / "tfds")))
    np.testing.assert_array_equal(ex["label"], files["val"][1])
    np.testing.assert_array_equal(ex["image"], files["val"][0])


def _context_converted(root):
    ids = ["2008_000002", "2008_000003"]
    out = []
    for k, i in enumerate(ids):
        image = _image(os.path.join(root, "VOC2010", "JPEGImages", i + ".jpg"), k)
        label = _labels([0, 59, 12, k + 1])
        _png(os.path.join(root, "VOC2010", "SegmentationClassContext", i + ".png"), label)
        out.append((image, label))
    _lines(os.path.join(root, "VOC2010", "ImageSets", "SegmentationContext", "val.txt"), ids)
    return out


def test_pascal_context_converted_pngs(tmp_path):
    root = str(tmp_path / "context")
    expected = _context_converted(root)
    assert data.detect_dataset(root) == "pascal_context"
    examples = _examples(data.load_dataset("pascal_context", root, "val"))
    for ex, (image, label) in zip(examples, expected, strict=True):
        np.testing.assert_array_equal(ex["label"], label)
        np.testing.assert_array_equal(ex["image"], image)
    info = data.dataset_info("pascal_context")
    assert info.num_classes == 60 and info.class_names[:4] == ("background", "aeroplane", "bag", "bed")
    assert info.class_names[-1] == "wood" and info.paper


def test_pascal_context_mat_release_maps_names(tmp_path):
    root = str(tmp_path / "context_mat")
    # labels.txt of the original release: 1-based ids; 'table', 'bedclothes', 'cloth' as that file spells them
    names = {1: "accordion", 2: "aeroplane", 3: "table", 4: "bedclothes", 5: "cloth", 6: "wood", 7: "zebra"}
    wanted = set(C.PASCAL_CONTEXT_CLASSES[1:]) - set(names.values())
    names.update({8 + k: n for k, n in enumerate(sorted(wanted))})
    with open(os.path.join(_mkdir(root), "labels.txt"), "w") as f:
        f.write("".join(f"{k}: {n}\n" for k, n in sorted(names.items())))
    index = C.PASCAL_CONTEXT_CLASSES.index
    label_map = _labels([1, 2, 3, 4, 5, 6, 7, 0])
    expected = _labels([0, index("aeroplane"), index("table"), index("bedclothes"), index("cloth"), index("wood"),
                        0, 0])
    image = _image(os.path.join(root, "VOC2010", "JPEGImages", "2008_000002.jpg"), 0)
    _mkdir(os.path.join(root, "trainval"))
    scipy.io.savemat(os.path.join(root, "trainval", "2008_000002.mat"), {"LabelMap": label_map.astype(np.uint16)})
    _lines(os.path.join(root, "VOC2010", "ImageSets", "Main", "train.txt"), ["2008_000002", "2008_000999"])
    assert data.detect_dataset(root) == "pascal_context"
    [ex] = _examples(data.load_dataset("pascal_context", root, "train"))  # ids without a .mat are not listed
    np.testing.assert_array_equal(ex["label"], expected)
    np.testing.assert_array_equal(ex["image"], image)
    # an id that labels.txt does not have: one line naming the .mat file
    mat = os.path.join(root, "trainval", "2008_000002.mat")
    scipy.io.savemat(mat, {"LabelMap": _labels([2, 999]).astype(np.uint16)})
    line = _error(data.load_dataset("pascal_context", root, "train"))
    assert mat in line and "999" in line


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


def test_person_part(tmp_path):
    root = str(tmp_path / "person_part")
    image = _image(os.path.join(root, "VOC2012", "JPEGImages", "2008_000003.jpg"), 1)
    label = _labels([0, 1, 2, 3, 4, 5, 6, 255])
    _png(os.path.join(root, "pascal_person_part_gt", "2008_000003.png"), label)
    _lines(os.path.join(root, "pascal_person_part_trainval_list", "val_id.txt"), ["2008_000003"])
    assert data.detect_dataset(root) == "person_part"
    [ex] = _examples(data.load_dataset("person_part", root, "val"))
    np.testing.assert_array_equal(ex["label"], label)
    np.testing.assert_array_equal(ex["image"], image)
    assert data.dataset_info("person_part").class_names[1:3] == ("head", "torso")
    # an image/label size mismatch: one line naming the label file
    _png(os.path.join(root, "pascal_person_part_gt", "2008_000003.png"), np.zeros((H + 1, W)))
    line = _error(data.load_dataset("person_part", root, "val"))
    assert "pascal_person_part_gt/2008_000003.png" in line and "size" in line


def test_cocostuff164k_and_10k(tmp_path):
    root = str(tmp_path / "coco164k")
    image = _image(os.path.join(root, "images", "val2017", "000000000139.jpg"), 2)
    label = _labels([0, 181, 92, 255])
    _png(os.path.join(root, "annotations", "val2017", "000000000139.png"), label)
    _mkdir(os.path.join(root, "images", "train2017"))
    assert data.detect_dataset(root) == "cocostuff164k"
    [ex] = _examples(data.load_dataset("cocostuff164k", root, "val"))
    np.testing.assert_array_equal(ex["label"], label)
    np.testing.assert_array_equal(ex["image"], image)

    root = str(tmp_path / "coco10k")
    image = _image(os.path.join(root, "images", "COCO_train2014_000000000077.jpg"), 3)
    _mkdir(os.path.join(root, "annotations"))
    mat = os.path.join(root, "annotations", "COCO_train2014_000000000077.mat")
    scipy.io.savemat(mat, {"S": _labels([0, 1, 182, 93]).astype(np.uint16)})
    _lines(os.path.join(root, "imageLists", "test.txt"), ["COCO_train2014_000000000077"])
    assert data.detect_dataset(root) == "cocostuff10k"
    [ex] = _examples(data.load_dataset("cocostuff10k", root, "test"))
    np.testing.assert_array_equal(ex["label"], _labels([255, 0, 181, 92]))
    np.testing.assert_array_equal(ex["image"], image)
    assert data.dataset_info("cocostuff10k").class_names[0] == "person"
    scipy.io.savemat(mat, {"S": _labels([0, 183]).astype(np.uint16)})
    line = _error(data.load_dataset("cocostuff10k", root, "val"))  # val = the test list
    assert mat in line and "183" in line


def _voc_aug(root):
    """VOC2012/ with a (train) and b (val), benchmark_RELEASE/ with the SBD-only c: {stem: (image, label)}."""
    voc, sbd = os.path.join(root, "VOC2012"), os.path.join(root, "benchmark_RELEASE", "dataset")
    out = {}
    for k, stem in enumerate(("2007_000001", "2007_000002")):
        label = _labels([0, 20, 255, k + 3])
        _png(os.path.join(voc, "SegmentationClass", stem + ".png"), label, mode="P")
        out[stem] = (_image(os.path.join(voc, "JPEGImages", stem + ".jpg"), k), label)
    _lines(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), ["2007_000001"])
    _lines(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), ["2007_000002"])
    label = _labels([15, 0, 9])
    scipy.io.savemat(os.path.join(_mkdir(os.path.join(sbd, "cls")), "2008_000003.mat"),
                     {"GTcls": {"Segmentation": label.astype(np.uint8)}})
    out["2008_000003"] = (_image(os.path.join(sbd, "img", "2008_000003.jpg"), 5), label)
    return out


def test_voc_voc_aug_folder_and_synthetic_through_the_registry(tmp_path):
    root = str(tmp_path / "VOCdevkit")
    files = _voc_aug(root)
    assert data.detect_dataset(root) == "voc_aug"
    tfds_dir = str(tmp_path / "tfds")
    for name, split, stems in (("voc", "val", ["2007_000002"]), ("voc_aug", "train", ["2007_000001", "2008_000003"])):
        examples = sorted(_examples(data.load_dataset(name, root, split, data_dir=tfds_dir)),
                          key=lambda ex: ex["file_name"])
        assert [ex["file_name"].decode() for ex in examples] == [s + ".jpg" for s in stems]
        for ex, stem in zip(examples, stems):
            np.testing.assert_array_equal(ex["label"], files[stem][1])
            assert ex["image"].shape == files[stem][0].shape  # the JPEG bytes, decoded by TFDS
    root = data.write_synthetic_folder(str(tmp_path / "shapes"), 2, size=(33, 33), num_classes=3)
    assert data.detect_dataset(root) == "folder"
    assert len(_examples(data.load_dataset("folder", root))) == 2
    assert data.dataset_info("folder", root).class_names == ("background", "class_1", "class_2")
    [ex] = _examples(data.load_dataset("synthetic", split="val", num_images=1, size=(33, 33), num_classes=3))
    assert ex["label"].shape == (33, 33)


def test_wrong_layout_is_one_line(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError) as info:
        data.detect_dataset(str(tmp_path))
    line = str(info.value)
    assert "\n" not in line and str(tmp_path) in line
    assert all(w in line for w in ("VOC2012/", "leftImg8bit/", "VOC2010/", "pascal_person_part_gt/", "masks/"))
    with pytest.raises(ValueError, match="does not hold the cityscapes layout: looked for leftImg8bit/"):
        data.load_dataset("cityscapes", str(tmp_path), "val")
    with pytest.raises(ValueError, match="not known"):
        data.dataset_info("ade20k")
    with pytest.raises(ValueError, match="not a split of person_part"):
        data.load_dataset("person_part", str(tmp_path), "test")


def _colour_folder(root, masks):
    for k, mask in enumerate(masks):
        _image(os.path.join(root, "images", f"m{k}.jpg"), k)
        Image.fromarray(np.asarray(mask, np.uint8)).save(os.path.join(_mkdir(os.path.join(root, "masks")), f"m{k}.png"))
    with open(os.path.join(root, "classes.csv"), "w") as f:
        f.write("name,r,g,b\nbackground,0,0,0\nroad,128,64,128\ncar,0,0,142\nignore,255,255,255\n")


def test_colour_masks_through_classes_csv(tmp_path):
    root = str(tmp_path / "colours")
    colours = np.array([(0, 0, 0), (128, 64, 128), (0, 0, 142), (255, 255, 255)], np.uint8)
    index = _labels([0, 1, 2, 3, 1])
    _colour_folder(root, [colours[index]])
    [ex] = _examples(data.load_dataset("folder", root))
    np.testing.assert_array_equal(ex["label"], np.where(index == 3, 255, index))
    info = data.dataset_info("folder", root)
    assert info.class_names == ("background", "road", "car")
    assert info.palette[2].tolist() == [0, 0, 142]
    # a colour not in the table: one error naming the mask and the colour
    rgb = colours[index].copy()
    rgb[2, 3] = (1, 2, 3)
    Image.fromarray(rgb).save(os.path.join(root, "masks", "m0.png"))
    line = _error(data.load_dataset("folder", root))
    assert os.path.join(root, "masks", "m0.png") in line and "(1, 2, 3)" in line and "row 2, column 3" in line
    with open(os.path.join(root, "classes.csv"), "a") as f:
        f.write("sky,0,0,142\n")
    with pytest.raises(ValueError, match=r"classes.csv line 6: colour \(0, 0, 142\) is already class car"):
        data.folder_dataset(root)


def test_config_and_cli_names_are_the_registry():
    from deeplab_keras.cli.options import dataset_names
    from deeplab_keras.training.config_sections import DATASETS

    assert set(DATASETS) | {"voc_aug"} == set(data.DATASET_NAMES) == set(dataset_names())
