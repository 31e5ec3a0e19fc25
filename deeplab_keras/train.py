"""Training DeepLab v2 with ``model.fit`` and the paper's recipe.

``train(config)`` builds the model, the ``tf.data`` stream, the optimizer and the callbacks from a
:class:`TrainConfig` (or a dict / YAML file) and runs ``model.fit``. The ``deeplab-train`` CLI is a thin layer
over it.

The recipe (Chen et al., TPAMI 2017, and the released Caffe prototxts), all configurable:

* SGD with momentum 0.9; "poly" learning rate ``base_lr * (1 - step / steps) ** 0.9``
  (``keras.optimizers.schedules.PolynomialDecay``); base LR 2.5e-4 for ResNet, 1e-3 for VGG-16.
* Learning-rate multipliers as Caffe's ``lr_mult``: the classifier (ASPP branches / fc8) at 10x, biases at
  a further 2x (so classifier biases at 20x, as the prototxts). Implemented by multiplying each variable's
  gradient before the momentum update (:class:`ScaledSGD`), which with plain SGD + momentum is exactly a
  per-variable learning rate and works unchanged under ``tf.distribute`` and loss scaling.
* Weight decay 5e-4 as Caffe's: an L2 term ``weight_decay / 2 * sum(kernel ** 2)`` over the convolution
  kernels added to the loss (so its gradient ``weight_decay * kernel`` goes through the momentum and the LR
  multipliers, like Caffe's ``decay_mult: 1``); biases and batch-norm parameters are not decayed.
* Batch normalisation frozen (inference statistics, no updates) unless ``train_bn=True``; with
  ``train_bn`` under ``tf.distribute`` the statistics are per replica.
* Sparse softmax cross-entropy ignoring label 255, normalised by the number of non-ignored pixels of the
  whole global batch (Caffe's ``normalization: VALID``; the count is all-reduced across replicas so a
  distributed step equals a single-device one). The logits are **upsampled** (bilinear, corner-aligned) to
  the label size by default; ``upsample_logits=False`` instead downsamples the labels (nearest) to the
  logits size, as the original Caffe code did.
* MSC (``msc_scales``): the loss is the sum of the per-scale losses and the loss of the max-fused logits
  (from ``model.multi_scale_logits``).

Mixed precision (``mixed_precision``): ``mixed_float16`` wraps the optimizer in ``LossScaleOptimizer``
(dynamic loss scaling; a step whose gradients overflow is skipped, and the poly schedule counts applied
steps); ``mixed_bfloat16`` needs no scaling. The model's logits are float32 and the loss is computed in
float32; ``model.keras`` is a float32 copy of the same weights (``models.as_float32``).

Distribution (``strategy``): "default" (one device), "mirrored", "multi_worker" (cluster from TF_CONFIG;
only the chief writes checkpoints and logs), "tpu", "one_device". ``batch_size`` is global; every replica
gets an exact slice of each global batch (:func:`distribute_stream`), so a distributed run computes the same
steps as a single-device one (tested: 2 logical CPUs, and 2 worker processes). The logged training mIoU is
Keras' mean over replicas; use ``deeplab_keras.evaluate`` for exact numbers.

Resume: every epoch (``steps_per_epoch`` steps) the weights, optimizer state and epoch are backed up with a
:class:`keras.callbacks.BackupAndRestore` subclass that writes atomically; the batches of epoch ``k`` are a
pure function of ``(seed, k)``, so a run killed at any point and restarted with the same command continues
from the last finished epoch and ends with the same weights as an uninterrupted run (with
``deterministic=True``, which turns on ``tf.config.experimental.enable_op_determinism`` for the process).
Ctrl-C (SIGINT) lets the current step finish, saves the state at that step and raises
:class:`TrainingInterrupted`; the rerun skips the batches of that epoch already seen, so it ends with the same
weights too (a second Ctrl-C stops at once, keeping the last saved state). Re-running a finished run restores its
final state and trains nothing.

Failure behaviour: one process writes a run directory at a time (``run_dir/.lock`` holds its pid; a second
``train`` on it raises ``utils.LockedError`` at once; the lock goes with its process, however it ends). Before
writing anything, ``train`` checks that the run directory's config.yaml agrees on the fields its model and state
depend on (num_classes, backbone, ...) and that its saved state loads into the model (ValueError otherwise), so
a run directory never contradicts its model. Every file is written through ``utils.atomic_path`` /
``atomic_write_bytes`` (temporary file, fsync, rename, normal permissions): a kill or a full disk leaves the
previous complete files, and the next run removes the temporary files a killed one left.

Run directory layout::

    run_dir/config.yaml                 the resolved configuration
    run_dir/checkpoints/ckpt-<step>.keras   model.save() every ``checkpoint_every`` steps
    run_dir/model.keras                 the final model (float32 copy when trained with mixed precision)
    run_dir/backup/state-<epoch>.weights.h5   weights + optimizer after ``epoch`` epochs (the last one kept)
    run_dir/backup/state-<epoch>-<batch>.weights.h5   the same, saved on Ctrl-C inside an epoch
    run_dir/history.csv, history.png    per-epoch loss / mIoU and their plot
    run_dir/summary.json                steps, epochs, where this call resumed, its history
    run_dir/logs/                       TensorBoard
    run_dir/.lock                       while a process trains in it
"""
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
from typing import Any, Optional

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from deeplab_keras import inference  # noqa: E402
from deeplab_keras.utils import atomic_path, atomic_write_bytes, atomic_write_json, exclusive_lock  # noqa: E402

