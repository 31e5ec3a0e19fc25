"""SGD with per-variable learning-rate multipliers (Caffe's ``lr_mult``): :class:`ScaledSGD`."""
import re

import keras
import tensorflow as tf


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
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
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


def build_optimizer(cfg):
    """The recipe's optimizer for a :class:`TrainConfig`: :class:`ScaledSGD` on the poly schedule with the
    classifier / bias multipliers, wrapped in ``LossScaleOptimizer`` for ``mixed_float16``.

    Example:
        >>> from deeplab_keras.training import load_config
        >>> type(build_optimizer(load_config("tiny_cpu"))).__name__
        'ScaledSGD'
    """
    schedule = keras.optimizers.schedules.PolynomialDecay(
        cfg.resolved_base_lr, decay_steps=cfg.steps, end_learning_rate=cfg.end_lr, power=cfg.lr_power)
    multipliers = []
    if cfg.classifier_lr_mult != 1.0:
        multipliers.append([cfg.classifier_pattern, cfg.classifier_lr_mult])
    if cfg.bias_lr_mult != 1.0:
        multipliers.append([BIAS_PATTERN, cfg.bias_lr_mult])
    optimizer = ScaledSGD(schedule, momentum=cfg.momentum, multipliers=multipliers)
    if cfg.mixed_precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def check_classifier_pattern(net, cfg):
    """Raises ValueError when ``cfg.classifier_pattern`` (with a multiplier != 1) matches no trainable variable."""
    n_classifier = sum(1 for v in net.trainable_variables
                       if re.search(cfg.classifier_pattern, getattr(v, "path", v.name)))
    if cfg.classifier_lr_mult != 1.0 and n_classifier == 0:
        raise ValueError(f"classifier_pattern {cfg.classifier_pattern!r} matches no trainable variable of the "
                         f"model; variable paths look like {net.trainable_variables[-1].path!r}")
