"""One registry of the datasets the package reads: :func:`load_dataset`, :func:`dataset_info`,
:func:`detect_dataset`.

Every dataset yields the package's example dicts (``image`` uint8 [H, W, 3], ``label`` uint8 [H, W] class
indices with 255 = ignore, ``file_name``), un-augmented, read from the official release as it unpacks:

================  ==============================================================================================
``voc``           ``VOC2012/`` (TFDS builder ``voc2012_segmentation/voc``; splits train, val)
``voc_aug``       ``VOC2012/`` + ``benchmark_RELEASE/`` (SBD; ``voc2012_segmentation/aug``)
``cityscapes``    ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_labelIds.png``
                  (labelIds -> the 19 train ids, others 255), or ``leftImg8bit_trainvaltest.zip`` +
                  ``gtFine_trainvaltest.zip`` through TFDS ``cityscapes/semantic_segmentation`` (same mapping)
``pascal_context`` ``VOC2010/SegmentationClassContext/<id>.png`` +
                  ``VOC2010/ImageSets/SegmentationContext/{split}.txt``, or the original ``trainval/<id>.mat``
                  (``LabelMap`` into ``labels.txt``) + ``VOC2010/ImageSets/Main``
``person_part``   ``pascal_person_part_gt/<id>.png`` + ``pascal_person_part_trainval_list/{train,val}_id.txt`` +
                  ``VOC2012/JPEGImages``
``cocostuff164k`` ``images/{train2017,val2017}/*.jpg`` + ``annotations/{train2017,val2017}/*.png``
``cocostuff10k``  ``images/*.jpg`` + ``annotations/*.mat`` (``S``, 1-based, 0 = unlabeled) +
                  ``imageLists/{train,test}.txt``
``folder``        ``images/`` + ``masks/`` (index PNGs, or RGB masks with ``classes.csv``)
``synthetic``     generated shapes (no root)
================  ==============================================================================================

Example:
    >>> from deeplab_keras.data import dataset_info, load_dataset
    >>> dataset_info("cityscapes").num_classes
    19
    >>> ds = load_dataset("cityscapes", "/data/cityscapes", "val")   # doctest: +SKIP
"""
import dataclasses
import os
from typing import Callable, Optional, Tuple

import numpy as np

