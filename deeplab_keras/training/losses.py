"""The loss and metric of the recipe: :func:`segmentation_loss` (ignores 255, VALID normalisation) and
:class:`SegmentationMeanIoU`, both resizing logits and labels as the config says.
"""
import keras
import tensorflow as tf

from deeplab_keras import inference

# The logits resize of the loss and the metric: ``deeplab_keras.inference.upsample_logits`` (corner-aligned
# bilinear in float32, logit i on pixel OS * i as Caffe's Interp), the same one evaluation, prediction and the
# exported graphs use. ``resize_logits`` is kept as the name this module has always exported.
resize_logits = inference.upsample_logits


def _resize_labels(labels, size):
    """Nearest-neighbour (corner-aligned) resize of labels [N,H,W] to ``size``."""
    labels = tf.expand_dims(labels, -1)
    resized = tf.raw_ops.ResizeNearestNeighbor(images=labels, size=tf.cast(size, tf.int32), align_corners=True,
                                               half_pixel_centers=False)
    return tf.squeeze(resized, -1)


def segmentation_loss(labels, logits, ignore_label=255, upsample_logits=True):
    """Summed sparse softmax cross-entropy over non-ignored pixels, and their count.

    Args:
        labels: [N,H,W] integer labels; ``ignore_label`` pixels do not count.
        logits: [N,h,w,C] logits (any float dtype; computed in float32).
        ignore_label: label value to ignore.
        upsample_logits: resize logits to the label size (True) or labels to the logit size (False).

    Returns:
        (loss_sum, valid_count): float32 scalars; the mean loss is ``loss_sum / valid_count``.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 4:
        labels = tf.squeeze(labels, -1)
    if upsample_logits:
        logits = resize_logits(logits, tf.shape(labels)[1:3])
    else:
        logits = tf.cast(logits, tf.float32)
        labels = _resize_labels(labels, tf.shape(logits)[1:3])
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    ce = tf.where(valid, ce, tf.zeros_like(ce))
    return tf.reduce_sum(ce), tf.reduce_sum(tf.cast(valid, tf.float32))


class SegmentationMeanIoU(keras.metrics.MeanIoU):
    """``keras.metrics.MeanIoU`` over logits at any resolution: resizes them to the labels, ignores 255.

    Args:
        num_classes: number of classes.
        ignore_label: label value that does not count.
        name: metric name.
    """

    def __init__(self, num_classes, ignore_label=255, name="miou", **kwargs):
        kwargs.pop("ignore_class", None)
        kwargs.pop("sparse_y_pred", None)
        super().__init__(num_classes=num_classes, name=name, ignore_class=ignore_label, sparse_y_pred=False,
                         **kwargs)
        self.ignore_label = ignore_label

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.convert_to_tensor(y_true)
        if y_true.shape.rank == 4:
            y_true = tf.squeeze(y_true, -1)
        y_pred = resize_logits(y_pred, tf.shape(y_true)[1:3])
        return super().update_state(tf.cast(y_true, tf.int32), y_pred, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.pop("ignore_class", None)
        config.pop("sparse_y_pred", None)
        config["ignore_label"] = self.ignore_label
        return config
