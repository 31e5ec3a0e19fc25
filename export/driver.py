"""The one export driver: the steps every format shares, around a small set of per-format hooks.

``export_model(model, format, out, **options)`` checks the request and the destination (before anything slow),
converts into a hidden staging folder next to ``out``, runs the artifact in its own runtime on sample images,
compares it with the Keras model, writes the JSON report and moves the artifact into place atomically (or, when
verification fails, writes only the report). A format is a ``Format`` subclass (``saved_model.SavedModelFormat``;
``tflite.TFLiteFormat`` and ``onnx.ONNXFormat`` through ``FileFormat``) registered with ``register``; it supplies
the destination, the conversion, the verification runners and its report fields.

Example:
    >>> from deeplab_keras.export import export_model
    >>> report = export_model(model, "onnx", "deeplab.onnx", input_size=(513, 513))      # doctest: +SKIP
    >>> report["verification"]["passed"]                                                # doctest: +SKIP
    True
"""
from deeplab_keras import graph_rewrite
from deeplab_keras.export import serving, staging
from deeplab_keras.export.errors import ExportError
from deeplab_keras.export.report import Progress, base_report
from deeplab_keras.export import verify as verify_lib
from deeplab_keras.weights import as_float32

#: name -> ``Format`` subclass (filled by ``register`` when ``deeplab_keras.export`` is imported).
FORMATS = {}


def register(cls):
    """Class decorator: makes the ``Format`` subclass ``cls`` available as ``export_model(..., cls.name, ...)``."""
    FORMATS[cls.name] = cls
    return cls


class Format:
    """The hooks of one export format; one instance per export (hooks may keep state on it, e.g. a session).

    Class attributes:
        name: the format's name (``export_model``'s ``format``, the report's ``format``).
        options: the format's own options and their defaults (``export_model`` refuses others).
        crf_runtime: runtime the CRF hook is traced for (``serving.crf_for``).
        convert_step: ``(timing key, progress message)`` of the conversion step.
        verify_message: progress message of the verification step.

    Args:
        **options: values for ``options`` (the rest keep their defaults).
    """
    name = None
    options = {}
    crf_runtime = None
    convert_step = ("convert_s", "converting")
    verify_message = "verifying"

    def __init__(self, **options):
        self.opts = {**type(self).options, **options}
        self.crf = None  # the CRF hook traced for ``crf_runtime`` (set by ``export_model``)
        self.rewrite = None  # the model's ``graph_rewrite.GraphRewrite`` (set by ``export_model``)
        self.progress = Progress(False)  # set by ``export_model``

    @property
    def precision(self):
        """Numeric precision of the artifact (a key of ``verify.TOLERANCES``)."""
        return "float32"

    @property
    def outputs(self):
        """The exported outputs (``"full"`` or ``"logits"``, see ``serving.serving_outputs``)."""
        return self.opts.get("outputs", "full")

    def check(self):
        """Raises ``errors.ExportError`` for options of this format that cannot work (before anything slow)."""
        if self.opts.get("aspp_head", "plain") not in graph_rewrite.ASPP_HEADS:
            raise ExportError(f"aspp_head must be one of {graph_rewrite.ASPP_HEADS}, got {self.opts['aspp_head']!r}")

    def graph_rewrite(self, model):
        """The serving form of ``model`` (``graph_rewrite.GraphRewrite``): native dilation, batch norm folded unless the
        ``fold_batch_norm`` option is False, the ``aspp_head`` option's head (plain where the format has none)."""
        return graph_rewrite.GraphRewrite(model, fold_batch_norm=self.opts.get("fold_batch_norm", True),
                                  aspp_head=self.opts.get("aspp_head", "plain"))

    def destination(self, out, overwrite):
        """The absolute final path of the artifact for ``out``, checked (``errors.ExportError``)."""
        raise NotImplementedError

    def sample_size(self, verify_size):
        """``(H, W)`` of the verification images."""
        size = self.opts.get("input_size")
        return tuple(size) if size else tuple(verify_size)

    def prepare(self, size):
        """Loads what the conversion needs from disk before staging starts (e.g. calibration images of ``size``)."""

    def convert(self, model, stage_dir, final):
        """Writes the artifact into the staging folder ``stage_dir``; returns its path (named like ``final``)."""
        raise NotImplementedError

    def runners(self, artifact):
        """``{check name: run(images) -> dict of numpy outputs}``: the staged artifact in its own runtime."""
        raise NotImplementedError

    def warnings(self, verification):
        """Warnings to print and report, given the verification result."""
        return []

    def report_fields(self, artifact):
        """The format's own report fields (after verification; ``runners`` have run)."""
        return {}

    def close(self):
        """Releases the runtimes opened by ``runners`` before the artifact is moved."""


