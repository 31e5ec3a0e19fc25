"""The one home of every private Keras API this package uses, pinned to the Keras version it is tested with.

Keras 3 has no public way to do these few things, so the package reaches into Keras internals here and only
here. Each use is one small function or class below; ``PRIVATE_APIS`` lists them, and ``check()`` says which
ones the installed Keras lacks. A function whose private API is missing raises ``KerasCompatError`` (one line
naming the API, the installed and the tested Keras version and the fix) instead of failing somewhere deep inside
``fit`` or an export. Importing this module warns once (``KerasVersionWarning``) when the installed Keras is not
``TESTED_KERAS_VERSION`` (requirements.txt pins it).

Private uses, by caller:

* training (``training/trainer.py``, ``training/callbacks.py``, ``training/run.py``, ``training/optimizer.py``):
  ``flatten_layers`` (``Layer._flatten_layers``), ``set_initial_epoch`` (``Trainer._initial_epoch``, what
  ``BackupAndRestore`` sets), ``SampleBatchBuild`` (``TensorFlowTrainer._maybe_symbolic_build``),
  ``BackupAndRestore`` (its ``_save_model`` hook and ``_current_epoch``), ``optimizer_variables``
  (``BaseOptimizer._trainable_variables``);
* models (``weights/checkpoints.py``): ``flatten_layers``;
* export (``export/onnx.py``): ``patch_tf2onnx`` (``keras.src.export.tf2onnx_lib``).

Example:
    >>> from deeplab_keras import _keras_compat
    >>> _keras_compat.check()           # names of the private APIs missing in the installed Keras
    []
"""
import warnings

import keras

#: The Keras version every private use below was checked against (requirements.txt pins it).
TESTED_KERAS_VERSION = "3.15.1"


class KerasCompatError(RuntimeError):
    """A private Keras API this package needs is missing or changed in the installed Keras."""


class KerasVersionWarning(UserWarning):
    """The installed Keras is not the version the private API uses were tested with."""


def _error(api, use):
    return KerasCompatError(
        f"{api} is missing in Keras {keras.__version__} (deeplab_keras needs it to {use}; tested with Keras "
        f"{TESTED_KERAS_VERSION}): install keras=={TESTED_KERAS_VERSION} (pip install -r requirements.txt)")


def _trainer_class():
    """``keras.Model`` under the TensorFlow backend (``_maybe_symbolic_build`` exists only in its trainer)."""
    return keras.Model if keras.backend.backend() == "tensorflow" else None


#: name -> (the private attribute's owner, attribute name, what the package needs it for).
PRIVATE_APIS = {
    "Layer._flatten_layers": (lambda: keras.layers.Layer, "_flatten_layers", "list every nested layer"),
    "Trainer._initial_epoch": (lambda: keras.Model(), "_initial_epoch", "resume fit at a restored epoch"),
    "TensorFlowTrainer._maybe_symbolic_build": (_trainer_class, "_maybe_symbolic_build",
                                                "build a distributed trainer from a local sample batch"),
    "BackupAndRestore._save_model": (lambda: keras.callbacks.BackupAndRestore, "_save_model",
                                     "write training states atomically"),
    "BackupAndRestore._current_epoch": (lambda: keras.callbacks.BackupAndRestore("/nonexistent"),
                                        "_current_epoch", "name the epoch of a training state"),
    "BaseOptimizer._trainable_variables": (lambda: keras.optimizers.SGD(), "_trainable_variables",
                                           "scale gradients per variable"),
    "keras.src.export.tf2onnx_lib.patch_tf2onnx": (None, None, "run tf2onnx under numpy 2"),
}


def _tf2onnx_patch():
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx as patch
    except ImportError:
        return None
    return patch


def check():
    """Names of the ``PRIVATE_APIS`` the installed Keras lacks (an empty list when all are there)."""
    missing = []
    for name, (owner, attribute, _) in PRIVATE_APIS.items():
        if attribute is None:
            present = _tf2onnx_patch() is not None
        else:
            target = owner()
            present = target is None or hasattr(target, attribute)
        if not present:
            missing.append(name)
    return missing


