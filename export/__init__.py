"""Export DeepLab v2 models for serving: SavedModel (TF Serving), TFLite (LiteRT builtins) and ONNX.

Every exporter writes atomically, runs the artifact in its own runtime on sample images, compares it with the Keras
model and refuses to publish an artifact outside tolerance. The command line is ``deeplab-export`` (``cli.py``).

Example:
    >>> import deeplab_keras as dk
    >>> from deeplab_keras.export import export_tflite
    >>> model = dk.DeepLabV2(num_classes=21, backbone="resnet101")
    >>> report = export_tflite(model, "deeplab.tflite", input_size=(513, 513))  # doctest: +SKIP
"""
from deeplab_keras.export.common import ExportError, serving_outputs
from deeplab_keras.export.onnx import export_onnx
from deeplab_keras.export.saved_model import export_saved_model
from deeplab_keras.export.tflite import export_tflite
from deeplab_keras.export.verify import Tolerance, VerificationError

__all__ = ["ExportError", "Tolerance", "VerificationError", "export_onnx", "export_saved_model", "export_tflite",
           "serving_outputs"]
