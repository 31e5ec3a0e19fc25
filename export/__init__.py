"""Export DeepLab v2 models for serving: SavedModel (TF Serving), TFLite (LiteRT builtins) and ONNX.

One driver (``driver.export_model``) writes every format atomically, runs the artifact in its own runtime on
sample images, compares it with the Keras model and refuses to publish an artifact outside tolerance; each format
(``saved_model``, ``tflite``, ``onnx``) supplies its conversion and runtime hooks. The command line is
``deeplab export`` / ``deeplab-export`` (``deeplab_keras.cli.export``).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.export import export_model, portable_crf
    >>> model = dk.DeepLabV2(num_classes=21, backbone="resnet101")
    >>> report = export_model(model, "tflite", "deeplab.tflite", input_size=(513, 513))  # doctest: +SKIP
    >>> report = export_model(model, "onnx", "crf.onnx", crf=portable_crf(iterations=5))  # doctest: +SKIP
"""
from deeplab_keras.export.errors import ExportError
from deeplab_keras.export.serving import portable_crf, serving_outputs
from deeplab_keras.export.driver import FORMATS, export_model
from deeplab_keras.export.onnx import export_onnx
from deeplab_keras.export.saved_model import export_saved_model
from deeplab_keras.export.tflite import export_tflite
from deeplab_keras.export.verify import Tolerance, VerificationError

__all__ = ["ExportError", "FORMATS", "Tolerance", "VerificationError", "export_model", "export_onnx",
           "export_saved_model", "export_tflite", "portable_crf", "serving_outputs"]