def check_version(version=None):
    """Warns (``KerasVersionWarning``, once per version) when ``version`` (default the installed Keras) is not
    ``TESTED_KERAS_VERSION``; returns True when it is."""
    version = version or keras.__version__
    if version == TESTED_KERAS_VERSION:
        return True
    warnings.warn(f"Keras {version} is installed; deeplab_keras uses private Keras APIs checked with Keras "
                  f"{TESTED_KERAS_VERSION} (deeplab_keras._keras_compat); if training or export fails, install "
                  f"keras=={TESTED_KERAS_VERSION}", KerasVersionWarning, stacklevel=2)
    return False


def flatten_layers(layer):
    """Every layer nested in ``layer`` (recursively, ``layer`` itself excluded), in Keras' tracking order."""
    if not hasattr(layer, "_flatten_layers"):
        raise _error("Layer._flatten_layers", PRIVATE_APIS["Layer._flatten_layers"][2])
    return list(layer._flatten_layers(include_self=False, recursive=True))


def set_initial_epoch(model, epoch):
    """Makes the next ``model.fit`` start at ``epoch`` (None: fit's own ``initial_epoch`` argument), as
    ``keras.callbacks.BackupAndRestore`` does."""
    if not hasattr(model, "_initial_epoch"):
        raise _error("Trainer._initial_epoch", PRIVATE_APIS["Trainer._initial_epoch"][2])
    model._initial_epoch = epoch


def optimizer_variables(optimizer):
    """The variables ``optimizer`` was built for (what ``apply(grads)`` without variables updates)."""
    if not hasattr(optimizer, "_trainable_variables"):
        raise _error("BaseOptimizer._trainable_variables", PRIVATE_APIS["BaseOptimizer._trainable_variables"][2])
    return optimizer._trainable_variables


def patch_tf2onnx():
    """Applies Keras' numpy-2 fixes to tf2onnx (1.17 still uses ``np.object`` / ``np.cast``); idempotent."""
    patch = _tf2onnx_patch()
    if patch is None:
        raise _error("keras.src.export.tf2onnx_lib.patch_tf2onnx",
                     PRIVATE_APIS["keras.src.export.tf2onnx_lib.patch_tf2onnx"][2])
    with warnings.catch_warnings():  # its `hasattr(np, "object")` probe warns on numpy 2
        warnings.simplefilter("ignore", FutureWarning)
        patch()


class SampleBatchBuild:
    """Mixin for a ``keras.Model`` subclass: under a distribution strategy, build from ``set_build_batch``'s
    batch instead of a batch peeked from the training iterator.

    Keras (TensorFlow backend) builds an unbuilt trainer in ``fit`` from a batch of the training iterator: that
    opens an extra iterator and, under ``MultiWorkerMirroredStrategy`` (Keras 3.15), fails reducing the
    per-replica batch. On other backends the hook is never called.

    Example:
        >>> class Trainer(SampleBatchBuild, keras.Model): ...          # doctest: +SKIP
        >>> set_build_batch(trainer, (images, labels, None))           # doctest: +SKIP
    """
    _build_batch = None

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        parent = getattr(super(), "_maybe_symbolic_build", None)
        if parent is None:
            raise _error("TensorFlowTrainer._maybe_symbolic_build",
                         PRIVATE_APIS["TensorFlowTrainer._maybe_symbolic_build"][2])
        if data_batch is None and self._build_batch is not None:
            return parent(data_batch=self._build_batch)
        return parent(iterator=iterator, data_batch=data_batch)


def set_build_batch(model, batch):
    """The ``(x, y, sample_weight)`` batch a ``SampleBatchBuild`` model builds from (None: Keras' default)."""
    model._build_batch = batch


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` whose saves go to ``save_state(epoch)`` (a subclass implements it).

    Keras calls its private ``_save_model`` hook (with the epoch in ``_current_epoch``) at each save point.
    """

    def _save_model(self):
        if not hasattr(self, "_current_epoch"):
            raise _error("BackupAndRestore._current_epoch", PRIVATE_APIS["BackupAndRestore._current_epoch"][2])
        self.save_state(self._current_epoch)

    def save_state(self, epoch):
        """Writes the training state after ``epoch`` epochs."""
        raise NotImplementedError


check_version()
