"""Training callbacks: resumable backups, step checkpoints, the history CSV plot and Ctrl-C handling."""
import contextlib
import os
import re
import signal
import sys
import threading

import keras

from deeplab_keras import _keras_compat
from deeplab_keras.training.history import HistoryPlot
from deeplab_keras.files import atomic_path

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


class ResumableBackup(_keras_compat.BackupAndRestore):
    """``BackupAndRestore`` that writes atomically and can tell where to resume before ``fit``.

    Each backup is ``backup_dir/state-<epoch>.weights.h5`` (weights + optimizer state after ``epoch`` epochs)
    or, when training stopped inside an epoch (Ctrl-C, :meth:`save_state`), ``state-<epoch>-<batch>.weights.h5``
    (``batch`` batches of epoch ``epoch`` done). Each is written under a temporary name and renamed
    (``files.atomic_path``), so a SIGKILL at any moment leaves the previous complete state; the position is in
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
        """Loads the newest state into the model (once); sets the epoch ``fit`` starts at.

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
        _keras_compat.set_initial_epoch(self.model, epoch)
        self.restored_epoch, self.restored_batch = epoch, batch

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
    """``model.save(path)`` through ``files.atomic_path`` (creates the folder)."""
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


def _tensorboard_available():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def run_callbacks(cfg, run_dir, chief, net, backup, extra=None):
    """The callbacks of a run, in order: ``backup``; on the chief the step checkpoints of ``net``, the history
    CSV, its plot and TensorBoard, as ``cfg`` asks; then ``extra``."""
    cbs = [backup]
    if chief:
        if cfg.schedule.checkpoint_every:
            cbs.append(ModelCheckpointEvery(net, os.path.join(run_dir, "checkpoints"),
                                            cfg.schedule.checkpoint_every, cfg.schedule.steps_per_epoch,
                                            cfg.schedule.keep_checkpoints))
        csv_path = os.path.join(run_dir, "history.csv")
        cbs.append(keras.callbacks.CSVLogger(csv_path, append=True))
        if cfg.runtime.plot:
            cbs.append(HistoryPlot(csv_path, os.path.join(run_dir, "history.png"), cfg.schedule.steps_per_epoch))
        if cfg.runtime.tensorboard:
            if _tensorboard_available():
                cbs.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), update_freq="epoch"))
            else:
                print("deeplab-train: the tensorboard package is not installed; no TensorBoard logs "
                      "(pip install tensorboard, or --set runtime.tensorboard=false)", file=sys.stderr)
    return cbs + list(extra or [])
