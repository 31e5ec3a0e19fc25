"""Self-verification of exported artifacts against the Keras model.

Each exporter runs its artifact in its own runtime (TensorFlow for SavedModel, LiteRT for TFLite, onnxruntime for
ONNX) on sample images, and compares with the Keras model run through the same post-processing
(``serving.reference_outputs``): max |diff| of probabilities (or logits), label agreement, and mIoU of the artifact's
labels against the Keras labels. Non-finite outputs always fail, so a silently broken artifact (NaN weights, as
happens with ``tf.saved_model.save`` of a Keras 3 model converted to TFLite) cannot pass. The tolerances live
here too, with what derives them (the model's ``float32_sensitivity``, the CRF's ``crf_amplification``), and the
verification images (``sample_images``, ``load_samples``).
"""
import dataclasses
import glob
import os

import numpy as np
import tensorflow as tf

from deeplab_keras.data.reader import IMAGE_EXTENSIONS
from deeplab_keras.export.errors import ExportError
from deeplab_keras.export.serving import postprocess, reference_outputs
from deeplab_keras.data.synthetic import synthetic_images  # noqa: F401  (verification images: the one generator)


class VerificationError(Exception):
    """The artifact's outputs are outside tolerance (or not finite). ``report`` holds the measurements."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


#: ``Tolerance.max_abs_diff`` derived from the graph being checked (``resolve_tolerance``).
AUTO = "auto"
#: max |diff| of probabilities allowed for a float32 graph without a CRF (softmax of float32 logits).
FLOAT32_MAX_DIFF = 1e-4
#: The model's own float32 sensitivity (``float32_sensitivity``: the change of its outputs when every weight
#: moves by float32 rounding) times this margin raises the base above ``FLOAT32_MAX_DIFF`` for deep, wide networks
#: at large sizes. Measured: ResNet-101 at 513x513 (random weights) has sensitivity 0.97e-4 .. 1.45e-4 (two draws)
#: and LiteRT differs from Keras by 1.2e-4 there, above the fixed 1e-4; the margin covers two runtimes' rounding
#: (sqrt 2) and the draw's spread.
SENSITIVITY_MARGIN = 4.0
#: Cap of a derived max |diff|: a broken graph differs by far more (a missing CRF iteration or a half-pixel
#: resize moves probabilities by 0.3 .. 1.0 on the test models), a larger tolerance would stop telling them apart.
MAX_DERIVED_DIFF = 1e-2


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass criteria; ``None`` means report only.

    Args:
        max_abs_diff: largest allowed |artifact - keras| over probabilities (or logits); ``AUTO``: derived from the
            graph (``resolve_tolerance``).
        min_agreement: smallest allowed fraction of pixels whose label equals the Keras label.
    """
    max_abs_diff: float = None
    min_agreement: float = None


# Default tolerances by numeric precision of the artifact (see the export contract).
TOLERANCES = {
    "float32": Tolerance(max_abs_diff=AUTO, min_agreement=0.999),
    "float16": Tolerance(min_agreement=0.99),
    "dynamic": Tolerance(),
    "int8": Tolerance(),
}


