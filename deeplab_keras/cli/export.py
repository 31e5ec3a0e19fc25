"""``deeplab export`` (alias ``deeplab-export``): export a checkpoint, a preset or a freshly built model (the
:class:`~deeplab_keras.models.config.ModelConfig` options) to SavedModel, TFLite or ONNX, verified against Keras.

Examples:
    deeplab export --checkpoint runs/voc --format saved_model --out serving/deeplab
    deeplab export --checkpoint model.keras --format tflite --quantize int8 --data photos/ --input-size 513 513 \\
        --out m.tflite
    deeplab export --backbone resnet101 --num-classes 21 --format onnx --input-size 513 513 --out m.onnx

Exit codes: 0 exported and verified; 1 verification failed (nothing written but the report), a full disk or an
unexpected error; 2 bad arguments (an option that does not apply to the format, missing checkpoint, empty image
folder, unwritable output, ...). Errors are one line; --debug shows tracebacks.
"""
import os
import sys

from deeplab_keras.cli import options
from deeplab_keras.cli.options import usage_error

SUMMARY = "export to SavedModel / TFLite / ONNX, verified against the Keras model"
DESCRIPTION = ("Export a checkpoint, a preset or a freshly built model (--backbone and the ModelConfig options) to "
               "SavedModel, TFLite or ONNX; the artifact runs in its own runtime and is compared with the Keras model.")
EPILOG = __doc__.split("\n\n", 1)[1]
RAW_EPILOG = True
INTERRUPTED = "interrupted; nothing was written (the next export removes any leftovers)"
EXPECTED = (OSError,)
FORMATS = ("saved_model", "tflite", "onnx")  # deeplab_keras.export.FORMATS (not imported: the parser stays light)

# Options that apply to some formats / settings only: (dest, flag, default, applies(args), "applies to ...").
# They default to None in the parser so that giving one where it does not apply is an error (exit 2), even
# with its default value; the defaults below are filled in afterwards. The ModelConfig options are added to
# them in _check (they apply to --backbone only).
_CONDITIONAL = (
    ("opset", "--opset", 17, lambda a: a.format == "onnx", "--format onnx"),
    ("quantize", "--quantize", "none", lambda a: a.format in ("tflite", "onnx"), "--format tflite / onnx"),
    ("version", "--version", None, lambda a: a.format == "saved_model", "--format saved_model"),
    ("input_size", "--input-size", None, lambda a: a.format != "saved_model",
     "--format tflite / onnx (a SavedModel's serving signature takes any H, W)"),
    ("outputs", "--outputs", "full", lambda a: a.format != "saved_model",
     "--format tflite / onnx (a SavedModel serves labels + probabilities)"),
    ("num_calibration", "--num-calibration", 16, lambda a: a.quantize == "int8", "--quantize int8"),
    ("int8_io", "--int8-io", False, lambda a: a.format == "tflite" and a.quantize == "int8",
     "--format tflite --quantize int8"),
    ("weights", "--weights", None, lambda a: a.model_backbone, "--backbone"),
    ("seed", "--seed", 0, lambda a: a.model_backbone, "--backbone"),
    ("preset_sha256", "--preset-sha256", None, lambda a: a.preset,
     "--preset (a --checkpoint or a fresh --backbone model is not downloaded)"),
)


def _fraction(text):
    import argparse

    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def configure(parser):
    """Adds ``deeplab export``'s options to ``parser``."""
    fields = options.model_config_options()
    options.add_model_source(parser, extra=[(flag, dict(kwargs, help="build a fresh model with this backbone: "
                                                        + kwargs["help"])) for flag, kwargs in fields
                                            if flag == "--backbone"])
    fresh = parser.add_argument_group("fresh model (with --backbone; the fields of deeplab_keras.ModelConfig)")
    for flag, kwargs in fields:
        if flag != "--backbone":
            fresh.add_argument(flag, **kwargs)
    fresh.add_argument("--weights", help="None (default), 'imagenet' or a weights path")
    fresh.add_argument("--seed", type=int, help="random seed of the fresh weights (default 0)")

    out = options.add_output(parser, required=True,
                             help="saved_model: the model base directory (version subdirectories); tflite/onnx: the "
                                  "file. Missing parent folders are created (and named in the last line)")
    out.add_argument("--format", required=True, choices=FORMATS, help="artifact format")
    out.add_argument("--input-size", type=options.positive_int, nargs=2, metavar=("H", "W"),
                     help="tflite/onnx: static input size (faster; default dynamic H, W)")
    out.add_argument("--outputs", choices=("full", "logits"),
                     help="tflite/onnx: 'full' (default) = labels + probabilities at input size, 'logits' = logits "
                          "at output stride")
    out.add_argument("--version", type=int, metavar="N", help="saved_model: version directory (default next)")
    out.add_argument("--quantize", choices=("none", "float16", "dynamic", "int8"),
                     help="tflite: quantization (default none); onnx: none or int8 (static QDQ for onnxruntime)")
    out.add_argument("--num-calibration", type=options.positive_int,
                     help="int8: calibration images (default 16)")
    out.add_argument("--int8-io", action="store_true", default=None,
                     help="tflite int8: uint8 image input and quantized (uint8) probabilities")
    out.add_argument("--opset", type=int, help="onnx: opset, >= 13 (default 17)")
    out.add_argument("--report", metavar="PATH", help="JSON report path (default <artifact>.report.json)")
    options.add_crf(parser, what="refine probabilities with the portable dense CRF (stock TF ops) inside the graph")

    data = options.add_data(parser, help="folder of images (e.g. a VOC2012 folder) to verify the export on and, "
                                         "with --quantize int8, to calibrate on (default: synthetic images; int8 "
                                         "then warns with the agreement reached)")
    data.add_argument("--num-samples", type=options.positive_int, default=4, help="verification images (default 4)")
    data.add_argument("--verify-size", type=options.positive_int, nargs=2, metavar=("H", "W"), default=(97, 129),
                      help="verification image size when the input size is dynamic (default 97 129)")
    data.add_argument("--max-diff", type=float,
                      help="override the max |diff| tolerance (float32 default: 1e-4, times the CRF's measured "
                           "amplification with --crf)")
    data.add_argument("--min-agreement", type=_fraction,
                      help="override the label agreement tolerance (fraction, e.g. 0.95)")
    options.add_common(parser)


