"""The one base of the config dataclasses (``ModelConfig``, ``CRFConfig``, ``CRFParams``, the training sections):
typed-field checks, ``from_dict`` / ``to_dict`` and one error wording, ``<section>.<key> must be ..., got ...``.

Integers are any ``numbers.Integral`` but bool (numpy integers too), numbers any ``numbers.Real`` but bool;
numpy scalars become Python ``int`` / ``float`` and lists become tuples when a config is built. Standard library
only.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Demo(ConfigBase):
    ...     SECTION = "demo"
    ...     steps: int = 1
    ...     def validate(self):
    ...         self._ints(1, "steps")
    >>> Demo.from_dict({"steps": 3}).to_dict()
    {'steps': 3}
    >>> Demo(steps=0)
    Traceback (most recent call last):
    ValueError: demo.steps must be an integer >= 1, got 0
"""
import collections.abc
import dataclasses
import math
import numbers
import typing

__all__ = ["ConfigBase", "is_int", "is_number"]


def is_int(value):
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    """A real number (Python or numpy, int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _python(value):
    """numpy scalars as Python int / float, lists as tuples (recursively); anything else as is."""
    if isinstance(value, (list, tuple)):
        return tuple(_python(v) for v in value)
    if is_int(value) and type(value) is not int:
        return int(value)
    if is_number(value) and not isinstance(value, (int, float)):
        return float(value)
    return value


def _plain(value):
    """A field value as plain YAML / JSON types (configs as dicts, tuples as lists)."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


class ConfigBase:
    """Base of a frozen config dataclass: subclasses set ``SECTION`` (the prefix of error messages) and check
    their fields in :meth:`validate` with the ``_need`` / ``_ints`` / ``_numbers`` / ``_bools`` / ``_strings``
    helpers, which raise ``ValueError("<section>.<key> must be <allowed>, got <value>")``."""

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):  # the dataclass is frozen
            object.__setattr__(self, f.name, _python(getattr(self, f.name)))
        self.validate()

    def validate(self):
        """Raise ValueError naming ``section.key`` and what is allowed (called when the config is built)."""

    def _fail(self, key, allowed):
        raise ValueError(f"{self.SECTION}.{key} must be {allowed}, got {getattr(self, key)!r}")

    def _need(self, cond, key, allowed):
        if not cond:
            self._fail(key, allowed)

    def _ints(self, low, *keys, high=None):
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        for key in keys:
            value = getattr(self, key)
            self._need(is_int(value) and low <= value and (high is None or value <= high), key, allowed)

    def _numbers(self, low, *keys, high=None, strict=False):
        """Finite numbers >= ``low`` (> ``low`` when ``strict``), and <= ``high`` when given."""
        rule = f"in {low:g}..{high:g}" if high is not None else f"> {low:g}" if strict else f">= {low:g}"
        for key in keys:
            value = getattr(self, key)
            ok = is_number(value) and math.isfinite(value) and (value > low if strict else value >= low)
            self._need(ok and (high is None or value <= high), key, f"a finite number {rule}")

    def _bools(self, *keys):
        for key in keys:
            self._need(isinstance(getattr(self, key), bool), key, "true or false")

    def _strings(self, optional, *keys):
        for key in keys:
            value = getattr(self, key)
            self._need(isinstance(value, str) or optional and value is None, key,
                       "a string" + (" or null" if optional else ""))

    @classmethod
    def keys(cls):
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values):
        """A config from a mapping (e.g. :meth:`to_dict`'s or a YAML section); missing keys take the defaults.

        Raises:
            ValueError: not a mapping, an unknown key (the message lists the valid ones), or a bad value.
        """
        if not isinstance(values, collections.abc.Mapping):
            raise ValueError(f"{cls.SECTION} must be a mapping of its keys ({', '.join(cls.keys())}), got "
                             f"{type(values).__name__}")
        unknown = sorted(str(k) for k in values if k not in cls.keys())
        if unknown:
            raise ValueError(f"unknown {cls.SECTION} key(s) {unknown}; valid keys: {list(cls.keys())}")
        return cls(**values)

    def to_dict(self):
        """The fields as plain YAML / JSON values (lists, not tuples)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes):
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)
