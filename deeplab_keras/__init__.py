"""DeepLab v2 semantic segmentation for TensorFlow / Keras 3.

Atrous (dilated) ResNet-50/101 and VGG-16 backbones, atrous spatial pyramid pooling (ASPP), multi-scale
max fusion (MSC) and a fully connected CRF as a custom TensorFlow op (Chen et al., TPAMI 2017).

Example:
    >>> import numpy as np, deeplab_keras as dk
    >>> model = dk.DeepLabV2(num_classes=21, backbone="resnet50", output_stride=8)
    >>> model(np.zeros((1, 65, 65, 3), "float32")).shape
    TensorShape([1, 9, 9, 21])
"""
import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if _os.environ["KERAS_BACKEND"] == "tensorflow":  # import TF now without its CUDA/oneDNN start-up noise
    from deeplab_keras.tf_startup import quiet_tensorflow as _quiet_tensorflow

    _quiet_tensorflow(python_logs=False)

from deeplab_keras.models.config import ModelConfig  # noqa: E402  (backend-free)
from deeplab_keras.models.deeplab import DeepLabV2  # noqa: E402  (the model core imports no TensorFlow)
import deeplab_keras.crf as crf  # noqa: E402  (no TensorFlow until the op is used; registers DenseCRF)

__version__ = "0.1.0"
__all__ = ["DeepLabV2", "ModelConfig", "crf", "__version__"]
