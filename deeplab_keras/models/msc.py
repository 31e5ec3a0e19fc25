"""Multi-scale inputs with max fusion (MSC, DeepLab v2 section 4.1) as one wrapper around a single-scale network."""
import keras

from deeplab_keras.layers.preprocessing import CaffeInterp, ResizeLike


class MSC:
    """Run ``network`` on the input at every scale and fuse the logits by pixel-wise max.

    Each scale's input is the image resized by Caffe's ``Interp`` (0.75: 513 -> 385, 0.5: 513 -> 257;
    corner-aligned bilinear); each scale's logits are resized (corner-aligned) to the scale-1 logits size. The
    weights are the network's, shared by all scales. The resize layers are named ``msc_input_<scale>``
    (``msc_input_0_75``), ``msc_resize`` and ``msc_fuse``; they hold no weights.

    Works on symbolic tensors (building the functional :class:`~deeplab_keras.DeepLabV2`) and on real ones.

    Args:
        network: single-scale model, images [N, H, W, 3] -> logits [N, h, w, C].
        scales: scales that include 1.0, e.g. (1.0, 0.75, 0.5); ``(1.0,)`` is the plain network.

    Example:
        >>> import numpy as np
        >>> from deeplab_keras.models.deeplab import build_network
        >>> from deeplab_keras.models.config import ModelConfig
        >>> msc = MSC(build_network(ModelConfig(3, "vgg16", aspp="largefov", width_multiplier=0.0625)), (1.0, 0.5))
        >>> sorted(msc(np.zeros((1, 65, 65, 3), "float32")))
        ['fused', 'scale_0.5', 'scale_1.0']
    """

    def __init__(self, network, scales=(1.0,)):
        self.network = network
        self.scales = tuple(float(s) for s in scales)
        self.inputs = {s: CaffeInterp(s, name=f"msc_input_{s:g}".replace(".", "_")) for s in self.scales if s != 1.0}
        self.resize = ResizeLike(dtype="float32", name="msc_resize")
        self.fuse = keras.layers.Maximum(dtype="float32", name="msc_fuse")

    def __call__(self, images, training=None):
        """Logits at every scale and the fused ones, all at the scale-1 logits size.

        Returns:
            dict ``{"scale_1.0": ..., "scale_0.75": ..., "fused": ...}`` of float32 [N, h, w, C] tensors
            (``fused`` is the scale-1 logits themselves for a single scale).
        """
        reference = self.network(images, training=training)
        out = {}
        for s in self.scales:
            if s == 1.0:
                out[f"scale_{s}"] = reference
            else:
                out[f"scale_{s}"] = self.resize([self.network(self.inputs[s](images), training=training), reference])
        out["fused"] = self.fuse(list(out.values())) if len(out) > 1 else reference
        return out
