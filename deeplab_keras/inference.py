"""Dense prediction from logits: upsampling to the image size, multi-scale and flip test-time averaging."""
import numpy as np
import tensorflow as tf


def upsample_logits(logits, size):
    """Bilinear resize of logits [N,h,w,C] to ``size`` (H, W), as DeepLab's interpolation layer."""
    return tf.image.resize(logits, size, method="bilinear")


def predict_probabilities(model, images, scales=(1.0,), flip=False):
    """Softmax probabilities at the input size, averaged over test scales (and horizontal flips).

    Args:
        model: a DeepLab-style keras model (float32 RGB 0..255 in, logits at a lower resolution out).
        images: [N, H, W, 3] uint8 or float32 RGB 0..255.
        scales: input scales to average over (the paper's multi-scale testing uses e.g. 0.5..1.5).
        flip: also average over the horizontally flipped input.

    Returns:
        float32 numpy array [N, H, W, C].

    Example:
        >>> probs = predict_probabilities(model, images, scales=(0.75, 1.0, 1.25), flip=True)  # doctest: +SKIP
    """
    images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    size = tf.shape(images)[1:3]
    if not scales:
        raise ValueError("scales must hold at least one positive scale, e.g. (1.0,)")
    total, count = None, 0
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"scales={tuple(scales)!r}: every scale must be > 0")
        x = images if scale == 1.0 else tf.image.resize(
            images, tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), method="bilinear")
        for flipped in ((False, True) if flip else (False,)):
            inp = tf.reverse(x, axis=[2]) if flipped else x
            logits = tf.cast(model(inp, training=False), tf.float32)
            if flipped:
                logits = tf.reverse(logits, axis=[2])
            probs = tf.nn.softmax(upsample_logits(logits, size), axis=-1)
            total = probs if total is None else total + probs
            count += 1
    return (total / count).numpy()
