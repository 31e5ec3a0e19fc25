"""SGD with per-variable learning-rate multipliers (Caffe's ``lr_mult``): :class:`ScaledSGD`."""
import re

import keras
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.models.deeplab import CLASSIFIER_PATTERN


@keras.saving.register_keras_serializable(package="deeplab_keras")
class ScaledSGD(keras.optimizers.SGD):
    """SGD (with momentum) whose gradients are multiplied per variable: Caffe's ``lr_mult``.

    With momentum SGD, scaling a variable's gradient by ``m`` is the same as running it at ``m`` times the
    learning rate. The multiplier of a variable is the product of the ``multipliers`` whose regex matches
    its ``variable.path`` (``re.search``). Scaling happens before the cross-replica gradient sum (it is
    linear, so the order does not matter) and after loss-scale unscaling (``LossScaleOptimizer`` calls
    ``apply`` of this inner optimizer).

    Args:
        learning_rate: float or schedule.
        momentum: momentum.
        multipliers: list of ``[regex, factor]`` pairs.
        **kwargs: the rest of ``keras.optimizers.SGD``.
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, multipliers=(), **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.multipliers = [[str(p), float(f)] for p, f in multipliers]
        self._compiled = [(re.compile(p), f) for p, f in self.multipliers]

    def multiplier(self, variable):
        """The learning-rate multiplier of ``variable``."""
        path = getattr(variable, "path", None) or variable.name
        factor = 1.0
        for pattern, f in self._compiled:
            if pattern.search(path):
                factor *= f
        return factor

    def apply(self, grads, trainable_variables=None):
        variables = (_keras_compat.optimizer_variables(self) if trainable_variables is None
                     else list(trainable_variables))
        grads = list(grads)
        if len(variables) == len(grads):
            scaled = []
            for g, v in zip(grads, variables):
                m = self.multiplier(v)
                scaled.append(g if g is None or m == 1.0 else g * tf.cast(m, g.dtype))
            grads = scaled
        return super().apply(grads, trainable_variables)

    def get_config(self):
        config = super().get_config()
        config["multipliers"] = self.multipliers
        return config


BIAS_PATTERN = r"(^|/)bias(:\d+)?$"


def classifier_pattern(cfg):
    """The regex of the classifier variables: ``optimizer.classifier_pattern``, or (null) the model's
    (``deeplab_keras.models.deeplab.CLASSIFIER_PATTERN``)."""
    if cfg.optimizer.classifier_pattern is not None:
        return cfg.optimizer.classifier_pattern
    return CLASSIFIER_PATTERN


def build_optimizer(cfg):
    """The recipe's optimizer for a :class:`TrainConfig`: :class:`ScaledSGD` on the poly schedule with the
    classifier / bias multipliers, wrapped in ``LossScaleOptimizer`` for ``mixed_float16``.

    Example:
        >>> from deeplab_keras.training import load_config
        >>> type(build_optimizer(load_config("tiny_cpu"))).__name__
        'ScaledSGD'
    """
    opt = cfg.optimizer
    schedule = keras.optimizers.schedules.PolynomialDecay(
        cfg.learning_rate, decay_steps=cfg.schedule.steps, end_learning_rate=opt.end_lr, power=opt.lr_power)
    multipliers = []
    if opt.classifier_lr_mult != 1.0:
        multipliers.append([classifier_pattern(cfg), opt.classifier_lr_mult])
    if opt.bias_lr_mult != 1.0:
        multipliers.append([BIAS_PATTERN, opt.bias_lr_mult])
    optimizer = ScaledSGD(schedule, momentum=opt.momentum, multipliers=multipliers)
    if cfg.runtime.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def check_classifier_pattern(net, cfg):
    """Raises ValueError when the classifier pattern (with a multiplier != 1) matches no trainable variable."""
    pattern = classifier_pattern(cfg)
    n_classifier = sum(1 for v in net.trainable_variables if re.search(pattern, getattr(v, "path", v.name)))
    if cfg.optimizer.classifier_lr_mult != 1.0 and n_classifier == 0:
        raise ValueError(f"optimizer.classifier_pattern {pattern!r} matches no trainable variable of the "
                         f"model; variable paths look like {net.trainable_variables[-1].path!r}")