class FileFormat(Format):
    """A format whose artifact is one file, with ``input_size`` and ``outputs`` options (TFLite, ONNX).

    Class attributes:
        what: a word for messages (``"ONNX file"``).
        suffix: the file suffix suggested when ``out`` is a folder (``".onnx"``).
    """
    what = "file"
    suffix = ""

    @property
    def input_size_text(self):
        """``"HxW"`` of the static input size, or ``"dynamic"``."""
        size = self.opts["input_size"]
        return "x".join(map(str, size)) if size else "dynamic"

    def check(self):
        super().check()
        serving.check_outputs(self.outputs)

    def destination(self, out, overwrite):
        return staging.file_destination(out, overwrite, self.what, self.suffix)

    def report_fields(self, artifact):
        size = self.opts["input_size"]
        return {"input_size": list(size) if size else None, "outputs": self.outputs}

    @property
    def int8(self):
        """True when the format's ``quantize`` option asks for int8 (calibrated on ``representative`` images)."""
        return self.opts.get("quantize") == "int8"

    def prepare(self, size):
        self.calibration = None
        if self.int8:
            self.calibration = verify_lib.load_samples(size, self.opts["representative"], self.opts["num_calibration"],
                                                   seed=1234, what="--data")

    def warnings(self, verification):
        if not self.int8 or self.opts["representative"]:
            return []
        agreement = next(iter(verification["checks"].values()))["label_agreement"]
        return [f"int8 was calibrated on synthetic images (no --data): label agreement with the "
                f"float model is {100 * agreement:.1f} % on the verification images; calibrate on ~100 images of "
                "your data with --data DIR"]

    def calibration_fields(self):
        """Report fields of the int8 calibration (None without int8)."""
        return {"calibration": (self.opts["representative"] or "synthetic") if self.int8 else None,
                "num_calibration_images": len(self.calibration) if self.calibration is not None else None}


def export_model(model, format, out, overwrite=False, crf=None, sample_dir=None, num_samples=4,
                 verify_size=(97, 129), tolerance=None, report_path=None, progress=None, **options):
    """Exports ``model`` as ``format`` to ``out``, verified against the Keras model.

    Args:
        model: Keras model, float32 RGB 0..255 ``[N, H, W, 3]`` -> logits; mixed precision is exported as float32.
        format: a name in ``FORMATS``: ``"saved_model"``, ``"tflite"`` or ``"onnx"``.
        out: destination (see the format's ``export_*`` function).
        overwrite: replace an existing artifact.
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``
            (``serving.portable_crf``).
        sample_dir: folder of verification images (default synthetic images).
        num_samples: number of verification images.
        verify_size: ``(H, W)`` of the verification images when the format has no fixed ``input_size``.
        tolerance: ``verify.Tolerance`` (default ``verify.TOLERANCES[precision]``; float32 derives its max |diff|
            from the model's measured float32 sensitivity and the CRF's measured amplification).
        report_path: JSON report path (default ``<artifact>.report.json``).
        progress: ``report.Progress`` for progress lines (default silent).
        **options: the format's own options (``FORMATS[format].options``).
    Returns:
        the report dict (also written as JSON next to the artifact).
    Raises:
        ExportError: unknown format or option, bad option value or destination;
        verify.VerificationError: outputs out of tolerance (only the report is written).
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    cls = FORMATS[format]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ExportError(f"option {unknown[0]!r} does not apply to format {format!r} (its options: "
                                 f"{', '.join(sorted(cls.options)) or 'none'})")
    fmt = cls(**options)
    fmt.progress = progress = progress or Progress(False)
    model, crf = serving.split_crf_head(model, crf)  # a model's own (learned) CRF exports from stock ops
    fmt.crf = crf = serving.crf_for(crf, cls.crf_runtime) if crf is not None else None
    fmt.check()
    final = fmt.destination(out, overwrite)
    model = as_float32(model)
    fmt.rewrite = fmt.graph_rewrite(model)
    tolerance = tolerance or verify_lib.TOLERANCES[fmt.precision]
    size = fmt.sample_size(verify_size)
    fmt.prepare(size)
    images = verify_lib.load_samples(size, sample_dir, num_samples)
    with staging.staging(final, progress) as stage:
        with progress.step(*fmt.convert_step):
            with staging.disk_errors(final):
                staged = fmt.convert(model, stage.path, final)
        try:
            with progress.step("verify_s", fmt.verify_message):
                runners = fmt.runners(staged)
                reference = serving.reference_outputs(model, images, fmt.outputs, crf)
                tolerance, derivation = verify_lib.verification_tolerance(tolerance, model, images, crf, fmt.outputs,
                                                                      reference)
                checks = [(name, reference, run(images)) for name, run in runners.items()]
                result = verify_lib.run_checks(checks, tolerance, progress, derivation)
            warnings = fmt.warnings(result)
            for warning in warnings:
                progress.warn(warning)
            report = base_report(
                cls.name, model, final, staging.path_size(staged), **fmt.report_fields(staged),
                precision=fmt.precision, graph_rewrites=fmt.rewrite.stats, with_crf=crf is not None,
                crf=getattr(crf, "config", None),
                warnings=warnings, created_dirs=stage.created, verification=result, timings=dict(progress.timings),
                samples=sample_dir or "synthetic")
        finally:
            fmt.close()
        return staging.finalize(report, staged, final, overwrite, report_path, progress)
