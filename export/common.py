"""Pieces shared by the export formats: the serving graph and its one ExportArchive builder, the Keras reference
and tolerance, verification samples, progress lines, the report's common fields and the portable CRF hook
(where the artifact is written: ``staging``; the steps in order: ``driver``).

Every format exports the same computation (``serving_outputs``): the Keras model's logits at output stride,
resized to the input size inside the graph by ``deeplab_keras.inference.upsample_logits`` (corner-aligned
bilinear, the resize of training, ``deeplab-eval`` and ``deeplab-predict``), a softmax, and an argmax.
``outputs="logits"`` exports the raw logits at output stride instead (smaller, for devices that post-process
themselves). An optional ``crf`` callable refines the probabilities
before the argmax; it must be made of stock TF ops so that every format can carry it.
"""
import contextlib
import os
import sys
import time

import numpy as np
import tensorflow as tf

from deeplab_keras.export import verify as verify_lib
from deeplab_keras.inference import upsample_logits

OUTPUT_KINDS = ("full", "logits")


class ExportError(Exception):
    """A problem with the user's request (bad path, existing artifact, unusable option): exit code 2 at the CLI."""


def serving_outputs(model, images, outputs="full", crf=None):
    """The exported computation: images in, ``labels`` + ``probabilities`` (or ``logits``) out.

    Args:
        model: float32 Keras model, float32 ``[N, H, W, 3]`` RGB 0..255 -> logits ``[N, h, w, C]``.
        images: float32 tensor ``[N, H, W, 3]``, RGB 0..255.
        outputs: ``"full"`` (``labels`` int32 ``[N, H, W]`` and ``probabilities`` float32 ``[N, H, W, C]`` at the
            input size) or ``"logits"`` (``logits`` float32 ``[N, h, w, C]`` at output stride).
        crf: optional ``crf(probabilities, images) -> probabilities`` made of stock TF ops (``outputs="full"``).
    """
    return postprocess(tf.cast(model(images, training=False), tf.float32), images, outputs, crf)


def postprocess(logits, images, outputs="full", crf=None):
    """The part of ``serving_outputs`` after the model: float32 ``logits`` ``[N, h, w, C]`` of ``images`` (float32
    ``[N, H, W, 3]``) to the outputs."""
    if outputs == "logits":
        return {"logits": logits}
    upsampled = upsample_logits(logits, tf.shape(images)[1:3])
    probabilities = tf.nn.softmax(upsampled, axis=-1)
    if crf is not None:
        probabilities = crf(probabilities, images)
        labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    else:
        labels = tf.argmax(upsampled, axis=-1, output_type=tf.int32)
    return {"labels": labels, "probabilities": probabilities}


def serving_archive(model, endpoints, outputs="full", crf=None, rewrite=None):
    """The ``keras.export.ExportArchive`` of every format (the one place that builds one).

    Each endpoint computes ``serving_outputs`` of its input, after an optional ``to_images`` (e.g. decoding
    bytes); the input is cast to float32; with ``rewrite`` (a ``graph.GraphRewrite``) the model's layers are traced
    in the serving form (native dilated convolutions, folded batch norm, optionally the fused ASPP head). The
    model is not ``track()``-ed: that would add its ``keras.Variable``
    wrappers beside the ``tf.Variable``s the endpoints capture, and TF's checkpoint writes both (every weight
    twice, keras-team/keras#23553); the endpoints alone carry every variable they use (the model has no lookup
    tables that would need tracking).

    Args:
        model: float32 Keras model.
        endpoints: ``{name: (tf.TensorSpec, to_images or None)}``; the first one is also ``serving_default``
            when no endpoint has that name.
        outputs: see ``serving_outputs``.
        crf: see ``serving_outputs``.
        rewrite: optional ``graph.GraphRewrite`` of ``model``, entered while the endpoints are traced.
    Returns:
        ``(archive, functions)``: the archive (``archive.write_out(path)`` writes a SavedModel) and
        ``{name: tf.function}`` of its endpoints (what tf2onnx converts).

    Example:
        >>> archive, fns = serving_archive(
        ...     model, {"serve": (tf.TensorSpec([None, None, None, 3]), None)})  # doctest: +SKIP
        >>> archive.write_out("/tmp/sm", verbose=False)              # doctest: +SKIP
    """
    import keras

    def endpoint(to_images):
        def serve(image):
            with rewrite or contextlib.nullcontext():
                return serving_outputs(model, tf.cast(to_images(image) if to_images else image, tf.float32),
                                       outputs, crf)
        return serve

    archive = keras.export.ExportArchive()
    functions = {name: archive.add_endpoint(name, endpoint(to_images), input_signature=[spec])
                 for name, (spec, to_images) in endpoints.items()}
    return archive, functions


