"""The DeepLab v2 model: ``config`` (:class:`ModelConfig`, backend-free) -> ``msc`` (multi-scale fusion) ->
``deeplab`` (:class:`DeepLabV2`). Weights files, checkpoints and presets are :mod:`deeplab_keras.weights`'.
The names below load on first use, so ``deeplab_keras.models.config`` imports no Keras.
"""
from deeplab_keras.lazy import lazy_exports

_HOMES = {
    "ModelConfig": "config",
    "DeepLabV2": "deeplab", "build_network": "deeplab", "CLASSIFIER_PATTERN": "deeplab", "MSC": "msc",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
