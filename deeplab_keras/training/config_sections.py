"""The sections of :class:`~deeplab_keras.training.config.TrainConfig` besides the model: :class:`DataConfig`,
:class:`ScheduleConfig`, :class:`OptimizerConfig` and :class:`RuntimeConfig`.

Each is a frozen dataclass that validates its own fields when built (ValueError naming ``section.key`` and what
is allowed); lists are stored as tuples and written back as lists by ``to_dict``. Defaults are the paper's
ResNet-101 ASPP-L PASCAL VOC 2012 "aug" recipe.

Example:
    >>> ScheduleConfig(steps=20, steps_per_epoch=1000).steps_per_epoch  # a short run is one epoch
    20
    >>> DataConfig(crop_size=[5, 5])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: data.crop_size must be two integers [height, width], each >= 33 (...), got (5, 5)
"""
import dataclasses
import math
import os
import re
from typing import ClassVar, Optional, Tuple, Union

from deeplab_keras.architecture import MIN_INPUT_SIZE
from deeplab_keras.config_base import ConfigBase, is_int, is_number

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")
CLASS_WEIGHTINGS = ("none", "inverse_frequency", "median_frequency")
# data.dataset values: the names of the registry deeplab_keras.data.DATASET_NAMES (not imported here: that
# package imports TFDS) except voc_aug, which a config spells dataset voc + voc_config aug. test_datasets checks.
DATASETS = ("voc", "cityscapes", "pascal_context", "person_part", "cocostuff164k", "cocostuff10k", "folder",
            "synthetic")
ROOT_DATASETS = DATASETS[1:6]  # the registry datasets read from data.root