def resolve_tolerance(tolerance, amplification=1.0, sensitivity=0.0):
    """``tolerance`` with an ``AUTO`` max |diff| made concrete for the graph being checked.

    A float32 artifact may differ from Keras in the probabilities (or logits) it computes before any CRF by what
    other kernels, summation orders and fused ops make of the model: ``FLOAT32_MAX_DIFF``, or
    ``SENSITIVITY_MARGIN`` x the model's measured float32 ``sensitivity`` when that is larger (deep, wide networks
    at large sizes). Mean-field iterations amplify such differences: ``amplification`` is that factor, measured on
    the verification images (``crf_amplification``; 1 without a CRF). The derived max |diff| is
    ``max(FLOAT32_MAX_DIFF, SENSITIVITY_MARGIN * sensitivity) * amplification``, capped at ``MAX_DERIVED_DIFF``.

    Args:
        tolerance: a ``Tolerance``.
        amplification: the graph's measured amplification of input differences (>= 1).
        sensitivity: the model's measured change of its outputs under float32 rounding of its weights (>= 0).
    Returns:
        ``(tolerance, derivation)``: a concrete ``Tolerance`` and a dict for the report (None when nothing was
        derived).

    Example:
        >>> resolve_tolerance(TOLERANCES["float32"], 12.5)[0].max_abs_diff
        0.00125
        >>> resolve_tolerance(TOLERANCES["float32"], 1.0, sensitivity=1.5e-4)[0].max_abs_diff
        0.0006
    """
    if tolerance.max_abs_diff != AUTO:
        return tolerance, None
    amplification = max(1.0, float(amplification))
    sensitivity = float(sensitivity) if np.isfinite(sensitivity) else 0.0  # NaN weights: the checks catch them
    base = max(FLOAT32_MAX_DIFF, SENSITIVITY_MARGIN * sensitivity)
    value = min(base * amplification, MAX_DERIVED_DIFF)
    derivation = {"base": base, "float32_max_diff": FLOAT32_MAX_DIFF, "sensitivity": float(sensitivity),
                  "sensitivity_margin": SENSITIVITY_MARGIN, "amplification": round(amplification, 3),
                  "cap": MAX_DERIVED_DIFF, "max_abs_diff": value}
    return dataclasses.replace(tolerance, max_abs_diff=value), derivation


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
    """``tolerance`` (a ``Tolerance``) made concrete for this graph: an ``AUTO`` max |diff| from the model's
    measured float32 sensitivity (``float32_sensitivity``) and the CRF's measured amplification
    (``resolve_tolerance``); ``reference``: the ``reference_outputs`` of ``images`` (reused without a CRF).
    Returns ``(tolerance, derivation or None)``."""
    if tolerance.max_abs_diff != AUTO:
        return tolerance, None
    return resolve_tolerance(tolerance, crf_amplification(model, images, crf) if crf is not None else 1.0,
                             float32_sensitivity(model, images, outputs, before=reference if crf is None else None))


