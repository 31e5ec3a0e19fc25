"""DeepLab v2 model assembly and weight handling.

Modules, lowest first (each imports only those above it): ``config`` (ModelConfig, backend-free) ->
``caffe_reader``, ``importer``, ``pth``, ``caffe`` (weights files, no model building except through
:meth:`ModelConfig.build`) -> ``weights`` (checkpoints, ImageNet) -> ``presets`` -> ``msc``, ``deeplab`` (the model).
The names below load on first use, so ``deeplab_keras.models.config`` imports no Keras.
"""
from deeplab_keras.lazy import lazy_exports

_HOMES = {
    "ModelConfig": "config",
    "DeepLabV2": "deeplab", "build_network": "deeplab", "CLASSIFIER_PATTERN": "deeplab", "MSC": "msc",
    "as_float32": "weights", "is_float32": "weights", "load_model": "weights", "resolve_checkpoint": "weights",
    "transfer_backbone_weights": "weights",
    "CaffeModelError": "caffe", "caffemodel_config": "caffe", "convert_caffemodel": "caffe",
    "load_caffemodel": "caffe", "read_caffemodel": "caffe",
    "load_pth": "pth", "read_pth": "pth",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