__all__ = [
    "TrainConfig", "load_config", "train", "TrainResult", "make_strategy", "build_model", "load_datasets",
    "make_train_stream", "make_val_stream", "distribute_stream", "read_history", "plot_history",
    "segmentation_loss", "resize_logits", "ScaledSGD", "SegmentationTrainer", "SegmentationMeanIoU",
    "ResumableBackup", "ModelCheckpointEvery", "HistoryPlot", "TrainingInterrupted",
]

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = (None, "float32", "mixed_float16", "mixed_bfloat16")
DATASETS = ("voc", "synthetic", "folder")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
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
            packaged = os.path.join(os.path.dirname(__file__), "configs", path if path.endswith(".yaml")
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


# ----------------------------------------------------------------------------------------------------------
# Loss and metric
# ----------------------------------------------------------------------------------------------------------
# The logits resize of the loss and the metric: ``deeplab_keras.inference.upsample_logits`` (corner-aligned
# bilinear in float32, logit i on pixel OS * i as Caffe's Interp), the same one evaluation, prediction and the
# exported graphs use. ``resize_logits`` is kept as the name this module has always exported.
resize_logits = inference.upsample_logits


def _resize_labels(labels, size):
    """Nearest-neighbour (corner-aligned) resize of labels [N,H,W] to ``size``."""
    labels = tf.expand_dims(labels, -1)
    resized = tf.raw_ops.ResizeNearestNeighbor(images=labels, size=tf.cast(size, tf.int32), align_corners=True,
                                               half_pixel_centers=False)
    return tf.squeeze(resized, -1)


def segmentation_loss(labels, logits, ignore_label=255, upsample_logits=True):
    """Summed sparse softmax cross-entropy over non-ignored pixels, and their count.

    Args:
        labels: [N,H,W] integer labels; ``ignore_label`` pixels do not count.
        logits: [N,h,w,C] logits (any float dtype; computed in float32).
        ignore_label: label value to ignore.
        upsample_logits: resize logits to the label size (True) or labels to the logit size (False).

    Returns:
        (loss_sum, valid_count): float32 scalars; the mean loss is ``loss_sum / valid_count``.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 4:
        labels = tf.squeeze(labels, -1)
    if upsample_logits:
        logits = resize_logits(logits, tf.shape(labels)[1:3])
    else:
        logits = tf.cast(logits, tf.float32)
        labels = _resize_labels(labels, tf.shape(logits)[1:3])
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    ce = tf.where(valid, ce, tf.zeros_like(ce))
    return tf.reduce_sum(ce), tf.reduce_sum(tf.cast(valid, tf.float32))


class SegmentationMeanIoU(keras.metrics.MeanIoU):
    """``keras.metrics.MeanIoU`` over logits at any resolution: resizes them to the labels, ignores 255.

    Args:
        num_classes: number of classes.
        ignore_label: label value that does not count.
        name: metric name.
    """

    def __init__(self, num_classes, ignore_label=255, name="miou", **kwargs):
        kwargs.pop("ignore_class", None)
        kwargs.pop("sparse_y_pred", None)
        super().__init__(num_classes=num_classes, name=name, ignore_class=ignore_label, sparse_y_pred=False,
                         **kwargs)
        self.ignore_label = ignore_label

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.convert_to_tensor(y_true)
        if y_true.shape.rank == 4:
            y_true = tf.squeeze(y_true, -1)
        y_pred = resize_logits(y_pred, tf.shape(y_true)[1:3])
        return super().update_state(tf.cast(y_true, tf.int32), y_pred, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.pop("ignore_class", None)
        config.pop("sparse_y_pred", None)
        config["ignore_label"] = self.ignore_label
        return config


# ----------------------------------------------------------------------------------------------------------
# Optimizer with per-variable learning-rate multipliers
# ----------------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="deeplab_keras")
class ScaledSGD(keras.optimizers.SGD):
    """SGD (with momentum) whose gradients are multiplied per variable: Caffe's ``lr_mult``.

    With momentum SGD, scaling a variable's gradient by ``m`` is the same as running it at ``m`` times the
    learning rate. The multiplier of a variable is the product of the ``multipliers`` whose regex matches
    its ``variable.path`` (``re.search``). Scaling happens before the cross-replica gradient sum (it is
    linear, so the order does not matter) and after loss-scale unscaling (``LossScaleOptimizer`` calls
    ``apply`` of this inner optimizer).

    Args:
        learning_rate: float or schedule.
        momentum: momentum.
        multipliers: list of ``[regex, factor]`` pairs.
        **kwargs: the rest of ``keras.optimizers.SGD``.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, multipliers=(), **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.multipliers = [[str(p), float(f)] for p, f in multipliers]
        self._compiled = [(re.compile(p), f) for p, f in self.multipliers]

    def multiplier(self, variable):
        """The learning-rate multiplier of ``variable``."""
        path = getattr(variable, "path", None) or variable.name
        factor = 1.0
        for pattern, f in self._compiled:
            if pattern.search(path):
                factor *= f
        return factor

    def apply(self, grads, trainable_variables=None):
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        grads = list(grads)
        if len(variables) == len(grads):
            scaled = []
            for g, v in zip(grads, variables):
                m = self.multiplier(v)
                scaled.append(g if g is None or m == 1.0 else g * tf.cast(m, g.dtype))
            grads = scaled
        return super().apply(grads, trainable_variables)

    def get_config(self):
        config = super().get_config()
        config["multipliers"] = self.multipliers
        return config


def _conv_kernels(model):
    """Trainable rank-4 ``kernel`` variables (convolution kernels)."""
    return [v for v in model.trainable_variables
            if (getattr(v, "path", None) or v.name).split("/")[-1].split(":")[0] == "kernel"
            and len(v.shape) == 4]


# ----------------------------------------------------------------------------------------------------------
# The training wrapper
# ----------------------------------------------------------------------------------------------------------
class SegmentationTrainer(keras.Model):
    """Wraps a DeepLab model for ``fit``: the loss of the recipe, MSC losses and the mIoU metric.

    The wrapped ``net`` stays an ordinary, uncompiled model (save it with ``net.save``); this wrapper only
    exists during training and is not meant to be saved.

    Args:
        net: the DeepLab model (logits [N,h,w,C]; ``multi_scale_logits`` when ``msc``).
        num_classes: number of classes (for the metric).
        msc: train with every scale's logits plus the fused ones (sum of their losses).
        weight_decay: L2 factor (Caffe convention: gradient ``weight_decay * kernel``) on conv kernels.
        ignore_label: label to ignore.
        upsample_logits: see :func:`segmentation_loss`.
    """

    def __init__(self, net, num_classes, msc=False, weight_decay=0.0, ignore_label=255, upsample_logits=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.msc = bool(msc)
        self.weight_decay = float(weight_decay)
        self.ignore_label = int(ignore_label)
        self.upsample_logits = bool(upsample_logits)
        self.miou = SegmentationMeanIoU(num_classes, ignore_label=ignore_label, name="miou")
        self._sample_batch = None

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a distribution strategy Keras builds the model from a batch peeked from the training
        # iterator: that opens an extra iterator and, under MultiWorkerMirroredStrategy (Keras 3.15), fails
        # reducing the per-replica batch. Build from a local sample batch instead when one is set.
        if data_batch is None and self._sample_batch is not None:
            return super()._maybe_symbolic_build(data_batch=self._sample_batch)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def call(self, images, training=False):
        if self.msc and training:
            outputs = self.net.multi_scale_logits(images, training=True)
            if not isinstance(outputs, dict) or "fused" not in outputs:
                raise ValueError("net.multi_scale_logits must return a dict with a 'fused' entry, got "
                                 f"{type(outputs).__name__}")
            return dict(outputs)
        return {"fused": self.net(images, training=training)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        total = tf.constant(0.0, tf.float32)
        for key in sorted(y_pred):
            loss_sum, count = segmentation_loss(y, y_pred[key], self.ignore_label, self.upsample_logits)
            if replicas > 1:
                count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
            # Gradients are summed over replicas, so sum/global_count gives the global mean.
            total += loss_sum / tf.maximum(tf.stop_gradient(count), 1.0)
        if self.weight_decay > 0 and training:
            kernels = _conv_kernels(self.net)
            if kernels:
                l2 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in kernels])
                total += 0.5 * self.weight_decay * l2 / float(replicas)
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.miou.update_state(y, y_pred["fused"])
        results = self.get_metrics_result()
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 averages the replicas' metric results with strategy.reduce("MEAN", v, axis=0) under
            # MultiWorkerMirroredStrategy, which needs at least one dimension.
            results = {k: tf.reshape(v, [1]) for k, v in results.items()}
        return results


# ----------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------
_STATE_RE = re.compile(r"^state-(\d+)(?:-(\d+))?\.weights\.h5$")


def _latest_backup(backup_dir):
    """(epoch, batch, path) of the newest state in ``backup_dir``: ``epoch`` epochs done plus ``batch`` batches
    of the next one; (0, 0, None) when there is none."""
    best = (0, 0, None)
    if backup_dir and os.path.isdir(backup_dir):
        for name in os.listdir(backup_dir):
            m = _STATE_RE.match(name)
            if m and (int(m.group(1)), int(m.group(2) or 0)) >= best[:2]:
                best = (int(m.group(1)), int(m.group(2) or 0), os.path.join(backup_dir, name))
    return best


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C once the training state is saved; rerunning resumes from it.

    Attributes:
        step: the global step the saved state is at.
        state_path: the saved state file.
    """

    def __init__(self, step, state_path):
        super().__init__(f"interrupted at step {step}; state saved to {state_path}")
        self.step, self.state_path = step, state_path


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that writes atomically and can tell where to resume before ``fit``.

    Each backup is ``backup_dir/state-<epoch>.weights.h5`` (weights + optimizer state after ``epoch`` epochs)
    or, when training stopped inside an epoch (Ctrl-C, :meth:`save_state`), ``state-<epoch>-<batch>.weights.h5``
    (``batch`` batches of epoch ``epoch`` done). Each is written under a temporary name and renamed
    (``utils.atomic_path``), so a SIGKILL at any moment leaves the previous complete state; the position is in
    the file name, so weights and position can never disagree. Older states are deleted after a new one is in
    place. The state is restored once, by :meth:`restore` or at the start of ``fit``.

    Args:
        backup_dir: folder for the state files (one run only).
        delete_checkpoint: remove the folder when training completes.
    """

    def __init__(self, backup_dir, delete_checkpoint=True):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=delete_checkpoint)
        self.restored_epoch = 0
        self.restored_batch = 0
        self._restored = False

    @staticmethod
    def resume_epoch(backup_dir):
        """The epoch a run with this backup folder resumes in (0 for a fresh run)."""
        return _latest_backup(backup_dir)[0]

    @staticmethod
    def resume_point(backup_dir):
        """(epoch, batch, path) of the newest state: resume after ``batch`` batches of epoch ``epoch``."""
        return _latest_backup(backup_dir)

    def on_train_begin(self, logs=None):
        if not self._restored:
            self.restore()

    def restore(self):
        """Loads the newest state into the model (once); sets ``model._initial_epoch`` for ``fit``.

        Raises:
            ValueError: the state does not fit the model (a run directory of another configuration).
        """
        self._restored = True
        epoch, batch, path = _latest_backup(self.backup_dir)
        if path is None:
            return
        if not self.model.built:
            raise ValueError("ResumableBackup: build the model (call it on a batch) before fit()")
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        import warnings

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.model.load_weights(path)
            skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
            if skipped:  # Keras only warns when e.g. the optimizer has other variables (train_bn changed)
                raise ValueError(skipped[0])
        except Exception as e:  # Keras raises ValueError / KeyError / OSError for a state of another model
            reason = " ".join(str(e).split())[:300]
            raise ValueError(f"cannot restore the training state {path}: it does not fit this model and optimizer "
                             f"({reason}); resume with the configuration that wrote it (its run_dir's config.yaml) "
                             "or use another run_dir") from e
        self.model._initial_epoch = epoch
        self.restored_epoch, self.restored_batch = epoch, batch

    def _save_model(self):
        self.save_state(self._current_epoch)

    def save_state(self, epoch, batch=0):
        """Writes the state after ``batch`` batches of epoch ``epoch`` and removes older states.

        Returns:
            the path of the state file.
        """
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"state-{epoch}-{batch}.weights.h5" if batch else f"state-{epoch}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        with atomic_path(path) as tmp:
            self.model.save_weights(tmp, overwrite=True)
        for other in os.listdir(self.backup_dir):
            m = _STATE_RE.match(other)
            if m and (int(m.group(1)), int(m.group(2) or 0)) < (epoch, batch):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.backup_dir, other))
        return path

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            import shutil

            shutil.rmtree(self.backup_dir, ignore_errors=True)


