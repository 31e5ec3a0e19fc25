"""``train()``: the orchestration of a training run in a locked, checked run directory."""
import contextlib
import dataclasses
import os
import sys
from typing import Any, Optional

import keras
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.training.callbacks import (ResumableBackup, _atomic_save_keras, _latest_backup, _StepCallback,
                                              _stop_on_sigint, _StopOnInterrupt, run_callbacks)
from deeplab_keras.training.config import _as_config, _nested
from deeplab_keras.training.distribute import (_is_chief, _raw_datasets, _task_id, distribute_stream, make_strategy,
                                               make_train_stream, make_val_stream)
from deeplab_keras.training.losses import FREQUENCIES_FILE, class_frequencies, class_weights_from
from deeplab_keras.training.trainer import _float32_copy, build_trainer
from deeplab_keras.files import atomic_write_bytes, atomic_write_json, remove_temp_files
from deeplab_keras.locks import exclusive_lock


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


def _canonical(value):
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _run_dir_fields(values):
    """{"model.<key>": value} and schedule.steps_per_epoch of a nested config dict: what a run directory's model,
    checkpoints and backups depend on (a rerun in the same run_dir must keep them)."""
    fields = {f"model.{k}": v for k, v in values.get("model", {}).items()}
    if "steps_per_epoch" in values.get("schedule", {}):
        fields["schedule.steps_per_epoch"] = values["schedule"]["steps_per_epoch"]
    return fields


def _check_run_dir(run_dir, cfg):
    """Raises ValueError, writing nothing, when ``run_dir`` holds a run (a backup, checkpoints or model.keras)
    whose config.yaml (nested, or 0.1's flat layout) differs from ``cfg`` in the model or steps_per_epoch."""
    import yaml

    saved_path = os.path.join(run_dir, "config.yaml")
    has_state = (_latest_backup(os.path.join(run_dir, "backup"))[2] is not None
                 or os.path.exists(os.path.join(run_dir, "model.keras"))
                 or any(n.startswith("ckpt-") for n in _listdir(os.path.join(run_dir, "checkpoints"))))
    if not has_state or not os.path.isfile(saved_path):
        return
    try:
        with open(saved_path) as f:
            saved = _nested(yaml.safe_load(f), saved_path)
    except (OSError, ValueError, yaml.YAMLError):
        return  # unreadable: restoring the state still checks that the weights fit
    saved, now = _run_dir_fields(saved), _run_dir_fields(cfg.to_dict())
    diffs = [f"{k}={saved[k]!r} (this command: {now[k]!r})" for k in saved
             if k in now and _canonical(saved[k]) != _canonical(now[k])]
    if diffs:
        raise ValueError(f"run_dir {run_dir} holds a run with {', '.join(diffs)}; its model and checkpoints depend "
                         "on these: rerun with its values to resume it, or pass another runtime.run_dir")


def _listdir(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


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
        deeplab_keras.locks.LockedError: another process trains in ``run_dir``.
        TrainingInterrupted: Ctrl-C, after saving the state (a KeyboardInterrupt).

    Example:
        >>> from deeplab_keras.train import load_config, train
        >>> result = train(load_config("tiny_cpu", ["runtime.run_dir=/tmp/run", "schedule.steps=20"]))  # doctest: +SKIP
    """
    cfg = _as_config(config)
    if cfg.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = strategy or make_strategy(cfg.runtime.strategy, cfg.runtime.devices, cfg.runtime.tpu,
                                          cfg.runtime.virtual_cpus)
    default_strategy = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    keras.utils.set_random_seed(cfg.runtime.seed)
    chief = _is_chief(strategy)
    run_dir = os.path.abspath(cfg.runtime.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    # One writer per run directory (the chief; other workers write only their own .backup-worker-<i>).
    lock = exclusive_lock(os.path.join(run_dir, ".lock"), what=f"run directory {run_dir}") if chief \
        else contextlib.nullcontext()
    with lock:
        return _train_in(run_dir, cfg, strategy, chief, default_strategy, model, train_data, val_data, callbacks)


def _streams(cfg, strategy, train_data=None, val_data=None):
    """(train_stream(epoch, skip) -> distributed batches, validation batches or None) of a run. Given datasets
    win over the config's; a given ``train_data`` without ``val_data`` means no validation."""
    if train_data is None:
        train_data, config_val = _raw_datasets(cfg)
        val_data = config_val if val_data is None else val_data
    replicas = strategy.num_replicas_in_sync
    k = cfg.optimizer.accumulation_steps
    if k > 1:  # one fit step = one update = K batches of data.batch_size (SegmentationTrainer.train_step)
        if cfg.data.batch_size % replicas:
            raise ValueError(f"optimizer.accumulation_steps={k} under {replicas} replicas needs data.batch_size a "
                             f"multiple of {replicas}, got {cfg.data.batch_size}")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * k))

    def train_stream(epoch, skip=0):
        return distribute_stream(strategy, lambda: make_train_stream(train_data, cfg, epoch, skip),
                                 cfg.data.batch_size)

    if val_data is None or val_data is False or not cfg.schedule.validation_every:
        return train_stream, None
    if replicas > 1 and (cfg.data.val_batch_size % replicas or not cfg.data.val_crop_size):
        raise ValueError(f"validation under {replicas} replicas needs data.val_batch_size a multiple of {replicas} "
                         "and data.val_crop_size set (e.g. 513,513) so batches split evenly; or set "
                         "schedule.validation_every=0 and evaluate full-size images with deeplab eval")
    return train_stream, distribute_stream(strategy, lambda: make_val_stream(val_data, cfg), cfg.data.val_batch_size)