def list_images(folder):
    """Sorted image files of ``folder`` (or its ``JPEGImages/`` / ``images/``); FileNotFoundError names the
    problem (missing folder, no images) in one line."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sample image folder {folder!r} does not exist; pass a folder of JPEG/PNG images")
    for sub in ("JPEGImages", "images"):  # a VOC2012 folder, or the folder-dataset layout (images/ + masks/)
        if os.path.isdir(os.path.join(folder, sub)):
            folder = os.path.join(folder, sub)
            break
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder!r}")
    return files


def load_images(folder, size, count=None):
    """Reads up to ``count`` images of ``folder`` (or ``folder/JPEGImages``) as RGB uint8 resized to ``size``.

    Args:
        folder: directory of JPEG/PNG images, a VOC2012 directory (``JPEGImages/``) or a folder dataset
            (``images/``).
        size: ``(height, width)``.
        count: maximum number of images (all when None).
    Returns:
        uint8 array ``[N, height, width, 3]``.
    """
    from PIL import Image

    files = list_images(folder)[:count]
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), np.uint8))
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"cannot read image {f} ({' '.join(str(e).split())}); remove or replace it") from None
    return np.stack(out)


def sample_images(size, sample_dir=None, count=4, seed=0):
    """Verification images: from ``sample_dir`` if given, else synthetic.

    Args:
        size: ``(height, width)``.
        sample_dir: optional folder of images (e.g. the VOC samples).
        count: number of images.
        seed: seed of the synthetic images.
    """
    if sample_dir:
        return load_images(sample_dir, size, count)
    return synthetic_images(size, count, seed)


def load_samples(size, folder=None, count=4, seed=0, what="--data"):
    """``verify.sample_images``, with an unusable folder as ``ExportError`` (one line naming ``what``)."""
    try:
        return sample_images(size, folder, count, seed)
    except (OSError, ValueError) as e:
        raise ExportError(f"{what} {folder}: {' '.join(str(e).split())}") from None


def miou_against(reference_labels, labels):
    """Mean IoU of ``labels`` against ``reference_labels`` over the classes present in either."""
    ref = np.asarray(reference_labels).ravel()
    got = np.asarray(labels).ravel()
    ious = []
    for c in np.union1d(np.unique(ref), np.unique(got)):
        a, b = ref == c, got == c
        ious.append(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
    return float(np.mean(ious)) if ious else 1.0


def compare(reference, got):
    """Measures an artifact's outputs against the Keras reference.

    Args:
        reference: dict with ``labels`` + ``probabilities`` or ``logits`` (numpy, from the Keras model).
        got: the same keys from the artifact (float outputs already dequantized).
    Returns:
        dict: ``max_abs_diff``, ``mean_abs_diff`` (of ``compared``), ``label_agreement``, ``miou_vs_keras``,
        ``finite`` and ``compared`` (which output the diffs are of).
    """
    key = "probabilities" if "probabilities" in reference else "logits"
    missing = [k for k in reference if k not in got]
    if missing:
        raise VerificationError(f"artifact outputs {sorted(got)} lack {missing}")
    ref_values = np.asarray(reference[key], np.float32)
    values = np.asarray(got[key], np.float32)
    if values.shape != ref_values.shape:
        raise VerificationError(f"artifact output {key!r} has shape {values.shape}, Keras gives {ref_values.shape}")
    finite = bool(np.all(np.isfinite(values)))
    if "labels" in reference:
        ref_labels, labels = np.asarray(reference["labels"]), np.asarray(got["labels"])
    else:
        ref_labels, labels = ref_values.argmax(-1), values.argmax(-1)
    if labels.shape != ref_labels.shape:
        raise VerificationError(f"artifact labels have shape {labels.shape}, Keras gives {ref_labels.shape}")
    diff = np.abs(values - ref_values)
    return {
        "compared": key,
        "finite": finite,
        "max_abs_diff": float(np.nanmax(diff)) if finite else float("nan"),
        "mean_abs_diff": float(np.nanmean(diff)) if finite else float("nan"),
        "label_agreement": float(np.mean(labels == ref_labels)),
        "miou_vs_keras": miou_against(ref_labels, labels),
        "num_images": int(ref_labels.shape[0]),
        "image_size": list(ref_labels.shape[1:3]) if key == "probabilities" else None,
    }


def failures(metrics, tolerance):
    """Reasons ``metrics`` fail ``tolerance`` (an empty list when it passes; ``AUTO``: the graph without a CRF)."""
    tolerance, _ = resolve_tolerance(tolerance)
    reasons = []
    if not metrics["finite"]:
        reasons.append(f"the artifact's {metrics['compared']} contain NaN/Inf (a silently broken export)")
        return reasons
    if tolerance.max_abs_diff is not None and metrics["max_abs_diff"] > tolerance.max_abs_diff:
        reasons.append(f"max |diff| of {metrics['compared']} {metrics['max_abs_diff']:.3g} > "
                       f"{tolerance.max_abs_diff:.3g}")
    if tolerance.min_agreement is not None and metrics["label_agreement"] < tolerance.min_agreement:
        reasons.append(f"label agreement {100 * metrics['label_agreement']:.3f} % < "
                       f"{100 * tolerance.min_agreement:.3f} %")
    return reasons


def summary_line(name, metrics):
    """One human-readable line of ``metrics``."""
    return (f"{name}: max |diff| {metrics['compared']} = {metrics['max_abs_diff']:.3g}, label agreement "
            f"{100 * metrics['label_agreement']:.3f} %, mIoU vs Keras {100 * metrics['miou_vs_keras']:.2f} % "
            f"on {metrics['num_images']} images")


def run_checks(checks, tolerance, progress=None, derivation=None):
    """Compares each ``(name, reference, got)`` and applies ``tolerance``.

    Args:
        checks: list of ``(name, reference_dict, artifact_dict)``.
        tolerance: a ``Tolerance``.
        progress: optional ``report.Progress`` for the printed lines.
        derivation: how the max |diff| was derived (``resolve_tolerance``), for the report and the progress line.
    Returns:
        dict ``{"passed", "tolerance", "tolerance_derivation", "checks": {name: metrics}, "failures": [...]}``.
    """
    if derivation is None:  # an AUTO tolerance nobody resolved: the graph without a CRF
        tolerance, derivation = resolve_tolerance(tolerance)
    result = {"passed": True, "tolerance": dataclasses.asdict(tolerance), "tolerance_derivation": derivation,
              "checks": {}, "failures": []}
    if progress is not None and derivation is not None and derivation["max_abs_diff"] != FLOAT32_MAX_DIFF:
        crf = (f" x the CRF's amplification {derivation['amplification']:.1f}" if derivation["amplification"] > 1
               else "")
        progress.info(f"tolerance: max |diff| {tolerance.max_abs_diff:.3g} = {derivation['base']:.3g} (max of "
                      f"{derivation['float32_max_diff']:g} and {derivation['sensitivity_margin']:g} x the model's "
                      f"float32 sensitivity {derivation['sensitivity']:.3g}){crf}, measured on the verification images")
    for name, reference, got in checks:
        metrics = compare(reference, got)
        result["checks"][name] = metrics
        if progress is not None:
            progress.info(summary_line(name, metrics))
        result["failures"] += [f"{name}: {r}" for r in failures(metrics, tolerance)]
    result["passed"] = not result["failures"]
    return result