def _atomic_save_keras(model, path):
    """``model.save(path)`` through ``utils.atomic_path`` (creates the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        model.save(tmp)


class _StepCallback(keras.callbacks.Callback):
    """Knows the global step of a batch; ``skip = (epoch, n)`` when a ``fit`` starts ``n`` batches into ``epoch``."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.skip = (None, 0)
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def batches_done(self, batch):
        """Batches of the current epoch done after batch index ``batch`` of this ``fit``."""
        return batch + 1 + (self.skip[1] if self.skip[0] == self._epoch else 0)

    def global_step(self, batch):
        return self._epoch * self.steps_per_epoch + self.batches_done(batch)


class ModelCheckpointEvery(_StepCallback):
    """Saves ``net`` as ``folder/ckpt-<step>.keras`` every ``every`` global steps (atomic), keeps the last N.

    Args:
        net: the model to save (the DeepLab model, not the training wrapper).
        folder: checkpoint folder.
        every: steps between checkpoints (> 0).
        steps_per_epoch: to turn (epoch, batch) into the global step.
        keep: how many to keep (0: all).
    """

    def __init__(self, net, folder, every, steps_per_epoch, keep=5):
        super().__init__(steps_per_epoch)
        self.net, self.folder, self.every, self.keep = net, folder, int(every), int(keep)

    def on_train_batch_end(self, batch, logs=None):
        step = self.global_step(batch)
        if step % self.every == 0:
            _atomic_save_keras(self.net, os.path.join(self.folder, f"ckpt-{step}.keras"))
            self._prune()

    def _prune(self):
        if self.keep <= 0:
            return
        found = sorted((int(m.group(1)), n) for n in os.listdir(self.folder)
                       for m in [re.match(r"^ckpt-(\d+)\.keras$", n)] if m)
        for _, name in found[:-self.keep]:
            try:
                os.remove(os.path.join(self.folder, name))
            except OSError:
                pass