def _class_counts(cfg, run_dir, train_data):
    """The training labels' class pixel counts when ``optimizer.class_weights`` is a frequency weighting (from the
    run directory's ``class_frequencies.json``, else one counting pass with a progress bar), else None."""
    if cfg.optimizer.class_weights not in ("inverse_frequency", "median_frequency"):
        return None
    data = train_data if train_data is not None else _raw_datasets(cfg)[0]
    return class_frequencies(run_dir, data, cfg.model.num_classes, cfg.data.ignore_label,
                             progress=bool(cfg.runtime.verbose), write=False)


def _train_in(run_dir, cfg, strategy, chief, default_strategy, model, train_data, val_data, callbacks):
    """The body of :func:`train` once the run directory is locked. Writes nothing before the run directory's
    config and state are known to fit ``cfg``."""
    replicas = strategy.num_replicas_in_sync
    backup_dir = os.path.join(run_dir, "backup") if chief else os.path.join(
        run_dir, f".backup-worker-{_task_id(strategy)}")
    if chief:
        _check_run_dir(run_dir, cfg)
        remove_temp_files(run_dir)
        remove_temp_files(os.path.join(run_dir, "checkpoints"))
    remove_temp_files(backup_dir)
    start_epoch, start_batch, _ = _latest_backup(backup_dir)

    train_stream, val_stream = _streams(cfg, strategy, train_data, val_data)
    counts = _class_counts(cfg, run_dir, train_data)
    net, trainer = build_trainer(cfg, strategy, model, default_strategy,
                                 class_weights_from(cfg.optimizer.class_weights, counts, cfg.model.num_classes))

    # Restore the last state before writing anything: a state that does not fit this config fails here. The
    # last state is kept after the run completes, so re-running a finished command is a no-op.
    backup = ResumableBackup(backup_dir, delete_checkpoint=False)
    backup.set_model(trainer)
    backup.restore()
    _keras_compat.set_initial_epoch(trainer, None)  # fit gets the epoch explicitly
    if chief:
        atomic_write_bytes(os.path.join(run_dir, "config.yaml"), cfg.to_yaml())
        if counts is not None:
            atomic_write_json(os.path.join(run_dir, FREQUENCIES_FILE), counts)

    cbs = run_callbacks(cfg, run_dir, chief, net, backup, callbacks)
    stopper = _StopOnInterrupt(backup, cfg.schedule.steps_per_epoch)
    cbs.append(stopper)

    start_step = start_epoch * cfg.schedule.steps_per_epoch + start_batch
    if start_step and cfg.runtime.verbose:
        print(f"deeplab-train: resuming {run_dir} from epoch {start_epoch} (step {start_step} of "
              f"{cfg.schedule.steps})", file=sys.stderr)
    history = {}

    def fit(first_epoch, skip):
        for cb in cbs:
            if isinstance(cb, _StepCallback):
                cb.skip = (first_epoch, skip)
        last_epoch = first_epoch + 1 if skip else cfg.schedule.epochs  # an epoch resumed inside: its own fit
        done = trainer.fit(train_stream(first_epoch, skip), epochs=last_epoch, initial_epoch=first_epoch,
                           steps_per_epoch=cfg.schedule.steps_per_epoch - skip, validation_data=val_stream,
                           validation_freq=max(cfg.schedule.validation_every, 1), callbacks=cbs,
                           verbose=cfg.runtime.verbose, shuffle=False)
        for key, values in done.history.items():
            history.setdefault(key, []).extend(values)
        return last_epoch

    with _stop_on_sigint(stopper):
        epoch = start_epoch
        if start_batch:
            epoch = fit(start_epoch, start_batch)
        if epoch < cfg.schedule.epochs:
            fit(epoch, 0)

    model_path = None
    if chief:
        model_path = os.path.join(run_dir, "model.keras")
        _atomic_save_keras(_float32_copy(net, cfg), model_path)
        atomic_write_json(os.path.join(run_dir, "summary.json"), {
            "steps": cfg.schedule.steps, "epochs": cfg.schedule.epochs, "resumed_from_epoch": start_epoch,
            "resumed_from_step": start_step,
            "history": {k: [float(x) for x in v] for k, v in history.items()}})
    return TrainResult(model=net, history=history, run_dir=run_dir, model_path=model_path,
                       resumed_from_epoch=start_epoch, num_replicas=replicas)