def _check(parser, a):
    """Cheap checks before anything slow runs; each failure is a one-line error with exit code 2."""
    model_fields = [(f"model_{flag[2:].replace('-', '_')}", flag, None, lambda a: a.model_backbone, "--backbone "
                     "(a checkpoint or preset has its own)") for flag, _ in options.model_config_options()
                    if flag != "--backbone"]
    for dest, flag, default, applies, where in _CONDITIONAL + tuple(model_fields):
        if getattr(a, dest) is None:
            setattr(a, dest, default)
        elif not applies(a):
            usage_error(parser, f"{flag} applies only to {where}")
    if a.format == "onnx" and a.opset < 13:
        usage_error(parser, f"--opset must be >= 13 (got {a.opset})")
    if a.format == "onnx" and a.quantize not in ("none", "int8"):
        usage_error(parser, f"--quantize {a.quantize} applies only to --format tflite (onnx: none or int8)")
    if a.version is not None and a.version < 0:
        usage_error(parser, f"--version must be >= 0, got {a.version}")
    if a.crf and a.outputs != "full":
        usage_error(parser, "--crf needs --outputs full (the CRF refines probabilities)")
    if a.crf and a.format == "onnx" and a.opset < 16:
        usage_error(parser, "--crf needs --opset >= 16 (ScatterND with reduction)")
    if a.checkpoint and not os.path.exists(a.checkpoint):
        usage_error(parser, f"--checkpoint {a.checkpoint}: no such file or directory")
    if a.data:
        from deeplab_keras.export.verify import list_images

        try:
            list_images(a.data)
        except FileNotFoundError as err:
            usage_error(parser, f"--data {a.data}: {err}")
    if a.format in ("tflite", "onnx") and os.path.isdir(a.out):
        usage_error(parser, f"--out {a.out} is a directory; give a file path such as "
                            f"{os.path.join(a.out, 'model.' + a.format)}")


def _final_path(a):
    if a.format == "saved_model":
        from deeplab_keras.export.saved_model import next_version

        version = a.version if a.version is not None else next_version(a.out)
        return os.path.join(os.path.abspath(a.out), str(version)), version
    return os.path.abspath(a.out), None


def _model(parser, a, progress):
    """The model to export: loaded (--checkpoint / --preset) or built from the ModelConfig options."""
    if not a.model_backbone:
        with progress.step("load_s", f"loading {a.checkpoint or 'preset ' + a.preset}"):
            return options.load_model_source(parser, a)[0]
    import keras

    config = options.model_config(parser, a)
    keras.utils.set_random_seed(a.seed)
    weights = None if a.weights in (None, "None", "none") else a.weights
    with progress.step("build_s", f"building DeepLabV2 ({config.backbone}, {config.num_classes} classes)"):
        return config.build(weights=weights)


def run(parser, a):
    """Runs ``deeplab export``; returns the exit code (0 ok, 1 verification failed / full disk, 2 arguments)."""
    _check(parser, a)
    crf_params = options.crf_params(parser, a)
    from deeplab_keras.export import ExportError, export_model, serving, staging
    from deeplab_keras.export.report import Progress
    from deeplab_keras.export.driver import FORMATS as HOOKS
    from deeplab_keras.export.verify import TOLERANCES, Tolerance, VerificationError
    from deeplab_keras.weights import is_float32

    progress = Progress(not a.quiet)
    try:
        final, version = _final_path(a)
        staging.check_destination(final, a.overwrite, "artifact")
        try:
            model = _model(parser, a, progress)
        except (OSError, ValueError) as err:  # an unusable weights file
            if a.debug:
                raise
            usage_error(parser, err)
        if not is_float32(model):
            progress.info("the model uses mixed precision; exporting a float32 copy with the same weights")
        crf = serving.portable_crf(params=crf_params) if a.crf else None
        precision = {"none": "float32"}.get(a.quantize, a.quantize)
        tolerance = TOLERANCES[precision]
        if a.max_diff is not None or a.min_agreement is not None:
            tolerance = Tolerance(a.max_diff if a.max_diff is not None else tolerance.max_abs_diff,
                                  a.min_agreement if a.min_agreement is not None else tolerance.min_agreement)
        values = dict(vars(a), version=version, representative=a.data)  # --data: int8 calibration images too
        report = export_model(model, a.format, a.out, overwrite=a.overwrite, crf=crf, sample_dir=a.data,
                              num_samples=a.num_samples, verify_size=tuple(a.verify_size), tolerance=tolerance,
                              report_path=a.report, progress=progress,
                              **{key: values[key] for key in HOOKS[a.format].options if key in values})
    except ExportError as err:
        usage_error(parser, err)
    except VerificationError as err:
        print(f"{parser.prog}: verification failed: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{parser.prog}: error: {staging.describe_os_error(err)}", file=sys.stderr)
        return 1
    created = "".join(f"; created folder {d}" for d in report.get("created_dirs") or ())
    print(f"exported {report['artifact']} ({report['size_bytes'] / 1e6:.2f} MB); report {report['report_path']}"
          f"{created}")
    return 0

