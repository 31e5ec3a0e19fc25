"""Config values typed by the dataclass field annotations: ``--set section.key=value`` strings, and strings
where a YAML file or a dict gives text for a typed field (YAML 1.1 reads ``1e-3`` as a string). One rule for
both: a string becomes the field's type (int, float, bool, str, Optional[...], Union[...], tuples / lists
written ``321,321`` or ``[321, 321]``); nothing is guessed from the text alone.

:class:`deeplab_keras.config_base.ConfigBase` holds the sections' checks, ``from_dict`` and ``to_dict``.

Example:
    >>> from typing import Optional, Tuple
    >>> parse_value("321,321", Tuple[int, ...], "data.crop_size"), parse_value("null", Optional[float], "k")
    ((321, 321), None)
    >>> parse_value("1e-3", float, "optimizer.base_lr")
    0.001
"""
import dataclasses
import types
import typing

_NULL = ("null", "none", "~")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def field_types(cls):
    """{field name: annotation} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls)}


def _union_args(tp):
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin is typing.Union or origin is getattr(types, "UnionType", None) else None


def _element_type(tp):
    """The element annotation of a tuple / list annotation (typing.Any when not given); None if not a sequence."""
    if tp in (tuple, list):
        return typing.Any
    if typing.get_origin(tp) in (tuple, list, typing.get_origin(typing.Sequence)):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if len(set(args)) == 1 else typing.Any
    return None


def describe(tp):
    """What a value of annotation ``tp`` looks like, for error messages."""
    union = _union_args(tp)
    if union is not None:
        parts = [describe(a) for a in union if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in union else "")
    element = _element_type(tp)
    if element is not None:
        return f"a comma-separated list ({describe(element)} each; e.g. 321,321 or [321, 321])"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a value")


def _scalar(text, tp):
    if tp is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    # typing.Any (e.g. the elements of a bare tuple): a number when it reads as one, else the text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse(text, tp):
    union = _union_args(tp)
    if union is not None:
        if type(None) in union and text.lower() in _NULL:
            return None
        # str last: "6,12,18,24" is the tuple of Union[str, Tuple[int, ...]], "L" its string
        for arg in sorted((a for a in union if a is not type(None)), key=lambda a: a is str):
            try:
                return _parse(text, arg)
            except ValueError:
                pass
        raise ValueError
    element = _element_type(tp)
    if element is not None:
        inner = text.strip()
        if inner[:1] + inner[-1:] in ("[]", "()"):
            inner = inner[1:-1].strip()
        items = [] if not inner else [item.strip() for item in inner.split(",")]
        return tuple(_parse(item, element) for item in items)
    return _scalar(text.strip(), tp)


def parse_value(text, tp, key):
    """``text`` as a value of annotation ``tp``.

    Raises:
        ValueError: naming ``key``, the text and what is allowed.
    """
    try:
        return _parse(str(text), tp)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not {describe(tp)}") from None


def coerce(value, tp, key):
    """A value from YAML or a dict: strings (and strings inside lists) typed as ``tp``; anything else as is
    (the section's validation checks it)."""
    union = _union_args(tp)
    accepts_str = tp is str or union is not None and str in union
    if isinstance(value, str) and not accepts_str:
        return parse_value(value, tp, key)
    element = _element_type(next((a for a in union if _element_type(a)), tp) if union else tp)
    if isinstance(value, (list, tuple)) and element not in (None, str, typing.Any):
        return [parse_value(v, element, key) if isinstance(v, str) else v for v in value]
    return value
