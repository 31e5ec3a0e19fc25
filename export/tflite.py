"""TFLite (LiteRT) export with builtin ops only, optionally quantized.

The ``.tflite`` file has one signature, ``serving_default``: input ``image`` float32 ``[N, H, W, 3]`` RGB 0..255
(uint8 with ``int8_io``), outputs ``labels`` int32 ``[N, H, W]`` + ``probabilities`` float32 ``[N, H, W, C]`` at
the input size, or ``logits`` ``[N, h, w, C]`` at output stride 8 (``model.logits_size(H, W)``) with
``outputs="logits"``.
Only LiteRT builtin ops are allowed (no Flex / SELECT_TF_OPS: the LiteRT interpreter cannot run them); the
conversion fails otherwise.

``input_size=(H, W)`` fixes the input shape to ``[1, H, W, 3]``; without it, N, H and W are dynamic (slower in
LiteRT; see ``benchmarks/export_runtimes.py``). Either way the serving graph (``graph_rewrite.GraphRewrite``, plain ASPP
head) gives every atrous convolution as one dilated ``CONV_2D`` with batch norm folded in.

Quantization (``quantize``): ``"none"`` (float32), ``"float16"`` (float16 weights), ``"dynamic"`` (int8 weights,
dynamic-range activations), ``"int8"`` (full integer, calibrated on ``representative`` images or a synthetic set).

The conversion goes ExportArchive (``serving.serving_archive``) -> SavedModel ->
``TFLiteConverter.from_saved_model``: a SavedModel written by ``tf.saved_model.save`` of a Keras 3 model converts
to a ``.tflite`` whose weights read as garbage (NaN, no error).

Example:
    >>> report = export_tflite(model, "deeplab.tflite", quantize="float16", input_size=(513, 513))  # doctest: +SKIP
"""
import os
import shutil

import numpy as np
import tensorflow as tf

from deeplab_keras.export import driver, serving
from deeplab_keras.export.errors import ExportError

QUANTIZE_MODES = ("none", "float16", "dynamic", "int8")
SIGNATURE = "serving_default"
_PRECISION = {"none": "float32", "float16": "float16", "dynamic": "dynamic", "int8": "int8"}


def _write_float_saved_model(model, path, input_size, outputs, crf, rewrite=None):
    # Static: batch 1 too, else the converter keeps SPACE_TO_BATCH_ND around every atrous convolution.
    shape = [1, *input_size, 3] if input_size else [None, None, None, 3]
    archive, _ = serving.serving_archive(model, {SIGNATURE: (tf.TensorSpec(shape, tf.float32, name="image"), None)},
                                        outputs, crf, rewrite)
    archive.write_out(path, verbose=False)


def _check_quantize(quantize, int8_io):
    if quantize not in QUANTIZE_MODES:
        raise ExportError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    if int8_io and quantize != "int8":
        raise ExportError("int8 I/O (--int8-io) needs --quantize int8")


def convert(model, input_size=None, outputs="full", quantize="none", representative=None, int8_io=False, crf=None,
            workdir=None, rewrite=None):
    """Converts ``model`` to ``.tflite`` bytes (builtin ops only).

    Args:
        model: float32 Keras model.
        input_size: ``(H, W)`` for a static spatial size, None for dynamic.
        outputs: ``"full"`` or ``"logits"`` (see ``serving.serving_outputs``).
        quantize: one of ``QUANTIZE_MODES``.
        representative: float32 images ``[N, H, W, 3]`` for int8 calibration.
        int8_io: with ``quantize="int8"``, uint8 input image and quantized (uint8) float outputs.
        crf: optional stock-TF-op refinement.
        workdir: directory for the intermediate SavedModel (default a temporary one).
        rewrite: optional ``graph_rewrite.GraphRewrite`` of ``model`` (LiteRT gets the plain ASPP head).
    Returns:
        ``(tflite_bytes, full_integer)``: ``full_integer`` is False when int8 had to keep some float kernels.
    """
    _check_quantize(quantize, int8_io)
    import tempfile

    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="deeplab-tflite-")
    try:
        saved = os.path.join(workdir, "float_saved_model")
        _write_float_saved_model(model, saved, input_size, outputs, crf, rewrite)

        def make(ops):
            converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
            converter.target_spec.supported_ops = ops
            if quantize != "none":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantize == "float16":
                converter.target_spec.supported_types = [tf.float16]
            if quantize == "int8":
                if representative is None or not len(representative):
                    raise ExportError("int8 quantization needs representative images")
                converter.representative_dataset = lambda: ([np.asarray(im[None], np.float32)]
                                                            for im in representative)
                if int8_io:
                    converter.inference_input_type = tf.uint8
                    converter.inference_output_type = tf.uint8
            return converter.convert()

        if quantize != "int8":
            return make([tf.lite.OpsSet.TFLITE_BUILTINS]), quantize != "none"
        try:
            return make([tf.lite.OpsSet.TFLITE_BUILTINS_INT8]), True
        except Exception as strict_error:  # some op has no int8 kernel: keep it in float
            if int8_io:
                raise ExportError(f"full-integer conversion failed, so int8 I/O is impossible: {strict_error}")
            return make([tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]), False
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def make_interpreter(model, num_threads=None):
    """A LiteRT ``Interpreter`` (XNNPACK on CPU) for a ``.tflite`` path or bytes."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, (bytes, bytearray)):
        return Interpreter(model_content=bytes(model), num_threads=num_threads)
    return Interpreter(model_path=os.fspath(model), num_threads=num_threads)


def op_names(interpreter):
    """Sorted builtin op names used by an interpreter's model."""
    try:
        return sorted({d["op_name"] for d in interpreter._get_ops_details()})
    except Exception:  # private API; only used for the report
        return None