from deeplab_keras.data import classes as C
from deeplab_keras.data.reader import (IGNORE_LABEL, BadDataError, check_label, decoded_dataset, read_image_rgb,
                                       read_index_png, read_split_ids)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: its classes, colours, ignore label and the DeepLab v2 paper's results on it.

    Attributes:
        name: registry name.
        class_names: class names in index order (None: given by the data, e.g. a folder's classes.txt).
        palette: uint8 [256, 3] colour of each class index (masks written by ``deeplab predict``).
        ignore_label: the label value that is not scored (255).
        paper: {variant: mIoU %} of arXiv:1606.00915 (Chen et al., DeepLab v2) on this dataset.
        splits: the split names ``load_dataset`` takes.
        layout: what a root of this dataset holds (named in errors).
    """

    name: str
    class_names: Optional[Tuple[str, ...]]
    palette: np.ndarray = dataclasses.field(repr=False, compare=False)
    ignore_label: int = IGNORE_LABEL
    paper: dict = dataclasses.field(default_factory=dict)
    splits: Tuple[str, ...] = ("train", "val")
    layout: str = ""

    @property
    def num_classes(self):
        return None if self.class_names is None else len(self.class_names)


@dataclasses.dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    markers: Tuple[Tuple[str, ...], ...]   # alternative layouts: every path of one must exist under the root
    load: Callable


def _tuple(names):
    return tuple(names) if names is not None else None


# The DeepLab v2 paper's val / test mIoU (%) per dataset and variant (its ablation tables; "+" adds to the row before).
_VOC_PAPER = {"ResNet-101 ASPP-L + MSC + COCO + Aug, val": 76.35, "+ CRF, val": 77.69, "+ CRF, test": 79.7}
PAPER = {
    "voc": _VOC_PAPER, "voc_aug": _VOC_PAPER,
    "pascal_context": {"ResNet-101": 39.6, "+ MSC": 41.4, "+ COCO": 42.9, "+ Aug": 43.5, "+ ASPP-L": 44.7,
                       "+ CRF": 45.7},
    "person_part": {"ResNet-101": 58.90, "+ MSC": 63.10, "+ COCO": 64.40, "+ CRF": 64.94},
    "cityscapes": {"ResNet-101 ASPP-L, full resolution, + CRF, val": 71.4, "the same, test": 70.4},
}


def _need_split(entry, split):
    if split not in entry.info.splits:
        raise ValueError(f"split={split!r} is not a split of {entry.info.name}; expected one of {entry.info.splits}")


def _checked(image_path, label, label_path, num_classes):
    image = read_image_rgb(image_path)
    check_label(label, num_classes, f"{label_path} (image {image_path})", image.shape)
    return image, label


def _mapped(values, lut, path, what):
    """``lut[values]`` as uint8; values the table leaves at -1 (or beyond it) are one BadDataError naming ``path``."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= len(lut)):
        bad = np.unique(values[(values < 0) | (values >= len(lut))])
    else:
        bad = np.unique(values[lut[values] < 0]) if values.size else np.array([], int)
    if bad.size:
        raise BadDataError(f"{path}: label ids {bad.tolist()[:10]} are outside the {what} mapping; is this the "
                           "right dataset / label file?")
    return lut[values].astype(np.uint8)


# --------------------------------------------------------------------------------------------- Cityscapes
def _cityscapes_pairs(root, split):
    image_root = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{image_root} does not exist: Cityscapes {split} needs leftImg8bit/{split}/<city>/")
    pairs = []
    for city in sorted(os.listdir(image_root)):
        for name in sorted(os.listdir(os.path.join(image_root, city))):
            if name.endswith("_leftImg8bit.png"):
                stem = name[:-len("_leftImg8bit.png")]
                label = os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png")
                if not os.path.exists(label):
                    raise FileNotFoundError(f"{label} (label of {os.path.join(image_root, city, name)}) does not "
                                            "exist; unpack gtFine_trainvaltest.zip into the same root")
                pairs.append((os.path.join(image_root, city, name), label))
    if not pairs:
        raise FileNotFoundError(f"{image_root} holds no <city>/*_leftImg8bit.png images")
    return pairs


def cityscapes_train_ids(label_ids, name="labelIds"):
    """Cityscapes labelIds -> train ids (0..18, 255 ignored), uint8; a value that is no labelId is a BadDataError
    naming ``name``."""
    return _mapped(label_ids, C.cityscapes_label_lut(), name, "Cityscapes labelIds (0..33)")


def _load_cityscapes(root, split, *, data_dir=None, **options):
    if _has(root, _CITYSCAPES_ZIPS):
        return _load_cityscapes_tfds(root, split, data_dir)
    lut = C.cityscapes_label_lut()

    def decode(image_path, label_path):
        label = _mapped(read_index_png(label_path), lut, label_path, "Cityscapes labelIds (0..33)")
        return _checked(image_path, label, label_path, 19)
    return decoded_dataset(_cityscapes_pairs(root, split), decode, **options)


_CITYSCAPES_ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


def _load_cityscapes_tfds(root, split, data_dir=None):
    """TFDS ``cityscapes/semantic_segmentation`` prepared from the release zips in ``root`` (manual_dir); its
    labels are the raw labelIds, mapped as the unpacked layout's."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder("cityscapes/semantic_segmentation", data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(root)))
    lut = C.cityscapes_label_lut()

    def to_example(ex):
        label = tf.numpy_function(lambda v, name: _mapped(v[..., 0], lut, name.decode(), "Cityscapes labelIds"),
                                  [ex["segmentation_label"], ex["image_id"]], tf.uint8, stateful=False)
        label.set_shape([None, None])
        return {"image": ex["image_left"], "label": label, "file_name": ex["image_id"]}
    return builder.as_dataset(split="validation" if split == "val" else split).map(to_example)


# ------------------------------------------------------------------------------------------ PASCAL-Context
def _context_name_table(root):
    """{labels.txt id: our index} of the original release, mapped by name onto the 59 (others 0)."""
    path = next((p for p in (os.path.join(root, "labels.txt"), os.path.join(root, "trainval", "labels.txt"))
                 if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(f"{root}/labels.txt does not exist: the .mat release of PASCAL-Context needs its "
                                "labels.txt (lines 'id: name') beside trainval/")
    index = {name: i for i, name in enumerate(C.PASCAL_CONTEXT_CLASSES)}
    table = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, sep, name = line.partition(":")
            if not sep or not key.strip().isdigit():
                raise ValueError(f"{path} line {number}: expected 'id: name', got {line.strip()!r}")
            name = name.strip()
            table[int(key)] = index.get(C.PASCAL_CONTEXT_ALIASES.get(name, name), 0)
    missing = sorted(set(C.PASCAL_CONTEXT_CLASSES[1:]) - {C.PASCAL_CONTEXT_CLASSES[i] for i in table.values()})
    if missing:
        raise ValueError(f"{path} has no label named {', '.join(missing[:5])}: not the PASCAL-Context labels.txt?")
    lut = np.full(max(table) + 1, -1, np.int16)
    lut[0] = 0  # 0 is no labels.txt id: unlabeled pixels, background as in the conversion
    for key, value in table.items():
        lut[key] = value
    return lut


def read_context_mat(path, lut):
    """Our 60-class labels of an original PASCAL-Context ``<id>.mat`` (``LabelMap``) through ``lut``."""
    import scipy.io

    try:
        label_map = np.asarray(scipy.io.loadmat(path, variable_names=["LabelMap"])["LabelMap"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadDataError(f"{path}: cannot read LabelMap from the PASCAL-Context .mat file ({e!r})") from None
    if label_map.ndim != 2:
        raise BadDataError(f"{path}: LabelMap has shape {label_map.shape}; expected [H, W]")
    return _mapped(label_map.astype(np.int64), lut, path, "labels.txt")


def _load_pascal_context(root, split, **options):
    voc = os.path.join(root, "VOC2010")
    images = os.path.join(voc, "JPEGImages")
    converted = os.path.join(voc, "SegmentationClassContext")
    if os.path.isdir(converted):
        ids = read_split_ids(os.path.join(voc, "ImageSets", "SegmentationContext", split + ".txt"))
        items = [(os.path.join(images, i + ".jpg"), os.path.join(converted, i + ".png")) for i in ids]
        decode = lambda image, label: _checked(image, read_index_png(label), label, 60)  # noqa: E731
    else:
        lut = _context_name_table(root)
        mats = os.path.join(root, "trainval")
        split_file = os.path.join(voc, "ImageSets", "SegmentationContext", split + ".txt")
        if not os.path.exists(split_file):
            split_file = os.path.join(voc, "ImageSets", "Main", split + ".txt")
        available = {n[:-4] for n in os.listdir(mats) if n.endswith(".mat")}
        ids = [i for i in read_split_ids(split_file) if i in available]
        items = [(os.path.join(images, i + ".jpg"), os.path.join(mats, i + ".mat")) for i in ids]
        decode = lambda image, label: _checked(image, read_context_mat(label, lut), label, 60)  # noqa: E731
    return decoded_dataset(_existing(items), decode, **options)


def _existing(items):
    missing = [p for item in items for p in item if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) listed in the split do not exist, e.g. "
                                f"{', '.join(missing[:3])}; restore them or remove their ids from the list")
    if not items:
        raise FileNotFoundError("the split lists no images that exist")
    return items


# ------------------------------------------------------------------------------------------- Person-Part
def _load_person_part(root, split, **options):
    ids = read_split_ids(os.path.join(root, "pascal_person_part_trainval_list", f"{split}_id.txt"))
    items = [(os.path.join(root, "VOC2012", "JPEGImages", i + ".jpg"), os.path.join(root, "pascal_person_part_gt",
                                                                                    i + ".png")) for i in ids]
    return decoded_dataset(_existing(items), lambda image, label: _checked(image, read_index_png(label), label, 7),
                           **options)


# -------------------------------------------------------------------------------------------- COCO-Stuff
def _load_cocostuff164k(root, split, **options):
    folder = {"train": "train2017", "val": "val2017"}[split]
    image_root, label_root = os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)
    stems = sorted(n[:-4] for n in os.listdir(image_root) if n.endswith(".jpg"))
    items = [(os.path.join(image_root, s + ".jpg"), os.path.join(label_root, s + ".png")) for s in stems]
    return decoded_dataset(_existing(items), lambda image, label: _checked(image, read_index_png(label), label, 182),
                           **options)


def read_cocostuff10k_mat(path):
    """The 182-class labels of a COCO-Stuff 10k ``annotations/<id>.mat`` (``S``: 1-based, 0 = unlabeled -> 255)."""
    import scipy.io

    try:
        s = np.asarray(scipy.io.loadmat(path, variable_names=["S"])["S"]).astype(np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadDataError(f"{path}: cannot read S from the COCO-Stuff .mat file ({e!r})") from None
    lut = np.concatenate([[IGNORE_LABEL], np.arange(182)]).astype(np.int16)
    return _mapped(s, lut, path, "COCO-Stuff (S in 0..182)")


def _load_cocostuff10k(root, split, **options):
    ids = read_split_ids(os.path.join(root, "imageLists", ("test" if split == "val" else split) + ".txt"))
    items = [(os.path.join(root, "images", i + ".jpg"), os.path.join(root, "annotations", i + ".mat")) for i in ids]
    return decoded_dataset(_existing(items), lambda image, label: _checked(image, read_cocostuff10k_mat(label), label,
                                                                           182), **options)


# ----------------------------------------------------------------------------------- VOC, folder, synthetic
def _load_voc(config):
    def load(root, split, *, data_dir=None, shuffle=False, seed=None, **options):
        from deeplab_keras.data.voc import load_voc

        if options:
            raise TypeError(f"options {sorted(options)} do not apply to the TFDS VOC builder")
        return load_voc(split, config=config, manual_dir=root, data_dir=data_dir, shuffle_files=shuffle, seed=seed)
    return load


def _load_folder(root, split, **options):
    from deeplab_keras.data.folder import folder_dataset

    return folder_dataset(root, **options)


def _load_synthetic(root, split, *, num_images=50, size=(65, 65), num_classes=4, seed=0, **_):
    from deeplab_keras.data.synthetic import make_synthetic

    return make_synthetic(num_images, size=tuple(size), num_classes=num_classes, seed=seed)


def _info(name, class_names, palette=None, splits=("train", "val"), layout=""):
    return DatasetInfo(name, _tuple(class_names), C.voc_palette() if palette is None else palette,
                       paper=PAPER.get(name, {}), splits=splits, layout=layout)


_REGISTRY = {
    "voc": _Entry(_info("voc", C.VOC_CLASSES, layout="VOC2012/JPEGImages + VOC2012/SegmentationClass"),
                  (("VOC2012",),), _load_voc("voc")),  # the TFDS builder names what is missing inside
    "voc_aug": _Entry(_info("voc_aug", C.VOC_CLASSES, layout="VOC2012/ + benchmark_RELEASE/dataset/cls"),
                      (("VOC2012", "benchmark_RELEASE"),), _load_voc("aug")),
    "cityscapes": _Entry(
        _info("cityscapes", C.CITYSCAPES_CLASSES, C.cityscapes_palette(), ("train", "val", "test"),
              "leftImg8bit/ + gtFine/ (or leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip)"),
        (("leftImg8bit", "gtFine"), _CITYSCAPES_ZIPS), _load_cityscapes),
    "pascal_context": _Entry(
        _info("pascal_context", C.PASCAL_CONTEXT_CLASSES,
              layout="VOC2010/SegmentationClassContext + VOC2010/ImageSets/SegmentationContext (or trainval/*.mat + "
                     "labels.txt + VOC2010/)"),
        (("VOC2010/JPEGImages", "VOC2010/SegmentationClassContext"), ("VOC2010/JPEGImages", "trainval")),
        _load_pascal_context),
    "person_part": _Entry(
        _info("person_part", C.PERSON_PART_CLASSES,
              layout="pascal_person_part_gt/ + pascal_person_part_trainval_list/ + VOC2012/JPEGImages"),
        (("pascal_person_part_gt", "pascal_person_part_trainval_list", "VOC2012/JPEGImages"),), _load_person_part),
    "cocostuff164k": _Entry(
        _info("cocostuff164k", C.COCO_STUFF_CLASSES,
              layout="images/{train2017,val2017} + annotations/{train2017,val2017}"),
        (("images/train2017", "annotations/train2017"), ("images/val2017", "annotations/val2017")),
        _load_cocostuff164k),
    "cocostuff10k": _Entry(
        _info("cocostuff10k", C.COCO_STUFF_CLASSES, splits=("train", "test", "val"),
              layout="images/*.jpg + annotations/*.mat + imageLists/{train,test}.txt"),
        (("images", "annotations", "imageLists"),), _load_cocostuff10k),
    "folder": _Entry(_info("folder", None, layout="images/ + masks/"), (("images",),), _load_folder),
    "synthetic": _Entry(_info("synthetic", None, layout="no root (generated)"), (), _load_synthetic),
}
DATASET_NAMES = tuple(_REGISTRY)
# Detection order: the more specific layouts first (person_part also holds VOC2012/, voc_aug contains voc).
_DETECTION_ORDER = ("person_part", "voc_aug", "voc", "cityscapes", "pascal_context", "cocostuff164k",
                    "cocostuff10k", "folder")


_LOOKED_FOR = ("holds neither VOC2012/ nor images/ (+ masks/: a folder dataset) nor leftImg8bit/ + gtFine/ "
               "(Cityscapes), VOC2010/ (PASCAL-Context), pascal_person_part_gt/, images/ + annotations/ (COCO-Stuff)")


def _entry(name):
    if name not in _REGISTRY:
        raise ValueError(f"dataset {name!r} is not known; use one of {', '.join(DATASET_NAMES)}")
    return _REGISTRY[name]


def _has(root, paths):
    return all(os.path.exists(os.path.join(root, p)) for p in paths)


def matches(name, root):
    """Whether ``root`` holds the layout of dataset ``name``."""
    return any(_has(os.fspath(root), paths) for paths in _entry(name).markers)


def check_root(name, root):
    """``root`` as an absolute path when it holds ``name``'s layout; else a one-line ValueError naming what was
    looked for."""
    entry = _entry(name)
    if not entry.markers:
        return None
    if root is None or not os.path.isdir(os.path.expanduser(os.fspath(root))):
        raise ValueError(f"dataset {name}: root {root!r} is not a folder (it should hold {entry.info.layout})")
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not matches(name, root):
        raise ValueError(f"{root} does not hold the {name} layout: looked for {entry.info.layout}")
    return root


def detect_dataset(root):
    """The registry name whose layout ``root`` holds (the most specific one).

    Raises:
        ValueError: one line naming ``root`` and every layout that was looked for.

    Example:
        >>> detect_dataset("/data/cityscapes")   # doctest: +SKIP
        'cityscapes'
    """
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a folder")
    for name in _DETECTION_ORDER:
        if matches(name, root):
            return name
    raise ValueError(f"{root} matches no dataset layout: it {_LOOKED_FOR}")


def dataset_info(name, root=None):
    """The :class:`DatasetInfo` of dataset ``name`` (for ``folder``, the class names and colours of ``root``'s
    classes.txt / classes.csv when given).

    Example:
        >>> dataset_info("person_part").class_names[:3]
        ('background', 'head', 'torso')
    """
    info = _entry(name).info
    if name == "folder" and root is not None:
        from deeplab_keras.data.folder import read_class_names, read_colour_table

        palette, table = info.palette.copy(), read_colour_table(root)
        if table is not None:
            for colour, index in table[1].items():
                palette[index] = colour
        info = dataclasses.replace(info, class_names=_tuple(read_class_names(root)), palette=palette)
    return info


def load_dataset(name, root=None, split="train", **options):
    """A dataset of the registry as a ``tf.data.Dataset`` of the package's example dicts, un-augmented.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: the folder the release unpacked into (checked against the layout; ignored for ``synthetic``).
        split: a split of the dataset (``dataset_info(name).splits``).
        **options: ``shuffle``, ``seed``, ``skip_bad``, ``num_parallel_calls`` for the file layouts; ``data_dir``
            (TFDS) for voc, voc_aug and the Cityscapes zips; ``num_classes`` etc. for folder; ``num_images``,
            ``size``, ``num_classes``, ``seed`` for synthetic.

    Returns:
        ``tf.data.Dataset`` of ``{"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name": string}``; a bad
        file (undecodable, a label id outside the mapping, a size mismatch) is an error naming it.

    Raises:
        ValueError: an unknown name or split, or a root that does not hold the layout (one line).

    Example:
        >>> ds = load_dataset("person_part", "/data/pascal_person_part", "val")   # doctest: +SKIP
    """
    entry = _entry(name)
    if name not in ("folder", "synthetic"):
        _need_split(entry, split)
    return entry.load(check_root(name, root), split, **options)


__all__ = ["DatasetInfo", "DATASET_NAMES", "PAPER", "load_dataset", "dataset_info", "detect_dataset", "check_root",
           "matches", "cityscapes_train_ids", "read_context_mat", "read_cocostuff10k_mat"]
