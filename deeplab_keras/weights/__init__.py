"""Weights for DeepLab v2 models: released Caffe and deeplab-pytorch files, Keras checkpoints, ImageNet transfer
and the released models by name.

Modules, lowest first (each imports only those above it, and :mod:`deeplab_keras.models.config`):
``caffe_reader`` (the ``.caffemodel`` reader) -> ``importer`` (Caffe names onto the model) -> ``pth`` (the
``.pth`` reader, kazuto1011 names onto Caffe's) -> ``convert`` (build the model a file implies and fill it) ->
``caffe`` (the ``.caffemodel`` API) -> ``checkpoints`` (``.keras`` files, ImageNet transfer) -> ``presets`` (the
registry table) -> ``download`` (fetch, verify, convert and cache a preset). No module here imports the model
module at import time. The names below load on first use.
"""
from deeplab_keras.lazy import lazy_exports

_HOMES = {
    "as_float32": "checkpoints", "is_float32": "checkpoints", "load_model": "checkpoints",
    "resolve_checkpoint": "checkpoints", "transfer_backbone_weights": "checkpoints",
    "CaffeModelError": "caffe", "caffemodel_config": "caffe", "convert_caffemodel": "caffe",
    "load_caffemodel": "caffe", "read_caffemodel": "caffe",
    "PthError": "pth", "load_pth": "pth", "read_pth": "pth",
    "PRESETS": "presets", "Preset": "presets", "PresetError": "presets", "get_preset": "presets",
    "register_preset": "presets",
    "from_preset": "download", "preset_path": "download",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
