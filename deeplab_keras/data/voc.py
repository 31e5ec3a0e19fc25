"""PASCAL VOC 2012 segmentation (+ SBD "aug") as a TFDS builder that reads a VOCdevkit already on disk.

Importing this module registers the TFDS dataset ``voc2012_segmentation`` with two configs:

* ``voc``: the official ``train`` (1,464) / ``val`` (1,449) lists of ``VOC2012/ImageSets/Segmentation``.
* ``aug`` (alias ``train_aug``): ``train`` = VOC train + every SBD image (``benchmark_RELEASE/dataset/cls/*.mat``,
  ``GTcls.Segmentation``) minus VOC val (10,582 images with the full data); ``val`` = VOC val. An image that has
  a VOC ``SegmentationClass`` PNG uses that label (it has the 255 boundary band), the others the SBD one.

Features: ``image`` uint8 [H, W, 3] (the original JPEG bytes are stored), ``label`` uint8 [H, W] (palette
indices 0..20, 255 = ignore, read with PIL in 'P' mode, never the RGB colours), ``file_name`` (``2007_000032.jpg``).
Nothing is downloaded: ``manual_dir`` must hold ``VOC2012/`` (and ``benchmark_RELEASE/`` for ``aug``).

Example:
    >>> from deeplab_keras.data import load_voc
    >>> ds = load_voc("train", config="voc", manual_dir="/data/VOCdevkit", data_dir="/data/tfds")  # doctest: +SKIP
"""
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from deeplab_keras.data.reader import (BadDataError, check_label, logger, read_image_rgb, read_index_png,
                                       read_split_ids)
from deeplab_keras.files import atomic_write_bytes

NUM_CLASSES = 21
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = ("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
           "benchmark.tgz")

_INSTRUCTIONS = f"""\
Put the data in `manual_dir` (nothing is downloaded):
  <manual_dir>/VOC2012/JPEGImages/*.jpg
  <manual_dir>/VOC2012/SegmentationClass/*.png          (palette-indexed label PNGs)
  <manual_dir>/VOC2012/ImageSets/Segmentation/train.txt, val.txt
    -> download {VOC_URL} and extract it; its `VOCdevkit/` folder is a valid manual_dir.
  for the `aug` (train_aug) config also:
  <manual_dir>/benchmark_RELEASE/dataset/cls/*.mat      (SBD, GTcls.Segmentation)
    -> download {SBD_URL} and extract it into manual_dir (or symlink benchmark_RELEASE there).
"""

_SOURCE_FILE = "deeplab_keras_source.json"


def check_manual_dir(manual_dir, config="voc"):
    """Checks that ``manual_dir`` has the layout ``config`` needs; returns its absolute path.

    Args:
        manual_dir: the folder that holds ``VOC2012/`` (and ``benchmark_RELEASE/`` for ``aug``).
        config: ``"voc"`` or ``"aug"``.

    Raises:
        FileNotFoundError: saying which path is missing and where to put what.
    """
    if manual_dir is None:
        raise FileNotFoundError("manual_dir is None: pass manual_dir=<folder that holds VOC2012/>.\n" +
                                _INSTRUCTIONS)
    root = os.path.abspath(os.fspath(manual_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"manual_dir {root} does not exist.\n" + _INSTRUCTIONS)
    if os.path.isdir(os.path.join(root, "JPEGImages")) and not os.path.isdir(os.path.join(root, "VOC2012")):
        raise FileNotFoundError(f"manual_dir {root} looks like the VOC2012 folder itself; pass its parent "
                                f"({os.path.dirname(root)}) as manual_dir.\n" + _INSTRUCTIONS)
    needed = [os.path.join(root, "VOC2012", p) for p in
              ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt",
               "ImageSets/Segmentation/val.txt")]
    if config == "aug":
        needed.append(os.path.join(root, "benchmark_RELEASE", "dataset", "cls"))
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"manual_dir {root} is missing {', '.join(missing)} (config {config!r}).\n" +
                                _INSTRUCTIONS)
    return root


