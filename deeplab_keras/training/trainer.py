"""The model side of training: :func:`build_model` and the ``fit`` wrapper :class:`SegmentationTrainer`."""
import keras
import numpy as np
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.training.config import _as_config
from deeplab_keras.training.losses import (SegmentationMeanIoU, class_weights_from, pixel_weights,
                                           segmentation_loss)
from deeplab_keras.training.optimizer import build_optimizer, check_classifier_pattern


def _conv_kernels(model):
    """Trainable rank-4 ``kernel`` variables (convolution kernels)."""
    return [v for v in model.trainable_variables
            if (getattr(v, "path", None) or v.name).split("/")[-1].split(":")[0] == "kernel"
            and len(v.shape) == 4]


# ----------------------------------------------------------------------------------------------------------
# The training wrapper
# ----------------------------------------------------------------------------------------------------------
class SegmentationTrainer(_keras_compat.SampleBatchBuild, keras.Model):
    """Wraps a DeepLab model for ``fit``: the loss of the recipe, MSC losses, class weights, gradient accumulation
    and the mIoU metric.

    The wrapped ``net`` stays an ordinary, uncompiled model (save it with ``net.save``); this wrapper only
    exists during training and is not meant to be saved.

    Gradient accumulation (``accumulation_steps`` K > 1, Caffe's ``iter_size``): each ``fit`` step takes a batch of
    K x ``data.batch_size`` images, runs it as K micro-batches one after another (a ``tf.while_loop`` with
    ``parallel_iterations=1``, so only one micro-batch's activations are alive), sums their gradients and makes one
    optimizer update. The loss of every micro-batch is normalised by the valid-pixel count (summed class weights) of
    the whole batch and the weight decay counted once per update, so with frozen batch norm the update equals
    that of one batch of K x ``data.batch_size`` (ignored pixels included); steps, checkpoints and the poly
    schedule count updates. (Keras' ``gradient_accumulation_steps`` would make every micro-batch a ``fit`` step:
    ``schedule.steps``, checkpoints and resume would count micro-batches.)

    Args:
        net: the DeepLab model (logits [N,h,w,C]; ``multi_scale_logits`` when ``msc``).
        num_classes: number of classes (for the metric).
        msc: train with every scale's logits plus the fused ones (sum of their losses).
        weight_decay: L2 factor (Caffe convention: gradient ``weight_decay * kernel``) on conv kernels.
        ignore_label: label to ignore.
        upsample_logits: see :func:`segmentation_loss`.
        class_weights: None or num_classes loss weights (see :func:`segmentation_loss`).
        accumulation_steps: micro-batches per update (needs ``upsample_logits``).
    """

    def __init__(self, net, num_classes, msc=False, weight_decay=0.0, ignore_label=255, upsample_logits=True,
                 class_weights=None, accumulation_steps=1, **kwargs):
        super().__init__(**kwargs)
        self.class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
        self.accumulation_steps = int(accumulation_steps)
        if self.accumulation_steps > 1 and not upsample_logits:
            raise ValueError("optimizer.accumulation_steps > 1 needs optimizer.upsample_logits=true (the loss "
                             "is normalised by the whole batch's full-resolution valid-pixel count)")
        self.net = net
        self.msc = bool(msc)
        self.weight_decay = float(weight_decay)
        self.ignore_label = int(ignore_label)
        self.upsample_logits = bool(upsample_logits)
        self.miou = SegmentationMeanIoU(num_classes, ignore_label=ignore_label, name="miou")

    def call(self, images, training=False):
        if self.msc and training:
            outputs = self.net.multi_scale_logits(images, training=True)
            if not isinstance(outputs, dict) or "fused" not in outputs:
                raise ValueError("net.multi_scale_logits must return a dict with a 'fused' entry, got "
                                 f"{type(outputs).__name__}")
            return dict(outputs)
        return {"fused": self.net(images, training=training)}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self._loss(y, y_pred, training=training)

    def _loss(self, y, y_pred, count=None, decay_share=1.0, training=True):
        """The loss of one replica: each output's weighted cross-entropy sum over ``count`` (None: the batch's
        valid-pixel count summed over replicas), plus ``decay_share`` of the weight decay."""
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        total = tf.constant(0.0, tf.float32)
        for key in sorted(y_pred):
            loss_sum, n = segmentation_loss(y, y_pred[key], self.ignore_label, self.upsample_logits,
                                            self.class_weights)
            if count is not None:
                n = count
            elif replicas > 1:
                n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, n)
            # Gradients are summed over replicas, so sum/global_count gives the global mean.
            total += loss_sum / tf.maximum(tf.stop_gradient(n), 1e-6)
        if self.weight_decay > 0 and training:
            kernels = _conv_kernels(self.net)
            if kernels:
                l2 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(k, tf.float32))) for k in kernels])
                total += 0.5 * self.weight_decay * decay_share * l2 / float(replicas)
        return total

    def train_step(self, data):
        if self.accumulation_steps == 1:
            return super().train_step(data)
        images, labels = data[0], data[1]
        if labels.shape.rank == 4:
            labels = tf.squeeze(labels, -1)
        k = self.accumulation_steps
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        count = tf.reduce_sum(pixel_weights(labels, self.ignore_label, self.class_weights)[0])
        if replicas > 1:
            count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
        variables = self.trainable_weights
        size = tf.shape(images)[0] // k

        def micro_batch(i, loss, *grads):
            x, y = images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                step_loss = self._loss(y, y_pred, count=count, decay_share=1.0 / k)
                scaled = self.optimizer.scale_loss(step_loss)
            new = tape.gradient(scaled, variables)
            self.miou.update_state(y, y_pred["fused"])
            return (i + 1, loss + step_loss) + tuple(g if n is None else g + tf.cast(n, g.dtype)
                                                      for g, n in zip(grads, new))

        zeros = tuple(tf.zeros(v.shape, v.dtype) for v in variables)
        out = tf.while_loop(lambda i, *_: i < k, micro_batch, (tf.constant(0), tf.constant(0.0)) + zeros,
                            parallel_iterations=1)
        self.optimizer.apply_gradients(zip(out[2:], variables))
        tracker = next(m for m in self.metrics if m.name == "loss")
        tracker.update_state(out[1] * float(replicas), sample_weight=tf.shape(images)[0])
        return self._metric_results()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.miou.update_state(y, y_pred["fused"])
        return self._metric_results()

    def _metric_results(self):
        results = self.get_metrics_result()
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 averages the replicas' metric results with strategy.reduce("MEAN", v, axis=0) under
            # MultiWorkerMirroredStrategy, which needs at least one dimension.
            results = {k: tf.reshape(v, [1]) for k, v in results.items()}
        return results


