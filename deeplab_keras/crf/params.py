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
import math
import numbers

__all__ = ["CRFParams", "MAX_ITERATIONS", "MAX_WEIGHT"]

MAX_ITERATIONS = 10000  # the op's limit (dense_crf.h kMaxIterations)
MAX_WEIGHT = 1e6  # the op's limit on a kernel weight


@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Fully connected CRF parameters (pydensecrf meaning); defaults are DeepLab v2 ResNet-101's.

    Args:
        iterations: mean-field iterations, an int in 0..10000 (0 returns the clipped, normalised input).
        bilateral_weight: weight (Potts ``compat``) of the appearance kernel, in 0..1e6 (0 leaves it out).
        bilateral_xy_std: its spatial standard deviation in pixels, > 0.
        bilateral_rgb_std: its colour standard deviation in intensity levels (0..255 scale), > 0.
        gaussian_weight: weight of the smoothness kernel, in 0..1e6 (0 leaves it out).
        gaussian_xy_std: its spatial standard deviation in pixels, > 0.

    Raises:
        ValueError: a value of the wrong type or out of range (one line naming the field).

    Example:
        >>> CRFParams(iterations=5, bilateral_weight=5).bilateral_weight
        5.0
    """

    iterations: int = 10
    bilateral_weight: float = 4.0
    bilateral_xy_std: float = 67.0
    bilateral_rgb_std: float = 3.0
    gaussian_weight: float = 3.0
    gaussian_xy_std: float = 1.0

    def __post_init__(self):
        iterations = self.iterations
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
            raise ValueError(f"CRFParams: iterations must be an int in 0..{MAX_ITERATIONS}, got {iterations!r}")
        if not 0 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"CRFParams: iterations must be in 0..{MAX_ITERATIONS}, got {iterations}")
        object.__setattr__(self, "iterations", int(iterations))
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            weight = field.name.endswith("_weight")
            rule = f"in 0..{MAX_WEIGHT:g}" if weight else "> 0"
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"CRFParams: {field.name} must be a number {rule}, got {value!r}")
            value = float(value)
            if not math.isfinite(value) or not (0 <= value <= MAX_WEIGHT if weight else value > 0):
                raise ValueError(f"CRFParams: {field.name} must be a finite number {rule}, got {value!r}")
            object.__setattr__(self, field.name, value)

    @classmethod
    def keys(cls):
        """The field names, in order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def to_dict(self):
        """``{field: value}`` (JSON / YAML-safe: an int and floats)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A CRFParams from a (possibly partial) dict; missing fields keep their defaults.

        Raises:
            ValueError: an unknown key (the message lists the valid ones) or a bad value.
        """
        if not isinstance(values, dict):
            raise ValueError(f"CRFParams: expected a dict of parameters, got {type(values).__name__}")
        unknown = sorted(str(key) for key in values if key not in cls.keys())
        if unknown:
            raise ValueError(f"CRFParams: unknown parameter {', '.join(unknown)}; valid keys: "
                             f"{', '.join(cls.keys())}")
        return cls(**values)

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