class _StopOnInterrupt(_StepCallback):
    """Once ``requested`` (Ctrl-C), saves the state at the next step boundary and raises TrainingInterrupted.

    Put it last, so that every other callback has seen the step. During validation (all of the epoch's batches
    done) the state is the end of the epoch; that epoch's validation and history row are skipped.
    """

    def __init__(self, backup, steps_per_epoch):
        super().__init__(steps_per_epoch)
        self.backup, self.requested = backup, False

    def _stop(self, epoch, batch, save=True):
        if batch == self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        path = self.backup.save_state(epoch, batch) if save else _latest_backup(self.backup.backup_dir)[2]
        raise TrainingInterrupted(epoch * self.steps_per_epoch + batch, path)

    def on_train_batch_end(self, batch, logs=None):
        if self.requested:
            self._stop(self._epoch, self.batches_done(batch))

    def on_test_batch_end(self, batch, logs=None):
        if self.requested:
            self._stop(self._epoch + 1, 0)

    def on_epoch_end(self, epoch, logs=None):
        if self.requested:  # the backup saved the end of this epoch just before
            self._stop(epoch + 1, 0, save=False)


@contextlib.contextmanager
def _stop_on_sigint(stopper):
    """While active (main thread only), Ctrl-C asks ``stopper`` to save and stop after the current step; a
    second Ctrl-C raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):  # ignored (e.g. a background job), or not set from Python
        yield
        return

    def handler(signum, frame):
        stopper.requested = True
        signal.signal(signal.SIGINT, previous)
        print("\ndeeplab-train: Ctrl-C: saving the state after this step (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_history(csv_path):
    """Reads a CSVLogger file, tolerating a truncated last line; keeps the last row per epoch."""
    import csv

    rows = {}
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):  # "NA" (no validation that epoch), truncated line
                    pass
            if "epoch" in parsed:
                rows[int(parsed["epoch"])] = parsed
    return [rows[k] for k in sorted(rows)]


def plot_history(csv_path, png_path, steps_per_epoch=1):
    """Writes a PNG with the loss and mIoU curves (train and validation) of a history CSV. Atomic."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_history(csv_path)
    if not rows:
        return None
    steps = [(r["epoch"] + 1) * steps_per_epoch for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "miou", "mIoU")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            values = [(s, r[prefix + key]) for s, r in zip(steps, rows) if prefix + key in r]
            if values:
                ax.plot(*zip(*values), style, label=(prefix + key).replace("_", " ") or key, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return png_path


class HistoryPlot(keras.callbacks.Callback):
    """Redraws ``png_path`` from the CSV history after every epoch (run it after ``CSVLogger``)."""

    def __init__(self, csv_path, png_path, steps_per_epoch=1):
        super().__init__()
        self.csv_path, self.png_path, self.steps_per_epoch = csv_path, png_path, steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        plot_history(self.csv_path, self.png_path, self.steps_per_epoch)


# ----------------------------------------------------------------------------------------------------------
# Strategy, model, data
# ----------------------------------------------------------------------------------------------------------
def _split_cpu(n):
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as e:
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) < n:
            raise RuntimeError(f"virtual_cpus={n}: TensorFlow is already initialised with {len(logical)} CPU "
                               "device(s); set virtual_cpus in a fresh process before any TF op runs") from e