class TFLiteRunner:
    """Runs a ``.tflite`` DeepLab export image by image, (de)quantizing integer I/O.

    Args:
        model: ``.tflite`` path or bytes.
        num_threads: LiteRT threads (None: LiteRT's default).
    """

    def __init__(self, model, num_threads=None):
        self.interpreter = make_interpreter(model, num_threads)
        self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        self.input_details = self.runner.get_input_details()["image"]
        self.output_details = self.runner.get_output_details()

    def __call__(self, images):
        """Runs ``images`` (uint8/float ``[N, H, W, 3]``, 0..255) one at a time; dict of numpy outputs."""
        parts = []
        for image in np.asarray(images):
            x = image[None].astype(np.float32)
            dtype = self.input_details["dtype"]
            if dtype != np.float32:
                scale, zero = self.input_details["quantization"]
                info = np.iinfo(dtype)
                x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
            out = self.runner(image=x)
            parts.append({k: self._dequantize(k, v) for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _dequantize(self, name, value):
        detail = self.output_details[name]
        if name != "labels" and detail["dtype"] in (np.int8, np.uint8, np.int16):
            scale, zero = detail["quantization"]
            return (value.astype(np.float32) - zero) * scale
        return value


@driver.register
class TFLiteFormat(driver.FileFormat):
    """``export_model`` hooks for a ``.tflite`` file (see ``export_tflite``)."""
    name = "tflite"
    options = {"quantize": "none", "input_size": None, "outputs": "full", "representative": None,
               "num_calibration": 16, "int8_io": False, "num_threads": None, "fold_batch_norm": True}
    crf_runtime = "litert"
    what, suffix = "TFLite file", ".tflite"
    verify_message = "verifying with the LiteRT interpreter"

    @property
    def precision(self):
        return _PRECISION[self.opts["quantize"]]

    @property
    def convert_step(self):
        return "convert_s", (f"converting to TFLite (quantize={self.opts['quantize']}, "
                             f"input size {self.input_size_text})")

    def check(self):
        super().check()
        _check_quantize(self.opts["quantize"], self.opts["int8_io"])

    def convert(self, model, stage_dir, final):
        o = self.opts
        content, self.full_integer = convert(model, o["input_size"], o["outputs"], o["quantize"], self.calibration,
                                             o["int8_io"], self.crf, workdir=stage_dir, rewrite=self.rewrite)
        staged = os.path.join(stage_dir, os.path.basename(final))
        with open(staged, "wb") as f:
            f.write(content)
        return staged

    def runners(self, artifact):
        self.runner = TFLiteRunner(artifact, self.opts["num_threads"])
        return {"tflite": self.runner}

    def report_fields(self, artifact):
        o = self.opts
        return {**super().report_fields(artifact), "quantize": o["quantize"],
                "full_integer": self.full_integer if self.int8 else None, "int8_io": bool(o["int8_io"]),
                "signature": SIGNATURE,
                "inputs": {"image": str(np.dtype(self.runner.input_details["dtype"]))},
                "output_names": sorted(self.runner.output_details), "ops": op_names(self.runner.interpreter),
                **self.calibration_fields()}

    def close(self):
        self.runner = None


def export_tflite(model, out, quantize="none", input_size=None, outputs="full", crf=None, representative=None,
                  num_calibration=16, int8_io=False, overwrite=False, sample_dir=None, num_samples=4,
                  verify_size=(97, 129), tolerance=None, report_path=None, progress=None, num_threads=None):
    """Exports ``model`` to a verified ``.tflite`` file (``driver.export_model``).

    Args:
        model: Keras model (RGB 0..255 in, logits out); mixed precision is exported as float32.
        out: ``.tflite`` file path.
        quantize: ``"none"``, ``"float16"``, ``"dynamic"`` or ``"int8"``.
        input_size: ``(H, W)`` static spatial size, or None for dynamic.
        outputs: ``"full"`` (labels + probabilities at input size) or ``"logits"``.
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``.
        representative: folder of calibration images for int8 (default synthetic images: a WARNING on the console
            and in the report's ``warnings``, with the label agreement they reached).
        num_calibration: number of calibration images.
        int8_io: uint8 image input and quantized float outputs (int8 only).
        overwrite: replace an existing file.
        sample_dir: folder of verification images (default synthetic).
        num_samples: number of verification images.
        verify_size: ``(H, W)`` of verification (and calibration) images when ``input_size`` is None.
        tolerance: ``verify.Tolerance`` (default by precision, see ``verify.TOLERANCES``).
        report_path: JSON report path (default ``<out>.report.json``).
        progress: ``report.Progress`` (default silent).
        num_threads: LiteRT threads for verification.
    Returns:
        the report dict.
    Raises:
        ExportError: bad arguments or destination; verify.VerificationError: out of tolerance.
    """
    return driver.export_model(model, "tflite", out, quantize=quantize, input_size=input_size, outputs=outputs,
                               crf=crf, representative=representative, num_calibration=num_calibration,
                               int8_io=int8_io, overwrite=overwrite, sample_dir=sample_dir, num_samples=num_samples,
                               verify_size=verify_size, tolerance=tolerance, report_path=report_path,
                               progress=progress, num_threads=num_threads)