def read_sbd_mat(path):
    """Reads ``GTcls.Segmentation`` (uint8 [H, W], values 0..20) from an SBD ``cls/*.mat`` file.

    Raises:
        BadDataError: naming ``path`` when the file is unreadable or has no ``GTcls.Segmentation``.
    """
    import scipy.io
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False, variable_names=["GTcls"])
        seg = mat["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise BadDataError(f"{path}: cannot read GTcls.Segmentation from the SBD .mat file ({e!r})") from e
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise BadDataError(f"{path}: GTcls.Segmentation has shape {seg.shape}; expected [H, W]")
    if seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
        raise BadDataError(f"{path}: GTcls.Segmentation values outside 0..255")
    return seg.astype(np.uint8)


class Voc2012SegmentationConfig(tfds.core.BuilderConfig):
    """A config of voc2012_segmentation: ``use_sbd`` adds the SBD images to ``train``."""

    def __init__(self, *, use_sbd=False, **kwargs):
        super().__init__(**kwargs)
        self.use_sbd = use_sbd


class Voc2012Segmentation(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 semantic segmentation (+ SBD aug) from a VOCdevkit on disk (``manual_dir``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "VOC 2012 train/val and VOC train + SBD (aug) from manual_dir."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [
        Voc2012SegmentationConfig(name="voc", description="Official VOC 2012 train / val segmentation lists."),
        Voc2012SegmentationConfig(
            name="aug", use_sbd=True,
            description="train = VOC train + SBD cls (GTcls.Segmentation) minus VOC val (train_aug); val = VOC val."),
    ]

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.ZLIB),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        )

    def _split_generators(self, dl_manager):
        try:
            root = dl_manager.manual_dir
        except AssertionError as e:
            raise FileNotFoundError(f"{e}\n{_INSTRUCTIONS}") from None
        root = check_manual_dir(root, self.builder_config.name)
        voc = os.path.join(root, "VOC2012")
        lists = os.path.join(voc, "ImageSets", "Segmentation")
        train, val = read_split_ids(os.path.join(lists, "train.txt")), read_split_ids(os.path.join(lists, "val.txt"))
        if self.builder_config.use_sbd:
            cls_dir = os.path.join(root, "benchmark_RELEASE", "dataset", "cls")
            sbd = sorted(f[:-4] for f in os.listdir(cls_dir) if f.endswith(".mat"))
            if not sbd:
                raise FileNotFoundError(f"{cls_dir} holds no .mat files.\n{_INSTRUCTIONS}")
            val_set = set(val)
            train = sorted((set(train) | set(sbd)) - val_set)
        return {"train": self._generate_examples(root, train), "val": self._generate_examples(root, val)}

    def _generate_examples(self, root, ids):
        voc = os.path.join(root, "VOC2012")
        sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
        for image_id in ids:
            image_path = os.path.join(voc, "JPEGImages", image_id + ".jpg")
            if not os.path.exists(image_path) and self.builder_config.use_sbd:
                image_path = os.path.join(sbd, "img", image_id + ".jpg")
            if not os.path.exists(image_path):
                raise FileNotFoundError(f"{image_path}: image of {image_id!r} (listed in the split) is missing; "
                                        "restore it or remove the id from the list")
            png = os.path.join(voc, "SegmentationClass", image_id + ".png")
            if os.path.exists(png):
                label_path, label = png, read_index_png(png)
            elif self.builder_config.use_sbd:
                label_path = os.path.join(sbd, "cls", image_id + ".mat")
                if not os.path.exists(label_path):
                    raise FileNotFoundError(f"no label for {image_id!r}: neither {png} nor {label_path} exists")
                label = read_sbd_mat(label_path)
            else:
                raise FileNotFoundError(f"{png}: label of {image_id!r} (listed in the split) is missing")
            image = read_image_rgb(image_path)  # full decode: catches truncated files now, not during training
            check_label(label, NUM_CLASSES, f"{label_path} (image {image_path})", image.shape)
            yield image_id, {"image": image_path, "label": label, "file_name": image_id + ".jpg"}


_CONFIG_ALIASES = {"train_aug": "aug", "voc": "voc", "aug": "aug"}


def load_voc(split="train", config="voc", manual_dir=None, data_dir=None, *, shuffle_files=False, seed=None,
             overwrite=False):
    """Loads VOC 2012 segmentation (``voc``) or VOC + SBD (``aug``), preparing the TFDS records when needed.

    Args:
        split: ``"train"`` or ``"val"``; ``"train_aug"`` means config ``aug``, split ``train``.
        config: ``"voc"`` or ``"aug"`` (``"train_aug"`` is accepted as a name of ``aug``).
        manual_dir: folder that holds ``VOC2012/`` (and ``benchmark_RELEASE/`` for ``aug``); needed the first
            time (to prepare), optional afterwards.
        data_dir: TFDS data folder for the prepared records (TFDS default: ``~/tensorflow_datasets``).
        shuffle_files: shuffle the order of the record files (training).
        seed: seed of the file shuffle.
        overwrite: re-prepare even if prepared records exist (e.g. after moving to the full VOCdevkit).

    Returns:
        ``tf.data.Dataset`` of dicts ``{"image": uint8 [H, W, 3], "label": uint8 [H, W], "file_name": string}``.

    Raises:
        FileNotFoundError: the records are not prepared and ``manual_dir`` is missing or incomplete.
        ValueError: an unknown split/config, or records prepared from a different ``manual_dir``.
    """
    if split == "train_aug":
        split, config = "train", "aug"
    if config not in _CONFIG_ALIASES:
        raise ValueError(f"config={config!r}: expected 'voc' or 'aug' (alias 'train_aug')")
    config = _CONFIG_ALIASES[config]
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: expected 'train', 'val' or 'train_aug'")
    builder = Voc2012Segmentation(config=config, data_dir=data_dir)
    source_file = os.path.join(os.fspath(builder.data_dir), _SOURCE_FILE)
    wanted = None if manual_dir is None else os.path.abspath(os.fspath(manual_dir))
    if overwrite or not builder.is_prepared():
        if wanted is None:
            raise FileNotFoundError(
                f"voc2012_segmentation/{config} is not prepared in {builder.data_dir}; pass manual_dir=<folder "
                "that holds VOC2012/> to prepare it.\n" + _INSTRUCTIONS)
        check_manual_dir(wanted, config)
        mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite
                else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
        logger.info("preparing voc2012_segmentation/%s from %s into %s", config, wanted, builder.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=wanted, download_mode=mode))
        atomic_write_bytes(source_file, json.dumps({"manual_dir": wanted}).encode())
    elif wanted is not None and os.path.exists(source_file):
        with open(source_file) as f:
            prepared_from = json.load(f).get("manual_dir")
        if prepared_from != wanted:
            raise ValueError(
                f"voc2012_segmentation/{config} in {builder.data_dir} was prepared from {prepared_from}, not "
                f"manual_dir={wanted}; pass overwrite=True to re-prepare, or use another data_dir")
    return builder.as_dataset(split=split, shuffle_files=shuffle_files,
                              read_config=tfds.ReadConfig(shuffle_seed=seed))


def voc_split_ids(manual_dir, split):
    """The ids of an official VOC split list (``train``/``val``/``trainval``) under ``manual_dir``."""
    root = check_manual_dir(manual_dir, "voc")
    return read_split_ids(os.path.join(root, "VOC2012", "ImageSets", "Segmentation", split + ".txt"))


__all__ = ["Voc2012Segmentation", "load_voc", "check_manual_dir", "read_sbd_mat", "voc_split_ids", "NUM_CLASSES"]