def _is_size(value, low):
    """[height, width]: two integers >= ``low``."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) and v >= low for v in value)


def data_source(path, dataset=None):
    """Resolves the CLIs' shared ``--data PATH|synthetic`` (and ``--dataset NAME``): ("synthetic", None) or
    (registry name, folder) of the layout the folder holds (detected, or checked against ``dataset``; see
    :func:`deeplab_keras.data.detect_dataset`).

    Raises:
        ValueError: ``path`` is neither 'synthetic' nor a folder holding a known layout (or ``dataset``'s): one line
            naming it and what was looked for.
    """
    if str(path) == "synthetic":
        if dataset not in (None, "synthetic"):
            raise ValueError(f"--data synthetic does not go with --dataset {dataset}; give the folder of {dataset}")
        return "synthetic", None
    folder = os.path.expanduser(str(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--data {str(path)!r} is neither 'synthetic' nor an existing folder")
    from deeplab_keras.data.datasets import check_root, detect_dataset

    if dataset is None:
        return detect_dataset(folder), folder
    check_root(dataset, folder)
    return dataset, folder


@dataclasses.dataclass(frozen=True)
class DataConfig(ConfigBase):
    """The training and validation data and the input pipeline.

    Args:
        dataset: "voc" (TFDS builder over ``manual_dir``), "synthetic", "folder" (``folder`` / ``val_folder``), or
            "cityscapes", "pascal_context", "person_part", "cocostuff164k", "cocostuff10k" (under ``root``).
        voc_config: TFDS config of the VOC builder ("aug" = train + SBD, or "voc").
        train_split, val_split: split names for "voc".
        manual_dir: folder holding ``VOC2012/`` (and ``benchmark_RELEASE/`` for "aug"); data_dir: TFDS data_dir.
        root: the folder cityscapes, pascal_context, person_part, cocostuff164k or cocostuff10k unpacked into
            (read through :func:`deeplab_keras.data.load_dataset`).
        folder, val_folder: roots of folder datasets (images/ + masks/).
        synthetic_images, synthetic_val_images, synthetic_size: the synthetic train / held-out splits.
        crop_size: training crop [H, W]; scale_range: random scaling [min, max] (None: none); flip: random flips.
        batch_size: global batch size (split across replicas); shuffle_buffer: examples in the shuffle buffer.
        val_batch_size: validation batch size (full-size images of different sizes need 1).
        val_crop_size: pad validation images to this size (needed for val_batch_size > 1); None: full size.
        ignore_label: label value ignored by the loss and the metrics.
    """

    SECTION: ClassVar[str] = "data"
    dataset: str = "voc"
    voc_config: str = "aug"
    train_split: str = "train"
    val_split: str = "val"
    manual_dir: Optional[str] = None
    data_dir: Optional[str] = None
    root: Optional[str] = None
    folder: Optional[str] = None
    val_folder: Optional[str] = None
    synthetic_images: int = 200
    synthetic_val_images: int = 50
    synthetic_size: Tuple[int, ...] = (97, 97)
    crop_size: Tuple[int, ...] = (321, 321)
    scale_range: Optional[Tuple[float, ...]] = (0.5, 1.5)
    flip: bool = True
    batch_size: int = 10
    shuffle_buffer: int = 256
    val_batch_size: int = 1
    val_crop_size: Optional[Tuple[int, ...]] = None
    ignore_label: int = 255

    def validate(self):
        self._need(self.dataset in DATASETS, "dataset", f"one of {DATASETS}")
        self._strings(False, "voc_config", "train_split", "val_split")
        self._strings(True, "manual_dir", "data_dir", "root", "folder", "val_folder")
        self._ints(1, "synthetic_images", "batch_size", "shuffle_buffer", "val_batch_size")
        self._ints(0, "synthetic_val_images")
        self._bools("flip")
        self._ints(0, "ignore_label", high=255)
        self._need(_is_size(self.crop_size, MIN_INPUT_SIZE), "crop_size", f"two integers [height, width], each >= "
                   f"{MIN_INPUT_SIZE} (e.g. data.crop_size=321,321)")
        self._need(self.val_crop_size is None or _is_size(self.val_crop_size, MIN_INPUT_SIZE), "val_crop_size",
                   f"null or two integers [height, width], each >= {MIN_INPUT_SIZE}")
        self._need(_is_size(self.synthetic_size, 1), "synthetic_size",
                   "two positive integers [height, width] (e.g. data.synthetic_size=97,97)")
        s = self.scale_range
        self._need(s is None or isinstance(s, tuple) and len(s) == 2 and all(is_number(v) and v > 0 for v in s)
                   and s[0] <= s[1], "scale_range", "null or [min, max] with 0 < min <= max (e.g. 0.5,1.5)")

    @staticmethod
    def dataset_fields(name):
        """The DataConfig fields of ``--dataset NAME`` (a registry name; voc_aug is voc + voc_config aug).

        Example:
            >>> DataConfig.dataset_fields("voc_aug")
            {'dataset': 'voc', 'voc_config': 'aug'}
        """
        if name in ("voc", "voc_aug"):
            return {"dataset": "voc", "voc_config": "aug" if name == "voc_aug" else "voc"}
        if name not in DATASETS:
            raise ValueError(f"--dataset {name!r} is not known; use one of voc, voc_aug, {', '.join(DATASETS[1:])}")
        return {"dataset": name}

    @staticmethod
    def fields_for(path, voc_config="aug"):
        """The DataConfig fields that ``--data PATH|synthetic`` sets (see :func:`data_source`); ``path`` may be a
        (``--dataset`` name, ``--data`` path) pair, whose layout is then checked rather than detected.

        Raises:
            ValueError: not 'synthetic' nor a data folder; a VOC folder without the SBD (``benchmark_RELEASE/``)
                that ``voc_config`` "aug" needs.

        Example:
            >>> DataConfig.fields_for("synthetic")
            {'dataset': 'synthetic'}
        """
        dataset, path = path if isinstance(path, tuple) else (None, path)
        fields = DataConfig.dataset_fields(dataset) if dataset else {}
        kind, folder = data_source(path, dataset)
        if kind in ("voc", "voc_aug"):
            if fields.get("voc_config", voc_config) == "aug" and not os.path.isdir(
                    os.path.join(folder, "benchmark_RELEASE")):
                raise ValueError(f"--data {folder!r} holds VOC2012/ but not benchmark_RELEASE/ (SBD), which "
                                 "data.voc_config=aug trains on; add it, or --set data.voc_config=voc")
            return {**fields, "dataset": "voc", "manual_dir": folder}
        if kind == "folder":
            return {"dataset": kind, "folder": folder}
        return {"dataset": kind, "root": folder} if kind in ROOT_DATASETS else {"dataset": kind}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(ConfigBase):
    """How long to train, and when to checkpoint and validate.

    Args:
        steps: total optimizer steps (the poly schedule's horizon).
        steps_per_epoch: steps per Keras epoch: the granularity of resume, logging and validation; ``steps`` must
            be a multiple of it (when ``steps`` is smaller, the run is one epoch of ``steps``).
        checkpoint_every: save ``checkpoints/ckpt-<step>.keras`` every this many steps (0: only at the end).
        keep_checkpoints: how many ``ckpt-*.keras`` to keep (0: all).
        validation_every: validate every this many epochs (0: never).
        validation_steps: batches per validation (None: the whole validation split).
    """

    SECTION: ClassVar[str] = "schedule"
    steps: int = 20000
    steps_per_epoch: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 5
    validation_every: int = 1
    validation_steps: Optional[int] = None

    def __post_init__(self):
        if is_int(self.steps) and is_int(self.steps_per_epoch) and 0 < self.steps < self.steps_per_epoch:
            object.__setattr__(self, "steps_per_epoch", self.steps)  # a short run is one epoch
        super().__post_init__()

    def validate(self):
        self._ints(1, "steps", "steps_per_epoch")
        self._ints(0, "checkpoint_every", "keep_checkpoints", "validation_every")
        self._need(self.steps % self.steps_per_epoch == 0, "steps",
                   f"a multiple of schedule.steps_per_epoch ({self.steps_per_epoch})")
        self._need(self.validation_steps is None or is_int(self.validation_steps) and self.validation_steps >= 1,
                   "validation_steps", "a positive integer or null")

    @property
    def epochs(self):
        return self.steps // self.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(ConfigBase):
    """The recipe: initial weights, SGD on the poly schedule, LR multipliers, weight decay, batch norm, loss.

    Args:
        init_weights: initial weights passed to ``ModelConfig.build`` ("imagenet", a file, or None: random).
        base_lr: base learning rate; None picks 2.5e-4 (ResNet) or 1e-3 (VGG-16).
        lr_power, end_lr: poly schedule power and final learning rate.
        momentum: SGD momentum.
        weight_decay: L2 factor on convolution kernels (Caffe convention: gradient ``weight_decay * kernel``).
        classifier_lr_mult: LR multiplier of the classifier (ASPP / fc8) variables.
        bias_lr_mult: extra LR multiplier of biases (Caffe's lr_mult 2 for biases).
        classifier_pattern: regex on ``variable.path`` selecting the classifier variables; None: the model's
            logit layers (``deeplab_keras.models.deeplab.CLASSIFIER_PATTERN``, the prototxts' ``lr_mult: 10``).
        train_bn: train batch normalisation (default frozen).
        bn_momentum: with ``train_bn``, the moving-statistics momentum (None: the model's, 0.99).
        upsample_logits: upsample logits to the labels (True) or downsample labels to the logits (False).
        class_weights: per-class loss weights: None ("none"), "inverse_frequency", "median_frequency" (from the
            training set's class frequencies, counted once into the run dir's ``class_frequencies.json``), or a list
            [w0, w1, ...] of num_classes weights (see ``deeplab_keras.training.losses.class_weights_from``).
        accumulation_steps: K batches of ``data.batch_size`` per optimizer update (Caffe's ``iter_size``: the
            update of one batch of K x ``data.batch_size`` with frozen batch norm, one batch's memory);
            ``schedule.steps``, checkpoints and the poly schedule count updates.
    """

    SECTION: ClassVar[str] = "optimizer"
    init_weights: Optional[str] = None
    base_lr: Optional[float] = None
    lr_power: float = 0.9
    end_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    classifier_lr_mult: float = 10.0
    bias_lr_mult: float = 2.0
    classifier_pattern: Optional[str] = None
    train_bn: bool = False
    bn_momentum: Optional[float] = None
    upsample_logits: bool = True
    class_weights: Optional[Union[str, Tuple[float, ...]]] = None
    accumulation_steps: int = 1

    def validate(self):
        self._strings(True, "init_weights", "classifier_pattern")
        self._numbers(0, "lr_power", "end_lr", "momentum", "weight_decay", "classifier_lr_mult", "bias_lr_mult")
        self._need(self.base_lr is None or is_number(self.base_lr) and math.isfinite(self.base_lr) and
                   self.base_lr > 0, "base_lr", "> 0 or null")
        self._need(self.bn_momentum is None or is_number(self.bn_momentum) and 0 <= self.bn_momentum < 1,
                   "bn_momentum", "in [0, 1) or null")
        self._bools("train_bn", "upsample_logits")
        self._ints(1, "accumulation_steps")
        w = self.class_weights
        self._need(w is None or w in CLASS_WEIGHTINGS or isinstance(w, tuple) and len(w) > 0 and all(
            is_number(v) and math.isfinite(v) and v >= 0 for v in w) and any(v > 0 for v in w), "class_weights",
            f"one of {CLASS_WEIGHTINGS} or a list of num_classes weights >= 0 (e.g. [1, 2.5, 1])")
        if self.classifier_pattern is not None:
            try:
                re.compile(self.classifier_pattern)
            except re.error as e:
                raise ValueError(f"optimizer.classifier_pattern is not a valid regex: {e}") from None

    def learning_rate(self, backbone):
        """``base_lr``, or the paper's for ``backbone`` when it is None (1e-3 VGG-16, 2.5e-4 ResNet)."""
        if self.base_lr is not None:
            return float(self.base_lr)
        return 1e-3 if str(backbone).startswith("vgg") else 2.5e-4


@dataclasses.dataclass(frozen=True)
class RuntimeConfig(ConfigBase):
    """Where and how the run executes: run directory, seed, precision, distribution, logging.

    Args:
        run_dir: output folder (checkpoints, logs, history); reusing it resumes an interrupted run.
        seed: seeds weights init, data order and augmentation.
        deterministic: enable TF op determinism (bit-exact resume / reruns; slower on GPU).
        precision: None/"float32", "mixed_float16" (with dynamic loss scaling) or "mixed_bfloat16".
        strategy: "default", "one_device", "mirrored", "multi_worker" (reads TF_CONFIG) or "tpu".
        devices: devices for "mirrored" / "one_device" (None: all visible / the first).
        virtual_cpus: split the first CPU into this many logical devices first (tests; 0: off).
        tpu: TPU name or address for "tpu" (None: the local TPU).
        tensorboard, plot: write TensorBoard logs / the history PNG.
        verbose: Keras fit verbosity (1: progress bar, 2: one line per epoch, 0: silent).
    """

    SECTION: ClassVar[str] = "runtime"
    run_dir: str = "runs/deeplab"
    seed: int = 0
    deterministic: bool = False
    precision: Optional[str] = None
    strategy: str = "default"
    devices: Optional[Tuple[str, ...]] = None
    virtual_cpus: int = 0
    tpu: Optional[str] = None
    tensorboard: bool = True
    plot: bool = True
    verbose: Union[int, str] = 1

    def validate(self):
        self._need(isinstance(self.run_dir, str) and self.run_dir.strip() != "", "run_dir", "a folder path")
        self._ints(0, "seed", "virtual_cpus")
        self._bools("deterministic", "tensorboard", "plot")
        self._need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        self._need(self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}")
        self._need(self.devices is None or isinstance(self.devices, tuple) and
                   all(isinstance(d, str) and re.search(r"(cpu|gpu|tpu):\d+$", d, re.I) for d in self.devices),
                   "devices", "a list of device names (e.g. /gpu:0,/gpu:1) or null")
        self._strings(True, "tpu")
        self._need(self.verbose in (0, 1, 2, "auto") and not isinstance(self.verbose, bool), "verbose",
                   "0, 1, 2 or auto")

    @property
    def mixed(self):
        """True for a mixed-precision policy (the model is trained in float16 / bfloat16)."""
        return self.precision not in (None, "float32")