def reference_outputs(model, images, outputs="full", crf=None, batch_size=1):
    """Runs ``serving_outputs`` eagerly with the Keras model: the reference each artifact is checked against.

    Args:
        model: the float32 Keras model.
        images: uint8 or float array ``[N, H, W, 3]``.
        outputs: see ``serving_outputs``.
        crf: see ``serving_outputs``.
        batch_size: images per call.
    Returns:
        dict of numpy arrays.
    """
    parts = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(np.asarray(images[start:start + batch_size], np.float32))
        parts.append({k: v.numpy() for k, v in serving_outputs(model, batch, outputs, crf).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def crf_amplification(model, images, crf, scales=(1e-6, 1e-5), seed=0):
    """How much ``crf`` amplifies differences of its input probabilities on these images.

    Each image's logits are perturbed at float32-rounding level (uniform noise of ``scale`` x max |logits|, the
    kind of difference another runtime's kernels make); the amplification is the largest ratio
    max |change of the refined probabilities| / max |change of the probabilities before the CRF|.

    Args:
        model: the float32 Keras model.
        images: uint8 or float array ``[N, H, W, 3]`` (the verification images).
        crf: the CRF hook (see ``serving_outputs``); None gives 1.0.
        scales: relative perturbation sizes, one draw each.
        seed: noise seed.
    Returns:
        float >= 1.

    Example:
        >>> crf_amplification(model, images, portable_crf(iterations=10))      # doctest: +SKIP
        14.2
    """
    if crf is None:
        return 1.0
    rng = np.random.default_rng(seed)
    worst = 1.0
    for image in np.asarray(images, np.float32):
        x = tf.constant(image[None])
        logits = tf.cast(model(x, training=False), tf.float32)
        before = postprocess(logits, x)["probabilities"].numpy()
        after = postprocess(logits, x, crf=crf)["probabilities"].numpy()
        magnitude = float(tf.reduce_max(tf.abs(logits)))
        for scale in scales:
            noise = (scale * magnitude * rng.uniform(-1.0, 1.0, logits.shape)).astype(np.float32)
            moved = logits + noise
            change_in = np.abs(postprocess(moved, x)["probabilities"].numpy() - before).max()
            change_out = np.abs(postprocess(moved, x, crf=crf)["probabilities"].numpy() - after).max()
            if change_in > 0:
                worst = max(worst, float(change_out / change_in))
    return worst


def float32_sensitivity(model, images, outputs="full", count=1, seed=0, before=None):
    """How much ``model``'s outputs move when its float32 arithmetic rounds differently.

    Another runtime's kernels sum in another order; by backward error analysis their result is the exact one of
    weights moved by about ``sqrt(fan_in)`` x float32's unit roundoff (2^-24) relative. Every floating weight is
    moved by that much (uniform noise, relative, ``fan_in`` = the product of all but its last dimension, 1 for
    vectors) for one forward pass, and restored exactly afterwards.

    Args:
        model: the float32 Keras model (its weights are restored before this returns, also on errors).
        images: uint8 or float array ``[N, H, W, 3]`` (the verification images; the first ``count`` are used).
        outputs: ``"full"`` (the change of the probabilities before any CRF) or ``"logits"``.
        count: images measured (one forward pass each).
        seed: noise seed.
        before: the unperturbed ``reference_outputs`` of these images without a CRF (computed when None).
    Returns:
        float: max |change| of the probabilities (or logits).

    Example:
        >>> float32_sensitivity(model, images)                                      # doctest: +SKIP
        1.45e-04
    """
    rng = np.random.default_rng(seed)
    images = np.asarray(images[:count], np.float32)
    before = reference_outputs(model, images, outputs) if before is None else before
    key = "logits" if outputs == "logits" else "probabilities"
    variables = [v for v in model.weights if np.dtype(v.dtype).kind == "f"]
    saved = [v.numpy() for v in variables]
    try:
        for variable, value in zip(variables, saved):
            fan_in = int(np.prod(value.shape[:-1])) if value.ndim >= 2 else 1
            relative = 2.0 ** -24 * np.sqrt(fan_in) * rng.uniform(-1.0, 1.0, value.shape)
            variable.assign((value * (1.0 + relative)).astype(value.dtype))
        after = reference_outputs(model, images, outputs)
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
    return float(np.max(np.abs(after[key] - before[key][:count])))


def verification_tolerance(tolerance, model, images, crf, outputs="full", reference=None):
    """``tolerance`` (``verify.Tolerance``) made concrete for this graph: an ``AUTO`` max |diff| from the model's
    measured float32 sensitivity (``float32_sensitivity``) and the CRF's measured amplification
    (``verify.resolve_tolerance``); ``reference``: the ``reference_outputs`` of ``images`` (reused without a CRF).
    Returns ``(tolerance, derivation or None)``."""
    if tolerance.max_abs_diff != verify_lib.AUTO:
        return tolerance, None
    return verify_lib.resolve_tolerance(tolerance, crf_amplification(model, images, crf) if crf is not None else 1.0,
                                        float32_sensitivity(model, images, outputs,
                                                            before=reference if crf is None else None))


def model_num_classes(model):
    """Number of classes (last dim of the logits) of ``model``."""
    num = getattr(model, "num_classes", None)
    if num is None:
        num = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    return int(num) if num is not None else None


def check_outputs(outputs):
    """Raises ``ExportError`` unless ``outputs`` is one of ``OUTPUT_KINDS``."""
    if outputs not in OUTPUT_KINDS:
        raise ExportError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")


def load_samples(size, folder=None, count=4, seed=0, what="--data"):
    """``verify.sample_images``, with an unusable folder as ``ExportError`` (one line naming ``what``)."""
    try:
        return verify_lib.sample_images(size, folder, count, seed)
    except (OSError, ValueError) as e:
        raise ExportError(f"{what} {folder}: {' '.join(str(e).split())}") from None


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


def portable_crf(iterations=None, params=None, **crf_kwargs):
    """The ``crf`` hook for exports: the stock-TF-op dense CRF (``deeplab_keras.crf.portable``).

    Args:
        iterations: mean-field iterations (unrolled into the exported graph); None: those of ``params``.
        params: a ``deeplab_keras.crf.CRFParams``, a dict of some of its fields, or None (DeepLab v2 defaults).
        **crf_kwargs: ``CRFParams`` fields overriding ``params`` (``bilateral_weight=5``), and the
            ``dense_crf_portable`` options ``gaussian_filter`` / ``splat``.
    Returns:
        a ``PortableCRF``: ``crf(probabilities, images) -> probabilities`` taking float32 images in 0..255;
        the driver calls ``crf.for_runtime(...)`` to trace the variant that is exact and fast in its runtime.
    Raises:
        ValueError: a bad or unknown parameter (``CRFParams``' message).

    Example:
        >>> from deeplab_keras.crf.params import CRFParams
        >>> portable_crf(params=CRFParams(bilateral_weight=5), iterations=5).params.iterations
        5
    """
    from deeplab_keras.crf.params import CRFParams

    options = {key: crf_kwargs.pop(key) for key in PortableCRF.OPTIONS if key in crf_kwargs}
    if iterations is not None:
        crf_kwargs["iterations"] = iterations
    return PortableCRF(params=CRFParams.resolve(params, **crf_kwargs), **options)


class PortableCRF:
    """Callable CRF hook over ``dense_crf_portable``; ``for_runtime`` picks the splat for a target runtime.

    Args:
        runtime: ``"tf"``, ``"litert"``, ``"onnx"`` or None (``deeplab_keras.crf.portable.RUNTIME_SPLAT``).
        params: a ``CRFParams`` (None: the defaults).
        **options: ``dense_crf_portable`` options (``OPTIONS``).
    """
    OPTIONS = ("gaussian_filter", "splat")

    def __init__(self, runtime=None, params=None, compatibility=None, **options):
        from deeplab_keras.crf.params import CRFParams

        self.runtime = runtime
        self.params = CRFParams.resolve(params)
        self.compatibility = None if compatibility is None else np.asarray(compatibility, np.float32)
        self.options = options

    @property
    def config(self):
        """Parameters for the export report."""
        from deeplab_keras.crf.portable import RUNTIME_SPLAT

        learned = {} if self.compatibility is None else {"compatibility": self.compatibility.tolist()}
        return {**self.params.to_dict(), **self.options, "runtime": self.runtime,
                "splat": self.options.get("splat", RUNTIME_SPLAT.get(self.runtime)), **learned}

    def for_runtime(self, runtime):
        """The same CRF traced for ``runtime`` (the splat that is exact and fastest there)."""
        return PortableCRF(runtime=runtime, params=self.params, compatibility=self.compatibility, **self.options)

    def __call__(self, probabilities, images):
        from deeplab_keras.crf.portable import RUNTIME_SPLAT, dense_crf_portable

        options = {"splat": RUNTIME_SPLAT[self.runtime], **self.options}
        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)
        return dense_crf_portable(probabilities, pixels, self.params, compatibility=self.compatibility, **options)


def split_crf_head(model, crf):
    """``(model, crf)`` to export: a model with its own CRF on top (``model.crf_head``, e.g. a learned one) becomes
    its network without the CRF plus the same CRF from stock ops (its learned weights and compatibility).

    Raises:
        ExportError: such a model and a ``crf`` hook as well.
    """
    head = getattr(model, "crf_head", None)
    if head is None:
        return model, crf
    if crf is not None:
        raise ExportError("the model has its own CRF on top (model.crf, e.g. a learned one); export it without a "
                          "second CRF (drop --crf / crf=)")
    return model.without_crf(), PortableCRF(params=head.learned_params, compatibility=head.learned_compatibility)


def crf_for(crf, runtime):
    """``crf.for_runtime(runtime)`` when the hook supports it, else ``crf`` itself (any stock-op callable)."""
    return crf.for_runtime(runtime) if hasattr(crf, "for_runtime") else crf
