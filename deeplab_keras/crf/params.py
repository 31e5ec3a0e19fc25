"""``CRFParams``: the dense CRF's parameters, their defaults and their validation (one home; no TensorFlow).

The defaults are DeepLab v2 ResNet-101's (the released VOC 2012 test prototxt's ``DenseCRF`` layer:
``max_iter 10, bi_w 4, bi_xy_std 67, bi_rgb_std 3, pos_w 3, pos_xy_std 1``), in pydensecrf's terms:
``addPairwiseBilateral(sxy=bilateral_xy_std, srgb=bilateral_rgb_std, compat=bilateral_weight)`` and
``addPairwiseGaussian(sxy=gaussian_xy_std, compat=gaussian_weight)``. The C++ op, the portable CRF, the Keras
layer, evaluation, prediction and export all take their values from here.

Example:
    >>> from deeplab_keras.crf.params import CRFParams
    >>> CRFParams().bilateral_xy_std
    67.0
    >>> CRFParams.parse(["bilateral_weight=5"], iterations=5).to_dict()["iterations"]
    5
"""
import dataclasses
from typing import ClassVar

from deeplab_keras.config_base import ConfigBase

__all__ = ["CRFParams", "MAX_ITERATIONS", "MAX_WEIGHT"]

MAX_ITERATIONS = 10000  # the op's limit (dense_crf.h kMaxIterations)
MAX_WEIGHT = 1e6  # the op's limit on a kernel weight


@dataclasses.dataclass(frozen=True)
class CRFParams(ConfigBase):
    """Fully connected CRF parameters (pydensecrf meaning); defaults are DeepLab v2 ResNet-101's.

    Args:
        iterations: mean-field iterations, an int in 0..10000 (0 returns the clipped, normalised input).
        bilateral_weight: weight (Potts ``compat``) of the appearance kernel, in 0..1e6 (0 leaves it out).
        bilateral_xy_std: its spatial standard deviation in pixels, > 0.
        bilateral_rgb_std: its colour standard deviation in intensity levels (0..255 scale), > 0.
        gaussian_weight: weight of the smoothness kernel, in 0..1e6 (0 leaves it out).
        gaussian_xy_std: its spatial standard deviation in pixels, > 0.

    Raises:
        ValueError: a value of the wrong type or out of range (one line: ``crf.<key> must be ..., got ...``).

    Example:
        >>> CRFParams(iterations=5, bilateral_weight=5).bilateral_weight
        5.0
    """

    SECTION: ClassVar[str] = "crf"
    iterations: int = 10
    bilateral_weight: float = 4.0
    bilateral_xy_std: float = 67.0
    bilateral_rgb_std: float = 3.0
    gaussian_weight: float = 3.0
    gaussian_xy_std: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        for name in self.keys()[1:]:  # the weights and deviations as floats
            object.__setattr__(self, name, float(getattr(self, name)))

    def validate(self):
        self._ints(0, "iterations", high=MAX_ITERATIONS)
        self._numbers(0, "bilateral_weight", "gaussian_weight", high=MAX_WEIGHT)
        self._numbers(0, "bilateral_xy_std", "bilateral_rgb_std", "gaussian_xy_std", strict=True)

    @classmethod
    def resolve(cls, params=None, **overrides):
        """``params`` (a CRFParams, a dict of some fields, or None for the defaults) with ``overrides`` applied.

        Example:
            >>> CRFParams.resolve({"iterations": 3}, gaussian_weight=0).to_dict()["gaussian_weight"]
            0.0
        """
        if params is None:
            params = cls()
        elif isinstance(params, dict):
            params = cls.from_dict(params)
        elif not isinstance(params, cls):
            raise ValueError(f"CRF params must be a CRFParams, a dict or None, got {params!r}")
        if overrides:
            cls.from_dict(overrides)  # names an unknown key
            params = dataclasses.replace(params, **overrides)
        return params

    @classmethod
    def parse(cls, items=(), iterations=None):
        """A CRFParams from ``"key=value"`` strings (the CLI's ``--crf-params``) and ``--crf-iterations``.

        Args:
            items: strings ``"key=value"``; ``-`` in a key reads as ``_`` (``bilateral-weight=5``).
            iterations: when not None, the mean-field iterations (overrides an ``iterations=`` item).

        Raises:
            ValueError: one line naming the item and the valid keys, or the bad value.

        Example:
            >>> CRFParams.parse(["bilateral-xy-std=50"]).bilateral_xy_std
            50.0
        """
        values = {}
        for item in items:
            key, sep, text = str(item).partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in cls.keys():
                raise ValueError(f"CRF parameter {item!r}: expected KEY=NUMBER with KEY one of {', '.join(cls.keys())}")
            try:
                values[key] = int(text) if key == "iterations" else float(text)
            except ValueError:
                kind = "an int" if key == "iterations" else "a number"
                raise ValueError(f"CRF parameter {item!r}: {key} must be {kind}, got {text.strip()!r}") from None
        if iterations is not None:
            values["iterations"] = iterations
        return cls(**values)