def make_strategy(name="default", devices=None, tpu=None, virtual_cpus=0):
    """The ``tf.distribute`` strategy named by the config.

    Args:
        name: "default" (one device, no strategy), "one_device", "mirrored" (all local GPUs, or ``devices``),
            "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from the TF_CONFIG environment
            variable), "tpu" (TPUStrategy on ``tpu``).
        devices: device names for "mirrored" / "one_device".
        tpu: TPU name / grpc address (None: local).
        virtual_cpus: first split the CPU into this many logical devices (for tests on CPU).
    """
    if virtual_cpus:
        _split_cpu(int(virtual_cpus))
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else
                                               (tf.config.list_logical_devices("GPU") or
                                                tf.config.list_logical_devices("CPU"))[0].name)
    if name == "mirrored":
        if devices is None and not tf.config.list_logical_devices("GPU"):
            cpus = tf.config.list_logical_devices("CPU")
            devices = [d.name for d in cpus] if len(cpus) > 1 else None
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' reads the cluster from the TF_CONFIG environment variable, "
                             "which is not set")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0 and
                                              "chief" not in resolver.cluster_spec().as_dict())


def _task_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0) if resolver is not None else 0


class _policy_scope:
    """Sets the global Keras dtype policy for a block and restores it."""

    def __init__(self, policy):
        self.policy = policy or "float32"

    def __enter__(self):
        self.saved = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)

    def __exit__(self, *exc):
        keras.mixed_precision.set_global_policy(self.saved)


def build_model(config):
    """``dk.DeepLabV2`` from the model fields of a config (under the config's dtype policy)."""
    from deeplab_keras.models.deeplab import DeepLabV2

    cfg = _as_config(config)
    kwargs = dict(num_classes=cfg.num_classes, backbone=cfg.backbone, output_stride=cfg.output_stride,
                  aspp=tuple(cfg.aspp) if isinstance(cfg.aspp, (list, tuple)) else cfg.aspp,
                  msc_scales=tuple(cfg.msc_scales) if cfg.msc_scales else None, weights=cfg.weights)
    if cfg.width_multiplier != 1.0:
        kwargs["width_multiplier"] = cfg.width_multiplier
    if cfg.stage_blocks:
        kwargs["stage_blocks"] = tuple(cfg.stage_blocks)
    with _policy_scope(cfg.mixed_precision):
        return DeepLabV2(**kwargs)


def load_datasets(config):
    """The unbatched (train, validation) datasets of {"image", "label", "file_name"} a config names.

    Validation is None when ``validation_every`` is 0 (VOC, folder) or no ``val_folder`` is given.
    """
    return _raw_datasets(_as_config(config))


def _raw_datasets(cfg):
    from deeplab_keras import data

    if cfg.dataset == "synthetic":
        from deeplab_keras.data import synthetic

        size = tuple(int(s) for s in cfg.synthetic_size)
        train = synthetic.make_synthetic(cfg.synthetic_images, size=size, num_classes=cfg.num_classes,
                                         seed=cfg.seed)
        val = synthetic.make_synthetic(cfg.synthetic_val_images, size=size, num_classes=cfg.num_classes,
                                       seed=cfg.seed + 1000003)
        return train, val
    if cfg.dataset == "voc":
        if not cfg.manual_dir and not cfg.data_dir:
            raise ValueError("dataset 'voc' needs manual_dir (the folder holding VOC2012/ and, for the 'aug' "
                             "config, benchmark_RELEASE/) or a data_dir with the prepared TFDS dataset")
        train = data.load_voc(cfg.train_split, config=cfg.voc_config, manual_dir=cfg.manual_dir,
                              data_dir=cfg.data_dir)
        val = data.load_voc(cfg.val_split, config=cfg.voc_config, manual_dir=cfg.manual_dir,
                            data_dir=cfg.data_dir) if cfg.validation_every else None
        return train, val
    if not cfg.folder:
        raise ValueError("dataset 'folder' needs folder: a directory with images/ and masks/")
    train = data.folder_dataset(cfg.folder)
    val = data.folder_dataset(cfg.val_folder) if cfg.val_folder and cfg.validation_every else None
    return train, val


