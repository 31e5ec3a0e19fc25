"""Fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011) as a custom TensorFlow op.

:class:`CRFParams` holds the parameters (defaults: DeepLab v2 ResNet-101's) that every CRF entry point below takes
as ``params=`` (keyword overrides such as ``iterations=5`` still work). ``dense_crf(probs, images, ...)`` runs
mean-field inference with pydensecrf's semantics through a C++ permutohedral-lattice kernel; :class:`DenseCRF` is
the same as a Keras layer. Importing this package imports neither TensorFlow (beyond what Keras imports) nor the
op library: the names that need them load on first use, the op library on the first call
(``deeplab_keras.crf.build_op``).

``dense_crf_portable(probs, images, ...)`` is the same inference made of stock TensorFlow ops (no custom op, so it
exports to TF Serving, LiteRT and ONNX; ``deeplab_keras.crf.portable``), and ``crf_postprocess`` is its serving
helper (softmax at image size in, refined probabilities and labels out).

Example:
    >>> import numpy as np, deeplab_keras as dk
    >>> probs = np.full((1, 8, 8, 3), 1 / 3, "float32")
    >>> images = np.zeros((1, 8, 8, 3), "uint8")
    >>> refined = dk.crf.dense_crf(probs, images, dk.crf.CRFParams(iterations=5))
"""
from deeplab_keras.crf._loader import OpLibraryError, ensure_library, load_library
from deeplab_keras.crf.layer import CRFHead, DenseCRF  # registers its Keras name, so that saved models holding it load
from deeplab_keras.crf.params import CRFParams
from deeplab_keras.lazy import lazy_exports

# Names that import TensorFlow, by the submodule that defines them (loaded on first access).
_LAZY = {"dense_crf": "ops", "memory_estimate": "ops", "INPUT_TYPES": "ops", "MAX_MEMORY_ENV": "ops",
         "dense_crf_portable": "portable", "crf_postprocess": "portable"}

__all__ = ["CRFParams", "dense_crf", "DenseCRF", "CRFHead", "dense_crf_portable", "crf_postprocess", "memory_estimate",
           "INPUT_TYPES", "MAX_MEMORY_ENV", "OpLibraryError", "ensure_library", "load_library"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
