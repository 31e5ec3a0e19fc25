"""Fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011) as a custom TensorFlow op.

``dense_crf(probs, images, ...)`` runs mean-field inference with pydensecrf's semantics through a C++
permutohedral-lattice kernel; :class:`DenseCRF` is the same as a Keras layer. Importing this package does not
load or build the op library: the first call does (see ``deeplab_keras.crf.build_op``).

``dense_crf_portable(probs, images, ...)`` is the same inference made of stock TensorFlow ops (no custom op, so it
exports to TF Serving, LiteRT and ONNX; ``deeplab_keras.crf.portable``), and ``crf_postprocess`` is its serving
helper (softmax at image size in, refined probabilities and labels out).

Example:
    >>> import numpy as np, deeplab_keras as dk
    >>> probs = np.full((1, 8, 8, 3), 1 / 3, "float32")
    >>> images = np.zeros((1, 8, 8, 3), "uint8")
    >>> refined = dk.crf.dense_crf(probs, images, iterations=5)
"""
from deeplab_keras.crf._loader import OpLibraryError, ensure_library, load_library
from deeplab_keras.crf.ops import INPUT_TYPES, MAX_MEMORY_ENV, dense_crf, memory_estimate
from deeplab_keras.crf.portable import crf_postprocess, dense_crf_portable
from deeplab_keras.layers.crf import DenseCRF

__all__ = ["dense_crf", "DenseCRF", "dense_crf_portable", "crf_postprocess", "memory_estimate", "INPUT_TYPES",
           "MAX_MEMORY_ENV", "OpLibraryError", "ensure_library", "load_library"]