def make_train_stream(raw, cfg, start_epoch=0, start_batch=0):
    """The training batches from batch ``start_batch`` of ``start_epoch`` to the end: epoch ``k`` is a pure
    function of (seed, k).

    Epoch ``k`` is ``deeplab_keras.data.make_pipeline(raw, training=True, repeat=True, seed=f(seed, k))``
    cut to ``steps_per_epoch`` batches (the pipeline's shuffle and augmentation are seeded per element), so
    a run resumed at epoch ``k`` sees exactly the batches an uninterrupted run sees from epoch ``k`` on.

    Args:
        raw: unbatched dataset of {"image" uint8 [H,W,3], "label" uint8 [H,W]} dicts.
        cfg: TrainConfig.
        start_epoch: first epoch to produce.
        start_batch: batches of ``start_epoch`` to skip (a run resumed inside an epoch).

    Returns:
        tf.data.Dataset of (images float32 [B,h,w,3], labels uint8 [B,h,w]) with global batches.
    """
    from deeplab_keras.data import make_pipeline

    def epoch(k):  # k: int64 scalar tensor; the seed of epoch k is computed in the graph
        # This function's own graph-level seed (traced, so the process's global seed is untouched): the
        # stream then depends on cfg.seed only, and a global seed of 0 cannot trip tf's (0, 0) seed check.
        tf.random.set_seed(20160602)
        seed = (tf.constant(int(cfg.seed) * 1000003 + 17, tf.int64) + k * 7919) % (2 ** 31 - 1)
        return make_pipeline(raw, training=True, batch_size=cfg.batch_size, crop_size=_ints(cfg.crop_size),
                             scale_range=_scale_range(cfg), flip=cfg.flip, ignore_label=cfg.ignore_label,
                             num_classes=cfg.num_classes, shuffle_buffer=cfg.shuffle_buffer, seed=seed,
                             repeat=True, prefetch=False).take(cfg.steps_per_epoch)

    # flat_map builds the pipeline graph once (not once per epoch) and instantiates it afresh for every
    # epoch and every iterator, so its seeded shuffle and augmentation restart identically each time
    # (iterating one dataset object twice would re-randomise it, and Keras opens an extra iterator under a
    # distribution strategy).
    stream = tf.data.Dataset.range(start_epoch, max(cfg.epochs, start_epoch)).flat_map(epoch)
    if start_batch:
        stream = stream.skip(start_batch)
    return _data_sharded(stream.prefetch(tf.data.AUTOTUNE))


def make_val_stream(raw, cfg):
    """Validation batches (no augmentation): full-size images when ``val_crop_size`` is None (batch 1)."""
    from deeplab_keras.data import make_pipeline

    crop = _ints(cfg.val_crop_size) if cfg.val_crop_size else None
    ds = make_pipeline(raw, training=False, batch_size=cfg.val_batch_size, crop_size=crop,
                       ignore_label=cfg.ignore_label, num_classes=cfg.num_classes)
    if cfg.validation_steps:
        ds = ds.take(cfg.validation_steps)
    return _data_sharded(ds)


def _ints(values):
    return tuple(int(v) for v in values)


def _scale_range(cfg):
    return None if cfg.scale_range is None else tuple(float(s) for s in cfg.scale_range)


def _data_sharded(ds):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def distribute_stream(strategy, make_stream, global_batch):
    """Splits a stream of global batches between the replicas of ``strategy``, exactly and deterministically.

    Every input pipeline (one per worker) builds the same global stream with ``make_stream()`` and keeps its
    replicas' rows of each global batch: replica ``r`` gets rows ``[r * b, (r + 1) * b)`` with
    ``b = global_batch / replicas``. So a step sees the same global batch whatever the number of replicas.
    (``strategy.experimental_distribute_dataset`` rewrites the input graph, which was measured to change
    the seeded augmentation; this does not.)

    Args:
        strategy: the ``tf.distribute.Strategy``.
        make_stream: () -> dataset of (images [B,...], labels [B,...]) global batches.
        global_batch: B.

    Returns:
        the dataset itself for one replica, else a ``tf.distribute.DistributedDataset``.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return make_stream()
    if global_batch % replicas:
        raise ValueError(f"batch_size {global_batch} must be divisible by the number of replicas ({replicas})")
    per_replica = global_batch // replicas

    def dataset_fn(context):
        ds = make_stream()
        local = replicas // context.num_input_pipelines
        lo = context.input_pipeline_id * local * per_replica
        hi = lo + local * per_replica
        if context.num_input_pipelines > 1:
            ds = ds.map(lambda x, y: (x[lo:hi], y[lo:hi]))
        if local > 1:
            ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        return _data_sharded(ds)

    return strategy.distribute_datasets_from_function(dataset_fn)


# ----------------------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the trained DeepLab model (in the training dtype policy).
        history: dict of per-epoch lists (this call's epochs only).
        run_dir: the run folder.
        model_path: path of the final ``model.keras`` (float32) or None when not written (non-chief worker).
        resumed_from_epoch: the epoch this call started at (0 for a fresh run).
        num_replicas: replicas in sync of the distribution strategy used.
    """

    model: Any
    history: dict
    run_dir: str
    model_path: Optional[str]
    resumed_from_epoch: int
    num_replicas: int = 1


def _float32_copy(net, cfg):
    """A float32 copy of a mixed-precision model (``models.as_float32``); ``net`` itself otherwise."""
    if not cfg.mixed_precision or cfg.mixed_precision == "float32":
        return net
    from deeplab_keras.models import as_float32

    return as_float32(net)


