"""Training DeepLab v2 with ``model.fit`` and the paper's recipe.

``train(config)`` builds the model, the ``tf.data`` stream, the optimizer and the callbacks from a
:class:`TrainConfig` (or a dict / YAML file) and runs ``model.fit``. The ``deeplab train`` CLI is a thin layer
over it. A TrainConfig has five typed sections (``model``, ``data``, ``schedule``, ``optimizer``, ``runtime``;
YAML files are nested the same way) and one override syntax, ``section.key=value`` (``--set``): see
:mod:`~deeplab_keras.training.config`. The options below are named ``section.key``.

The recipe (Chen et al., TPAMI 2017, and the released Caffe prototxts), all configurable:

* SGD with momentum 0.9; "poly" learning rate ``base_lr * (1 - step / steps) ** 0.9``
  (``keras.optimizers.schedules.PolynomialDecay``); base LR 2.5e-4 for ResNet, 1e-3 for VGG-16
  (``optimizer.base_lr``).
* Learning-rate multipliers as Caffe's ``lr_mult``: the classifier (ASPP branches / fc8) at 10x, biases at
  a further 2x (so classifier biases at 20x, as the prototxts). Implemented by multiplying each variable's
  gradient before the momentum update (:class:`ScaledSGD`), which with plain SGD + momentum is exactly a
  per-variable learning rate and works unchanged under ``tf.distribute`` and loss scaling.
* Weight decay 5e-4 as Caffe's: an L2 term ``weight_decay / 2 * sum(kernel ** 2)`` over the convolution
  kernels added to the loss (so its gradient ``weight_decay * kernel`` goes through the momentum and the LR
  multipliers, like Caffe's ``decay_mult: 1``); biases and batch-norm parameters are not decayed.
* Batch normalisation frozen (inference statistics, no updates) unless ``optimizer.train_bn``; with
  it under ``tf.distribute`` the statistics are per replica.
* Sparse softmax cross-entropy ignoring label 255, normalised by the number of non-ignored pixels of the
  whole global batch (Caffe's ``normalization: VALID``; the count is all-reduced across replicas so a
  distributed step equals a single-device one). The logits are **upsampled** (bilinear, corner-aligned) to
  the label size by default; ``optimizer.upsample_logits=false`` instead downsamples the labels (nearest) to the
  logits size, as the original Caffe code did.
* MSC (``model.msc_scales``): the loss is the sum of the per-scale losses and the loss of the max-fused logits
  (from ``model.multi_scale_logits``).

Mixed precision (``runtime.precision``): ``mixed_float16`` wraps the optimizer in ``LossScaleOptimizer``
(dynamic loss scaling; a step whose gradients overflow is skipped, and the poly schedule counts applied
steps); ``mixed_bfloat16`` needs no scaling. The model's logits are float32 and the loss is computed in
float32; ``model.keras`` is a float32 copy of the same weights (``models.as_float32``).

Distribution (``runtime.strategy``): "default" (one device), "mirrored", "multi_worker" (cluster from TF_CONFIG;
only the chief writes checkpoints and logs), "tpu", "one_device". ``data.batch_size`` is global; every replica
gets an exact slice of each global batch (:func:`distribute_stream`), so a distributed run computes the same
steps as a single-device one (tested: 2 logical CPUs, and 2 worker processes). The logged training mIoU is
Keras' mean over replicas; use ``deeplab_keras.evaluate`` for exact numbers.

Resume: every epoch (``schedule.steps_per_epoch`` steps) the weights, optimizer state and epoch are backed up with a
:class:`keras.callbacks.BackupAndRestore` subclass that writes atomically; the batches of epoch ``k`` are a
pure function of ``(seed, k)``, so a run killed at any point and restarted with the same command continues
from the last finished epoch and ends with the same weights as an uninterrupted run (with
``runtime.deterministic``, which turns on ``tf.config.experimental.enable_op_determinism`` for the process).
Ctrl-C (SIGINT) lets the current step finish, saves the state at that step and raises
:class:`TrainingInterrupted`; the rerun skips the batches of that epoch already seen, so it ends with the same
weights too (a second Ctrl-C stops at once, keeping the last saved state). Re-running a finished run restores its
final state and trains nothing.

Failure behaviour: one process writes a run directory at a time (``run_dir/.lock`` holds its pid; a second ``train``
on it raises ``locks.LockedError`` at once; the lock goes with its process, however it ends). Before writing
anything, ``train`` checks that the run directory's config.yaml agrees on the fields its model and state depend on
(the ``model`` section and ``schedule.steps_per_epoch``; a 0.1 flat config.yaml is read too) and that its saved
state loads into the model (ValueError otherwise), so a run directory never contradicts its model. Every file is
written through ``files.atomic_path`` / ``atomic_write_bytes`` (temporary file, fsync, rename, normal permissions):
a kill or a full disk leaves the previous complete files, and the next run removes the temporary files a killed one
left.

Run directory layout::

    run_dir/config.yaml                 the resolved configuration (nested sections)
    run_dir/checkpoints/ckpt-<step>.keras   model.save() every ``schedule.checkpoint_every`` steps
    run_dir/model.keras                 the final model (float32 copy when trained with mixed precision)
    run_dir/backup/state-<epoch>.weights.h5   weights + optimizer after ``epoch`` epochs (the last one kept)
    run_dir/backup/state-<epoch>-<batch>.weights.h5   the same, saved on Ctrl-C inside an epoch
    run_dir/history.csv, history.png    per-epoch loss / mIoU and their plot
    run_dir/summary.json                steps, epochs, where this call resumed, its history
    run_dir/logs/                       TensorBoard
    run_dir/.lock                       while a process trains in it

Modules (one per concern): :mod:`~deeplab_keras.training.config` (TrainConfig, load_config; sections in
:mod:`~deeplab_keras.training.config_sections` on :class:`~deeplab_keras.config_base.ConfigBase`, typed values in
:mod:`~deeplab_keras.training.config_values`),
:mod:`~deeplab_keras.training.losses` (loss, mIoU), :mod:`~deeplab_keras.training.optimizer` (ScaledSGD),
:mod:`~deeplab_keras.training.trainer` (build_model, SegmentationTrainer), :mod:`~deeplab_keras.training.callbacks`
(backup, checkpoints, Ctrl-C), :mod:`~deeplab_keras.training.history` (history CSV and plot),
:mod:`~deeplab_keras.training.distribute` (strategies, datasets, input streams) and
:mod:`~deeplab_keras.training.run` (``train()``). ``deeplab_keras.train`` re-exports the same names.
"""
from deeplab_keras.training.callbacks import ModelCheckpointEvery, ResumableBackup, TrainingInterrupted
from deeplab_keras.training.config import (DATASETS, PRECISIONS, STRATEGIES, DataConfig, OptimizerConfig,
                                           RuntimeConfig, ScheduleConfig, TrainConfig, load_config, suggest_key)
from deeplab_keras.training.distribute import (distribute_stream, load_datasets, make_strategy, make_train_stream,
                                               make_val_stream)
from deeplab_keras.training.history import HistoryPlot, plot_history, read_history
from deeplab_keras.training.losses import SegmentationMeanIoU, resize_logits, segmentation_loss
from deeplab_keras.training.optimizer import ScaledSGD, build_optimizer
from deeplab_keras.training.run import TrainResult, train
from deeplab_keras.training.trainer import SegmentationTrainer, build_model, build_trainer

__all__ = [
    "TrainConfig", "DataConfig", "ScheduleConfig", "OptimizerConfig", "RuntimeConfig", "load_config", "suggest_key",
    "train", "TrainResult", "make_strategy", "build_model", "load_datasets",
    "make_train_stream", "make_val_stream", "distribute_stream", "read_history", "plot_history",
    "segmentation_loss", "resize_logits", "ScaledSGD", "SegmentationTrainer", "SegmentationMeanIoU",
    "ResumableBackup", "ModelCheckpointEvery", "HistoryPlot", "TrainingInterrupted", "build_optimizer",
    "build_trainer", "STRATEGIES", "PRECISIONS", "DATASETS",
]
