"""Lazy package exports: names that load from their submodules on first use."""
import importlib
import sys


def lazy_exports(package, homes):
    """``__getattr__`` and ``__dir__`` for a package whose names load from their submodules on first use.

    Args:
        package: the package's ``__name__``.
        homes: ``{name: submodule}`` (``"ops"`` for ``package + ".ops"``).

    Example:
        >>> getattr_, dir_ = lazy_exports("deeplab_keras.crf", {"CRFParams": "params"})
        >>> getattr_("CRFParams").__name__
        'CRFParams'
    """
    def __getattr__(name):
        if name in homes:
            return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