def _tensorboard_available():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


# The fields a run directory's model, checkpoints and backups depend on: a rerun in the same run_dir must keep them.
_RUN_DIR_KEYS = ("num_classes", "backbone", "output_stride", "aspp", "msc_scales", "width_multiplier",
                 "stage_blocks", "steps_per_epoch")


def _canonical(value):
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if _is_number(value):
        return float(value)
    return value


def _check_run_dir(run_dir, cfg):
    """Raises ValueError, writing nothing, when ``run_dir`` holds a run (a backup, checkpoints or model.keras)
    whose config.yaml differs from ``cfg`` in a field of :data:`_RUN_DIR_KEYS`."""
    import yaml

    saved_path = os.path.join(run_dir, "config.yaml")
    has_state = (_latest_backup(os.path.join(run_dir, "backup"))[2] is not None
                 or os.path.exists(os.path.join(run_dir, "model.keras"))
                 or any(n.startswith("ckpt-") for n in _listdir(os.path.join(run_dir, "checkpoints"))))
    if not has_state or not os.path.isfile(saved_path):
        return
    try:
        with open(saved_path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return  # unreadable: restoring the state still checks that the weights fit
    if not isinstance(saved, dict):
        return
    diffs = [f"{k}={saved[k]!r} (this command: {getattr(cfg, k)!r})" for k in _RUN_DIR_KEYS
             if k in saved and _canonical(saved[k]) != _canonical(getattr(cfg, k))]
    if diffs:
        raise ValueError(f"run_dir {run_dir} holds a run with {', '.join(diffs)}; its model and checkpoints depend "
                         "on these: rerun with its values to resume it, or pass another --run_dir")


def _listdir(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


def _remove_temp_files(*folders):
    """Removes the ``.tmp-*`` files of atomic writes that a killed run left in ``folders``."""
    for folder in folders:
        for name in _listdir(folder):
            if name.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _clone_into_scope(net, strategy, cfg):
    with strategy.scope(), _policy_scope(cfg.mixed_precision):
        copy = net.__class__.from_config(net.get_config())
    sample = np.zeros((1, 65, 65, 3), "float32")
    copy(sample)
    copy.set_weights(net.get_weights())
    return copy


def train(config, *, model=None, train_data=None, val_data=None, callbacks=None, strategy=None):
    """Trains DeepLab v2 with ``model.fit`` following ``config``; resumes if ``run_dir`` holds a backup.

    The run directory is locked for the call; its config and state are checked before anything is written; on
    Ctrl-C the state is saved at the current step (see the module docstring).

    Args:
        config: TrainConfig, dict, or YAML path.
        model: an existing DeepLab model to train (default: built from the config). With a distribution
            strategy it is copied into the strategy's scope.
        train_data: unbatched ``tf.data.Dataset`` of {"image", "label"} to use instead of the config's dataset.
        val_data: unbatched validation dataset (None: the config's; pass ``False`` for none).
        callbacks: extra Keras callbacks.
        strategy: a ``tf.distribute.Strategy`` to use instead of the config's.

    Returns:
        TrainResult.

    Raises:
        ValueError: a bad config, or a run directory that holds a run of another model.
        deeplab_keras.utils.LockedError: another process trains in ``run_dir``.
        TrainingInterrupted: Ctrl-C, after saving the state (a KeyboardInterrupt).

    Example:
        >>> from deeplab_keras.train import load_config, train
        >>> result = train(load_config("tiny_cpu", {"run_dir": "/tmp/run", "steps": 20}))  # doctest: +SKIP
    """
    cfg = _as_config(config)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = strategy or make_strategy(cfg.strategy, cfg.devices, cfg.tpu, cfg.virtual_cpus)
    default_strategy = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    keras.utils.set_random_seed(cfg.seed)
    chief = _is_chief(strategy)
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    # One writer per run directory (the chief; other workers write only their own .backup-worker-<i>).
    lock = exclusive_lock(os.path.join(run_dir, ".lock"), what=f"run directory {run_dir}") if chief \
        else contextlib.nullcontext()
    with lock:
        return _train_in(run_dir, cfg, strategy, chief, default_strategy, model, train_data, val_data, callbacks)


def _train_in(run_dir, cfg, strategy, chief, default_strategy, model, train_data, val_data, callbacks):
    """The body of :func:`train` once the run directory is locked. Writes nothing before the run directory's
    config and state are known to fit ``cfg``."""
    replicas = strategy.num_replicas_in_sync
    backup_dir = os.path.join(run_dir, "backup") if chief else os.path.join(
        run_dir, f".backup-worker-{_task_id(strategy)}")
    if chief:
        _check_run_dir(run_dir, cfg)
        _remove_temp_files(run_dir, os.path.join(run_dir, "checkpoints"))
    _remove_temp_files(backup_dir)
    start_epoch, start_batch, _ = _latest_backup(backup_dir)

    # Data (given datasets win; a given train_data without val_data means no validation)
    if train_data is None:
        train_data, config_val = _raw_datasets(cfg)
        val_data = config_val if val_data is None else val_data

    def train_stream(epoch, skip=0):
        return distribute_stream(strategy, lambda: make_train_stream(train_data, cfg, epoch, skip), cfg.batch_size)

    val_stream = None
    if val_data is not None and val_data is not False and cfg.validation_every:
        if replicas > 1 and (cfg.val_batch_size % replicas or not cfg.val_crop_size):
            raise ValueError(f"validation under {replicas} replicas needs val_batch_size a multiple of {replicas} "
                             "and val_crop_size set (e.g. [513, 513]) so batches split evenly; or set "
                             "validation_every: 0 and evaluate full-size images with deeplab-eval")
        val_stream = distribute_stream(strategy, lambda: make_val_stream(val_data, cfg), cfg.val_batch_size)

    # Model, optimizer
    with strategy.scope():
        if model is None:
            net = build_model(cfg)
        elif default_strategy:
            net = model
        else:
            net = _clone_into_scope(model, strategy, cfg)
        for layer in net._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = bool(cfg.train_bn)
                if cfg.train_bn and cfg.bn_momentum is not None:
                    layer.momentum = float(cfg.bn_momentum)
        with _policy_scope(cfg.mixed_precision):
            trainer = SegmentationTrainer(net, cfg.num_classes, msc=bool(cfg.msc_scales),
                                          weight_decay=cfg.weight_decay, ignore_label=cfg.ignore_label,
                                          upsample_logits=cfg.upsample_logits, name="segmentation_trainer")
            schedule = keras.optimizers.schedules.PolynomialDecay(
                cfg.resolved_base_lr, decay_steps=cfg.steps, end_learning_rate=cfg.end_lr, power=cfg.lr_power)
            multipliers = []
            if cfg.classifier_lr_mult != 1.0:
                multipliers.append([cfg.classifier_pattern, cfg.classifier_lr_mult])
            if cfg.bias_lr_mult != 1.0:
                multipliers.append([r"(^|/)bias(:\d+)?$", cfg.bias_lr_mult])
            optimizer = ScaledSGD(schedule, momentum=cfg.momentum, multipliers=multipliers)
            if cfg.mixed_precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            trainer.compile(optimizer=optimizer)
        h, w = (min(int(c), 65) for c in cfg.crop_size)
        trainer(np.zeros((1, h, w, 3), "float32"))  # build before restore
        trainer._sample_batch = (np.zeros((1, h, w, 3), "float32"), np.zeros((1, h, w), "uint8"), None)

    n_classifier = sum(1 for v in net.trainable_variables
                       if re.search(cfg.classifier_pattern, getattr(v, "path", v.name)))
    if cfg.classifier_lr_mult != 1.0 and n_classifier == 0:
        raise ValueError(f"classifier_pattern {cfg.classifier_pattern!r} matches no trainable variable of the "
                         f"model; variable paths look like {net.trainable_variables[-1].path!r}")

    # Restore the last state before writing anything: a state that does not fit this config fails here. The
    # last state is kept after the run completes, so re-running a finished command is a no-op.
    backup = ResumableBackup(backup_dir, delete_checkpoint=False)
    backup.set_model(trainer)
    backup.restore()
    trainer._initial_epoch = None  # fit gets the epoch explicitly
    if chief:
        import yaml

        atomic_write_bytes(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # Callbacks
    cbs = [backup]
    if chief:
        if cfg.checkpoint_every:
            cbs.append(ModelCheckpointEvery(net, os.path.join(run_dir, "checkpoints"), cfg.checkpoint_every,
                                            cfg.steps_per_epoch, cfg.keep_checkpoints))
        csv_path = os.path.join(run_dir, "history.csv")
        cbs.append(keras.callbacks.CSVLogger(csv_path, append=True))
        if cfg.plot:
            cbs.append(HistoryPlot(csv_path, os.path.join(run_dir, "history.png"), cfg.steps_per_epoch))
        if cfg.tensorboard:
            if _tensorboard_available():
                cbs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), update_freq="epoch"))
            else:
                print("deeplab-train: the tensorboard package is not installed; no TensorBoard logs "
                      "(pip install tensorboard, or set tensorboard: false)", file=sys.stderr)
    cbs += list(callbacks or [])
    stopper = _StopOnInterrupt(backup, cfg.steps_per_epoch)
    cbs.append(stopper)

    start_step = start_epoch * cfg.steps_per_epoch + start_batch
    if start_step and cfg.verbose:
        print(f"deeplab-train: resuming {run_dir} from epoch {start_epoch} (step {start_step} of {cfg.steps})",
              file=sys.stderr)
    history = {}

    def fit(first_epoch, skip):
        for cb in cbs:
            if isinstance(cb, _StepCallback):
                cb.skip = (first_epoch, skip)
        last_epoch = first_epoch + 1 if skip else cfg.epochs  # an epoch resumed inside runs as its own fit
        done = trainer.fit(train_stream(first_epoch, skip), epochs=last_epoch, initial_epoch=first_epoch,
                           steps_per_epoch=cfg.steps_per_epoch - skip, validation_data=val_stream,
                           validation_freq=max(cfg.validation_every, 1), callbacks=cbs, verbose=cfg.verbose,
                           shuffle=False)
        for key, values in done.history.items():
            history.setdefault(key, []).extend(values)
        return last_epoch

    with _stop_on_sigint(stopper):
        epoch = start_epoch
        if start_batch:
            epoch = fit(start_epoch, start_batch)
        if epoch < cfg.epochs:
            fit(epoch, 0)

    model_path = None
    if chief:
        model_path = os.path.join(run_dir, "model.keras")
        _atomic_save_keras(_float32_copy(net, cfg), model_path)
        atomic_write_json(os.path.join(run_dir, "summary.json"), {
            "steps": cfg.steps, "epochs": cfg.epochs, "resumed_from_epoch": start_epoch,
            "resumed_from_step": start_step,
            "history": {k: [float(x) for x in v] for k, v in history.items()}})
    return TrainResult(model=net, history=history, run_dir=run_dir, model_path=model_path,
                       resumed_from_epoch=start_epoch, num_replicas=replicas)