class _policy_scope:
    """Sets the global Keras dtype policy for a block and restores it."""

    def __init__(self, policy):
        self.policy = policy or "float32"

    def __enter__(self):
        self.saved = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.policy)

    def __exit__(self, *exc):
        keras.mixed_precision.set_global_policy(self.saved)


def build_model(config):
    """The DeepLab model of ``config.model`` (``ModelConfig.build`` with ``optimizer.init_weights``), under the
    config's dtype policy."""
    cfg = _as_config(config)
    with _policy_scope(cfg.runtime.precision):
        return cfg.model.build(weights=cfg.optimizer.init_weights)


def _float32_copy(net, cfg):
    """A float32 copy of a mixed-precision model (``models.as_float32``); ``net`` itself otherwise."""
    if not cfg.runtime.mixed:
        return net
    from deeplab_keras.weights import as_float32

    return as_float32(net)


def _clone_into_scope(net, strategy, cfg):
    with strategy.scope(), _policy_scope(cfg.runtime.precision):
        copy = net.__class__.from_config(net.get_config())
    sample = np.zeros((1, 65, 65, 3), "float32")
    copy(sample)
    copy.set_weights(net.get_weights())
    return copy


def build_trainer(cfg, strategy, model=None, default_strategy=True, class_weights=None):
    """(net, trainer): the model (built from ``cfg``, ``model`` itself, or a copy of it in ``strategy``'s scope)
    with batch norm frozen or trained as ``cfg`` says, and its compiled, built :class:`SegmentationTrainer`.

    Args:
        class_weights: the loss weights (``losses.class_weights_from``); None: the list in
            ``optimizer.class_weights`` if it is one, else none.

    Raises:
        ValueError: ``optimizer.classifier_pattern`` matches no trainable variable; a class-weight list of the wrong
            length; ``accumulation_steps`` > 1 without ``upsample_logits``.
    """
    if class_weights is None and isinstance(cfg.optimizer.class_weights, (list, tuple)):
        class_weights = class_weights_from(cfg.optimizer.class_weights, num_classes=cfg.model.num_classes)
    opt = cfg.optimizer
    with strategy.scope():
        if model is None:
            net = build_model(cfg)
        elif default_strategy:
            net = model
        else:
            net = _clone_into_scope(model, strategy, cfg)
        for layer in _keras_compat.flatten_layers(net):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = bool(opt.train_bn)
                if opt.train_bn and opt.bn_momentum is not None:
                    layer.momentum = float(opt.bn_momentum)
        with _policy_scope(cfg.runtime.precision):
            trainer = SegmentationTrainer(net, cfg.model.num_classes, msc=bool(cfg.model.msc_scales),
                                          weight_decay=opt.weight_decay, ignore_label=cfg.data.ignore_label,
                                          upsample_logits=opt.upsample_logits, class_weights=class_weights,
                                          accumulation_steps=opt.accumulation_steps, name="segmentation_trainer")
            trainer.compile(optimizer=build_optimizer(cfg))
        h, w = (min(int(c), 65) for c in cfg.data.crop_size)
        trainer(np.zeros((1, h, w, 3), "float32"))  # build before restore
        _keras_compat.set_build_batch(trainer, (np.zeros((1, h, w, 3), "float32"), np.zeros((1, h, w), "uint8"),
                                                None))
    check_classifier_pattern(net, cfg)
    return net, trainer
