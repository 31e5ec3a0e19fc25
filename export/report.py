"""Progress lines on stderr and the export report's common fields (the library versions, the model's config)."""
import os
import sys
import time

import tensorflow as tf


def environment():
    """Versions of the libraries that shaped the artifact (for the report)."""
    import keras
    versions = {"python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__}
    for name in ("tf2onnx", "onnx", "onnxruntime", "ai_edge_litert"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            versions[name] = module.__version__
    return versions


class Progress:
    """Prints ``[deeplab-export] step ... done (1.2 s)`` lines to stderr; silent when ``enabled`` is False."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.timings = {}

    def step(self, name, message):
        """Context manager timing one slow step; its seconds land in ``self.timings[name]``."""
        return _Step(self, name, message)

    def info(self, message):
        """Prints one line."""
        if self.enabled:
            print(f"[deeplab-export] {message}", file=sys.stderr, flush=True)

    def warn(self, message):
        """Prints one ``WARNING`` line, also when progress lines are off."""
        print(f"[deeplab-export] WARNING: {message}", file=sys.stderr, flush=True)


class _Step:
    def __init__(self, progress, name, message):
        self.progress, self.name, self.message = progress, name, message

    def __enter__(self):
        self.start = time.perf_counter()
        self.progress.info(f"{self.message} ...")
        return self

    def __exit__(self, exc_type, exc, tb):
        seconds = time.perf_counter() - self.start
        self.progress.timings[self.name] = round(seconds, 3)
        if exc_type is None:
            self.progress.info(f"{self.message}: done ({seconds:.1f} s)")
        return False


def base_report(fmt, model, final_path, size, **fields):
    """Report fields shared by all formats (``created_dirs``, ``warnings`` and the rest come in ``fields``)."""
    report = {"format": fmt, "artifact": os.path.abspath(final_path), "size_bytes": int(size),
              "size_mb": round(size / 1e6, 3),
              "num_classes": model_num_classes(model), "model": getattr(model, "name", None),
              "created_unix": round(time.time(), 3), "environment": environment()}
    get_config = getattr(model, "get_config", None)
    try:
        config = get_config() if get_config else None
        if config and "layers" not in config:  # a DeepLabV2-style kwargs config, not a functional graph dump
            report["model_config"] = config
    except Exception:  # a config is nice to have, never required
        pass
    report.update(fields)
    return report


def model_num_classes(model):
    """Number of classes (last dim of the logits) of ``model``."""
    num = getattr(model, "num_classes", None)
    if num is None:
        num = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    return int(num) if num is not None else None
