"""The training configuration: :class:`TrainConfig` (defaults, validation) and :func:`load_config` (YAML).

Example:
    >>> from deeplab_keras.training.config import load_config
    >>> load_config("tiny_cpu", ["steps=20"]).steps
    20
"""
import dataclasses
import os
import re
from typing import Any, Optional

import numpy as np

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")
DATASETS = ("voc", "synthetic", "folder")
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # deeplab_keras/ (configs/)


@dataclasses.dataclass
class TrainConfig:
    """Everything ``train`` needs. Defaults are the paper's ResNet-101 ASPP-L VOC 2012 "aug" recipe.

    Args:
        run_dir: output folder (checkpoints, logs, history); reusing it resumes an interrupted run.
        seed: seeds weights init, data order and augmentation.
        deterministic: enable TF op determinism (bit-exact resume / reruns; slower on GPU).
        num_classes, backbone, output_stride, aspp, msc_scales, weights, width_multiplier, stage_blocks:
            passed to ``dk.DeepLabV2``.
        dataset: "voc" (TFDS builder over ``manual_dir``), "synthetic" or "folder" (``folder`` / ``val_folder``).
        voc_config: TFDS config of the VOC builder ("aug" = train + SBD, or "voc").
        train_split, val_split: split names for "voc" ("train", "val").
        manual_dir, data_dir: VOC ``manual_dir`` (holds ``VOC2012/`` and ``benchmark_RELEASE/``) and the TFDS
            data_dir.
        folder, val_folder: roots of folder datasets (images/ + masks/).
        synthetic_images, synthetic_val_images, synthetic_size: size of the synthetic train / held-out splits.
        crop_size: training crop (H, W).
        scale_range: random scale range of the augmentation ([0.5, 1.5] as the paper; None: no scaling).
        flip: random horizontal flips.
        batch_size: global batch size (split across replicas).
        shuffle_buffer: examples in the shuffle buffer of the raw dataset.
        steps: total optimizer steps (the poly schedule's horizon).
        steps_per_epoch: steps per Keras epoch: the granularity of resume, logging and validation; ``steps``
            must be a multiple of it (when ``steps`` is smaller, the run is one epoch of ``steps``).
        checkpoint_every: save ``checkpoints/ckpt-<step>.keras`` every this many steps (0: only at the end).
        keep_checkpoints: how many ``ckpt-*.keras`` to keep (0: all).
        validation_every: validate every this many epochs (0: never).
        validation_steps: batches per validation (None: the whole validation split).
        val_batch_size: validation batch size (full-size images of different sizes need 1).
        val_crop_size: pad validation images to this size (needed for val_batch_size > 1); None: full size.
        base_lr: base learning rate; None picks 2.5e-4 (ResNet) or 1e-3 (VGG-16).
        lr_power, end_lr: poly schedule power and final learning rate.
        momentum: SGD momentum.
        weight_decay: L2 factor on convolution kernels (Caffe convention, see module docstring).
        classifier_lr_mult: LR multiplier of the classifier (ASPP / fc8) variables.
        bias_lr_mult: extra LR multiplier of biases (Caffe's lr_mult 2 for biases).
        classifier_pattern: regex on ``variable.path`` selecting the classifier variables: by default the
            layers that output the logits (ResNet ASPP branches ``aspp/aspp_r<rate>_conv``, VGG ``fc8``),
            which are the ``lr_mult: 10`` layers of the released prototxts.
        train_bn: train batch normalisation (default frozen).
        bn_momentum: with ``train_bn``, the moving-statistics momentum to use (None: the model's, 0.99); a
            lower value (e.g. 0.9) makes the inference statistics follow fast-changing weights (short runs
            from scratch).
        upsample_logits: upsample logits to the labels (True) or downsample labels to the logits (False).
        ignore_label: label value ignored by the loss and the metrics.
        mixed_precision: None/"float32", "mixed_float16" (with dynamic loss scaling) or "mixed_bfloat16".
        strategy: "default", "one_device", "mirrored", "multi_worker" (reads TF_CONFIG) or "tpu".
        devices: devices for "mirrored" / "one_device" (None: all visible / the first).
        virtual_cpus: split the first CPU into this many logical devices first (tests; 0: off).
        tpu: TPU name or address for "tpu" (None: the local TPU).
        tensorboard, plot: write TensorBoard logs / the history PNG.
        verbose: Keras fit verbosity (1: progress bar, 2: one line per epoch, 0: silent).
    """

    run_dir: str = "runs/deeplab"
    seed: int = 0
    deterministic: bool = False
    # model
    num_classes: int = 21
    backbone: str = "resnet101"
    output_stride: int = 8
    aspp: Any = "L"
    msc_scales: Optional[list] = None
    weights: Optional[str] = None
    width_multiplier: float = 1.0
    stage_blocks: Optional[list] = None
    # data
    dataset: str = "voc"
    voc_config: str = "aug"
    train_split: str = "train"
    val_split: str = "val"
    manual_dir: Optional[str] = None
    data_dir: Optional[str] = None
    folder: Optional[str] = None
    val_folder: Optional[str] = None
    synthetic_images: int = 200
    synthetic_val_images: int = 50
    synthetic_size: list = dataclasses.field(default_factory=lambda: [97, 97])
    crop_size: list = dataclasses.field(default_factory=lambda: [321, 321])
    scale_range: Optional[list] = dataclasses.field(default_factory=lambda: [0.5, 1.5])
    flip: bool = True
    batch_size: int = 10
    shuffle_buffer: int = 256
    # schedule
    steps: int = 20000
    steps_per_epoch: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 5
    validation_every: int = 1
    validation_steps: Optional[int] = None
    val_batch_size: int = 1
    val_crop_size: Optional[list] = None
    # optimisation
    base_lr: Optional[float] = None
    lr_power: float = 0.9
    end_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    classifier_lr_mult: float = 10.0
    bias_lr_mult: float = 2.0
    classifier_pattern: str = r"(^|/)(aspp_r\d+_conv|fc8[^/]*)/"
    train_bn: bool = False
    bn_momentum: Optional[float] = None
    upsample_logits: bool = True
    ignore_label: int = 255
    # precision / distribution
    mixed_precision: Optional[str] = None
    strategy: str = "default"
    devices: Optional[list] = None
    virtual_cpus: int = 0
    tpu: Optional[str] = None
    # logging
    tensorboard: bool = True
    plot: bool = True
    verbose: int = 1

    _FLOAT_FIELDS = ("width_multiplier", "bn_momentum", "base_lr", "lr_power", "end_lr", "momentum", "weight_decay",
                     "classifier_lr_mult", "bias_lr_mult")

    def __post_init__(self):
        for name in self._FLOAT_FIELDS:  # YAML 1.1 reads "1e-3" (no dot) as a string
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"TrainConfig: {name} must be a number, got {value!r}") from None
        if isinstance(self.steps, int) and isinstance(self.steps_per_epoch, int) and \
                0 < self.steps < self.steps_per_epoch:
            self.steps_per_epoch = self.steps  # a short run is one epoch
        self.validate()

    @property
    def epochs(self):
        return self.steps // self.steps_per_epoch

    @property
    def resolved_base_lr(self):
        if self.base_lr is not None:
            return float(self.base_lr)
        return 1e-3 if str(self.backbone).startswith("vgg") else 2.5e-4

    def validate(self):
        """Raises ValueError (never another exception) naming the bad field and what is allowed."""
        def need(cond, msg):
            if not cond:
                raise ValueError(f"TrainConfig: {msg}")

        def integer(name, low):
            value = getattr(self, name)
            need(_is_int(value) and value >= low, f"{name} must be an integer >= {low}, got {value!r}")

        def number(name, low=None):
            value = getattr(self, name)
            need(_is_number(value) and np.isfinite(value) and (low is None or value >= low),
                 f"{name} must be a number{'' if low is None else f' >= {low}'}, got {value!r}")

        def optional(name, kind):
            value = getattr(self, name)
            need(value is None or isinstance(value, kind), f"{name} must be a {kind.__name__} or null, "
                 f"got {value!r}")

        for name in ("steps", "steps_per_epoch", "batch_size", "val_batch_size", "shuffle_buffer",
                     "synthetic_images"):
            integer(name, 1)
        for name in ("seed", "checkpoint_every", "keep_checkpoints", "validation_every", "virtual_cpus",
                     "synthetic_val_images"):
            integer(name, 0)
        need(self.steps % self.steps_per_epoch == 0,
             f"steps ({self.steps}) must be a multiple of steps_per_epoch ({self.steps_per_epoch})")
        need(self.validation_steps is None or _is_int(self.validation_steps) and self.validation_steps >= 1,
             f"validation_steps must be a positive integer or null, got {self.validation_steps!r}")
        integer("ignore_label", 0)
        need(self.ignore_label <= 255, f"ignore_label must be in 0..255, got {self.ignore_label!r}")
        need(_is_int(self.num_classes) and 1 <= self.num_classes <= 255,
             f"num_classes must be an integer in 1..255 (labels are uint8), got {self.num_classes!r}")
        for name in ("deterministic", "flip", "train_bn", "upsample_logits", "tensorboard", "plot"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(self.verbose in (0, 1, 2, "auto") and not isinstance(self.verbose, bool),
             f"verbose must be 0, 1, 2 or auto, got {self.verbose!r}")
        need(isinstance(self.run_dir, str) and self.run_dir.strip() != "",
             f"run_dir must be a folder path, got {self.run_dir!r}")
        for name in ("weights", "manual_dir", "data_dir", "folder", "val_folder", "tpu"):
            optional(name, str)
        for name in ("voc_config", "train_split", "val_split", "classifier_pattern"):
            need(isinstance(getattr(self, name), str), f"{name} must be a string, got {getattr(self, name)!r}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(self.mixed_precision in PRECISIONS,
             f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        need(self.devices is None or isinstance(self.devices, list) and all(isinstance(d, str) for d in self.devices),
             f"devices must be a list of device names (e.g. [/gpu:0, /gpu:1]) or null, got {self.devices!r}")
        from deeplab_keras.models.deeplab import MIN_INPUT_SIZE

        need(_is_size(self.crop_size, MIN_INPUT_SIZE), f"crop_size must be two integers [height, width], each >= "
             f"{MIN_INPUT_SIZE} (e.g. --crop_size 321 321), got {self.crop_size!r}")
        need(self.val_crop_size is None or _is_size(self.val_crop_size, MIN_INPUT_SIZE),
             f"val_crop_size must be null or two integers [height, width], each >= {MIN_INPUT_SIZE}, "
             f"got {self.val_crop_size!r}")
        need(_is_size(self.synthetic_size, 1), f"synthetic_size must be two positive integers [height, width] "
             f"(e.g. --synthetic_size 97 97), got {self.synthetic_size!r}")
        need(self.scale_range is None or isinstance(self.scale_range, (list, tuple)) and len(self.scale_range) == 2
             and all(_is_number(s) and s > 0 for s in self.scale_range) and self.scale_range[0] <= self.scale_range[1],
             f"scale_range must be null or [min, max] with 0 < min <= max (e.g. [0.5, 1.5]), got {self.scale_range!r}")
        for name in ("weight_decay", "classifier_lr_mult", "bias_lr_mult", "momentum", "end_lr", "lr_power"):
            number(name, 0)
        number("width_multiplier")
        need(self.base_lr is None or _is_number(self.base_lr) and np.isfinite(self.base_lr) and self.base_lr > 0,
             f"base_lr must be > 0 or null, got {self.base_lr!r}")
        need(self.bn_momentum is None or _is_number(self.bn_momentum) and 0 <= self.bn_momentum < 1,
             f"bn_momentum must be in [0, 1) or null, got {self.bn_momentum!r}")
        try:
            re.compile(self.classifier_pattern)
        except re.error as e:
            raise ValueError(f"TrainConfig: classifier_pattern is not a valid regex: {e}") from None
        from deeplab_keras.models.deeplab import _check_args

        need(self.aspp is None or isinstance(self.aspp, (str, list, tuple)),
             f"aspp must be L, S, largefov or a list of rates, got {self.aspp!r}")
        need(self.msc_scales is None or isinstance(self.msc_scales, (list, tuple)) and
             all(_is_number(m) for m in self.msc_scales),
             f"msc_scales must be null or a list of scales (e.g. [1.0, 0.75, 0.5]), got {self.msc_scales!r}")
        need(self.stage_blocks is None or isinstance(self.stage_blocks, (list, tuple)) and
             all(_is_int(b) for b in self.stage_blocks),
             f"stage_blocks must be null or 4 block counts (e.g. [3, 4, 23, 3]), got {self.stage_blocks!r}")
        try:
            _check_args(self.num_classes, self.backbone, self.output_stride, self.aspp, self.msc_scales,
                        self.width_multiplier, self.stage_blocks)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainConfig: {e}") from None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Builds a config from a mapping; unknown keys raise ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(values))


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_size(value, low):
    """[height, width]: two integers >= ``low``."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= low for v in value)


def load_config(path=None, overrides=None):
    """Reads a YAML config (``yaml.safe_load``) and applies ``overrides`` (a dict, or "key=value" strings).

    Args:
        path: YAML file, or a name of a packaged config ("voc_resnet101_aspp_l", "voc_vgg16_largefov",
            "tiny_cpu"), or None for the defaults.
        overrides: dict of field -> value, or list of "key=value" strings whose values are parsed as YAML.

    Returns:
        TrainConfig.
    """
    import yaml

    values = {}
    if path is not None:
        path = str(path)
        if not os.path.exists(path):
            packaged = os.path.join(_PACKAGE_DIR, "configs", path if path.endswith(".yaml")
                                    else path + ".yaml")
            if not os.path.exists(packaged):
                available = sorted(f[:-5] for f in os.listdir(os.path.dirname(packaged)) if f.endswith(".yaml"))
                raise ValueError(f"config file {path!r} not found (packaged configs: {available})")
            path = packaged
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of key: value, got {type(values).__name__}")
    if isinstance(overrides, dict):
        values.update(overrides)
    elif overrides:
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value")
            try:
                values[key.strip().replace("-", "_")] = yaml.safe_load(raw)
            except yaml.YAMLError:
                values[key.strip().replace("-", "_")] = raw
    return TrainConfig.from_dict(values)


def _as_config(config):
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise TypeError(f"config must be a TrainConfig, a dict or a YAML path, got {type(config).__name__}")
