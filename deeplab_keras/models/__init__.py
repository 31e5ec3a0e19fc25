"""DeepLab v2 model assembly and weight handling."""
from deeplab_keras.models.caffe import (CaffeModelError, caffemodel_config, convert_caffemodel, load_caffemodel,
                                        read_caffemodel)
from deeplab_keras.models.deeplab import DeepLabV2, build_network
from deeplab_keras.models.pth import load_pth, read_pth
from deeplab_keras.models.weights import (as_float32, is_float32, load_model, resolve_checkpoint,
                                          transfer_backbone_weights)

__all__ = ["DeepLabV2", "build_network", "as_float32", "is_float32", "load_model", "resolve_checkpoint",
           "transfer_backbone_weights", "CaffeModelError", "caffemodel_config", "convert_caffemodel",
           "load_caffemodel", "read_caffemodel", "load_pth", "read_pth"]
