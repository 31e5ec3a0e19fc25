"""``deeplab-export``: export a DeepLab v2 checkpoint (or a freshly built model) to SavedModel, TFLite or ONNX.

Examples:
    deeplab-export --checkpoint runs/voc --format saved_model --out serving/deeplab
    deeplab-export --checkpoint model.keras --format tflite --quantize int8 --input-size 513 513 --out m.tflite
    deeplab-export --backbone resnet101 --num-classes 21 --format onnx --input-size 513 513 --out m.onnx

Exit codes: 0 exported and verified; 1 verification failed (nothing written but the report), a full disk or an
unexpected error; 2 bad arguments (unknown format, an option that does not apply to the format, missing
checkpoint, empty image folder, unwritable output, ...). Errors are one line; --debug shows tracebacks.
"""
import argparse
import os
import sys

FORMATS = ("saved_model", "tflite", "onnx")
BACKBONES = ("resnet50", "resnet101", "vgg16")

# Options that apply to some formats / settings only: (dest, flag, default, applies(args), "applies to ...").
# They default to None in the parser so that giving one where it does not apply is an error (exit 2), even
# with its default value; the defaults below are filled in afterwards.
_CONDITIONAL = (
    ("opset", "--opset", 17, lambda a: a.format == "onnx", "--format onnx"),
    ("quantize", "--quantize", "none", lambda a: a.format == "tflite", "--format tflite"),
    ("version", "--version", None, lambda a: a.format == "saved_model", "--format saved_model"),
    ("input_size", "--input-size", None, lambda a: a.format != "saved_model",
     "--format tflite / onnx (a SavedModel's serving signature takes any H, W)"),
    ("outputs", "--outputs", "full", lambda a: a.format != "saved_model",
     "--format tflite / onnx (a SavedModel serves labels + probabilities)"),
    ("representative_data", "--representative-data", None, lambda a: a.quantize == "int8", "--quantize int8"),
    ("num_calibration", "--num-calibration", 16, lambda a: a.quantize == "int8", "--quantize int8"),
    ("int8_io", "--int8-io", False, lambda a: a.quantize == "int8", "--quantize int8"),
    ("crf_iterations", "--crf-iterations", 10, lambda a: a.with_crf, "--with-crf"),
    ("num_classes", "--num-classes", 21, lambda a: a.backbone, "--backbone (a checkpoint has its classes)"),
    ("output_stride", "--output-stride", 8, lambda a: a.backbone, "--backbone"),
    ("aspp", "--aspp", "L", lambda a: a.backbone, "--backbone"),
    ("msc_scales", "--msc-scales", None, lambda a: a.backbone, "--backbone"),
    ("weights", "--weights", None, lambda a: a.backbone, "--backbone"),
    ("width_multiplier", "--width-multiplier", 1.0, lambda a: a.backbone, "--backbone"),
    ("stage_blocks", "--stage-blocks", None, lambda a: a.backbone, "--backbone"),
    ("seed", "--seed", 0, lambda a: a.backbone, "--backbone"),
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``deeplab-export: error: ...``) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def build_parser():
    """The ``deeplab-export`` argument parser."""
    p = _Parser(prog="deeplab-export", description=__doc__.split("\n\n")[0],
                epilog="Every export is run in its own runtime on sample images and compared with the Keras model "
                       "(max |diff|, label agreement, mIoU); a JSON report is written next to the artifact. "
                       "Missing parent folders of --out are created (and named in the last line).")
    src = p.add_argument_group("model (one of)")
    which = src.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH",
                       help="a .keras file or a deeplab-train run directory (its latest checkpoint)")
    which.add_argument("--backbone", choices=BACKBONES, help="build a fresh dk.DeepLabV2 with this backbone")
    src.add_argument("--num-classes", type=_positive, help="classes (with --backbone; default 21)")
    src.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="with --backbone (default 8)")
    src.add_argument("--aspp", help="'L' (default), 'S', 'largefov' (vgg16) or comma-separated rates (with "
                                    "--backbone)")
    src.add_argument("--msc-scales", type=float, nargs="+", metavar="S",
                     help="MSC scales, e.g. 1 0.75 0.5 (with --backbone)")
    src.add_argument("--weights", help="None (default), 'imagenet' or a weights path (with --backbone)")
    src.add_argument("--width-multiplier", type=float, help="channel multiplier (with --backbone; default 1)")
    src.add_argument("--stage-blocks", type=_positive, nargs=4, metavar="N",
                     help="blocks per ResNet stage (with --backbone)")
    src.add_argument("--seed", type=int, help="random seed of a freshly built model (with --backbone; default 0)")

    out = p.add_argument_group("output")
    out.add_argument("--format", required=True, choices=FORMATS, help="artifact format")
    out.add_argument("--out", required=True, metavar="PATH",
                     help="saved_model: the model base directory (version subdirectories); tflite/onnx: the file")
    out.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    out.add_argument("--input-size", type=_positive, nargs=2, metavar=("H", "W"),
                     help="tflite/onnx: static input size (faster; default dynamic H, W)")
    out.add_argument("--outputs", choices=("full", "logits"),
                     help="tflite/onnx: 'full' (default) = labels + probabilities at input size, 'logits' = logits "
                          "at output stride")
    out.add_argument("--version", type=int, metavar="N", help="saved_model: version directory (default next)")
    out.add_argument("--quantize", choices=("none", "float16", "dynamic", "int8"),
                     help="tflite: quantization (default none)")
    out.add_argument("--representative-data", metavar="DIR",
                     help="tflite int8: folder of calibration images (without it: synthetic images, with a warning)")
    out.add_argument("--num-calibration", type=_positive, help="tflite int8: calibration images (default 16)")
    out.add_argument("--int8-io", action="store_true", default=None,
                     help="tflite int8: uint8 image input and quantized (uint8) probabilities")
    out.add_argument("--opset", type=int, help="onnx: opset, >= 13 (default 17)")
    out.add_argument("--with-crf", action="store_true",
                     help="refine probabilities with the portable dense CRF (stock TF ops) inside the graph")
    out.add_argument("--crf-iterations", type=_positive,
                     help="mean-field iterations with --with-crf (default 10)")
    out.add_argument("--report", metavar="PATH", help="JSON report path (default <artifact>.report.json)")

    ver = p.add_argument_group("verification")
    ver.add_argument("--samples", metavar="DIR",
                     help="folder of verification images, e.g. a VOC2012 folder (default synthetic images)")
    ver.add_argument("--num-samples", type=_positive, default=4, help="verification images (default 4)")
    ver.add_argument("--verify-size", type=_positive, nargs=2, metavar=("H", "W"), default=(97, 129),
                     help="verification image size when the input size is dynamic (default 97 129)")
    ver.add_argument("--max-diff", type=float,
                     help="override the max |diff| tolerance (float32 default: 1e-4, times the CRF's measured "
                          "amplification with --with-crf)")
    ver.add_argument("--min-agreement", type=_fraction,
                     help="override the label agreement tolerance (fraction, e.g. 0.95)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (warnings and errors still print)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow's start-up logs")
    return p


def _check_args(p, a):
    """Cheap checks before anything slow is imported; each failure is a one-line error with exit code 2."""
    for dest, flag, default, applies, where in _CONDITIONAL:
        if getattr(a, dest) is None:
            setattr(a, dest, default)
        elif not applies(a):
            p.error(f"{flag} applies only to {where}")
    fmt = a.format
    if fmt == "onnx" and a.opset < 13:
        p.error(f"--opset must be >= 13 (got {a.opset})")
    if a.version is not None and a.version < 0:
        p.error(f"--version must be >= 0, got {a.version}")
    if a.with_crf and a.outputs != "full":
        p.error("--with-crf needs --outputs full (the CRF refines probabilities)")
    if a.with_crf and fmt == "onnx" and a.opset < 16:
        p.error("--with-crf needs --opset >= 16 (ScatterND with reduction)")
    if a.checkpoint and not os.path.exists(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such file or directory")
    from deeplab_keras.export.verify import list_images

    for flag, folder in (("--representative-data", a.representative_data), ("--samples", a.samples)):
        if folder:
            try:
                list_images(folder)
            except FileNotFoundError as e:
                p.error(f"{flag} {folder}: {e}")
    if fmt in ("tflite", "onnx") and os.path.isdir(a.out):
        p.error(f"--out {a.out} is a directory; give a file path such as {os.path.join(a.out, 'model.' + fmt)}")


def _final_path(a):
    if a.format == "saved_model":
        from deeplab_keras.export.saved_model import next_version
        version = a.version if a.version is not None else next_version(a.out)
        return os.path.join(os.path.abspath(a.out), str(version)), version
    return os.path.abspath(a.out), None


def _build_model(a, progress):
    import deeplab_keras as dk

    if a.checkpoint:
        from deeplab_keras.models import load_model
        with progress.step("load_s", f"loading checkpoint {a.checkpoint}"):
            return load_model(a.checkpoint)
    import keras

    keras.utils.set_random_seed(a.seed)
    aspp = a.aspp
    if "," in aspp or aspp.isdigit():  # explicit rates, e.g. "6,12,18,24"
        try:
            aspp = tuple(int(r) for r in aspp.split(","))
        except ValueError:
            raise ValueError(f"--aspp {a.aspp!r}: give 'L', 'S', 'largefov' (vgg16) or comma-separated "
                             "integer rates")
    weights = None if a.weights in (None, "None", "none") else a.weights
    with progress.step("build_s", f"building DeepLabV2 ({a.backbone}, {a.num_classes} classes)"):
        return dk.DeepLabV2(num_classes=a.num_classes, backbone=a.backbone, output_stride=a.output_stride,
                            aspp=aspp, msc_scales=tuple(a.msc_scales) if a.msc_scales else None, weights=weights,
                            width_multiplier=a.width_multiplier,
                            stage_blocks=tuple(a.stage_blocks) if a.stage_blocks else None)


def _make_crf(a):
    from deeplab_keras.export.common import portable_crf
    return portable_crf(iterations=a.crf_iterations)


def main(argv=None):
    """Entry point of ``deeplab-export``; returns the exit code (0 ok, 1 verification failed / full disk /
    unexpected error, 2 arguments)."""
    p = build_parser()
    a = p.parse_args(argv)
    from deeplab_keras.utils import quiet_tensorflow
    quiet_tensorflow(getattr(a, "debug", False))  # TensorFlow's CUDA/oneDNN start-up lines only with --debug
    _check_args(p, a)
    from deeplab_keras.utils import run_command

    return run_command("deeplab-export", lambda: _export(a), debug=a.debug,
                       interrupted="interrupted; nothing was written (the next export removes any leftovers)",
                       expected=(OSError,))


def _export(a):
    from deeplab_keras.export import common
    from deeplab_keras.export.verify import TOLERANCES, Tolerance, VerificationError
    from deeplab_keras.models import is_float32

    progress = common.Progress(not a.quiet)
    try:
        final, version = _final_path(a)
        common.check_destination(final, a.overwrite, "artifact")
        try:
            model = _build_model(a, progress)
        except (OSError, ValueError) as e:  # an unusable checkpoint or model option
            print(f"deeplab-export: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        if not is_float32(model):
            progress.info("the model uses mixed precision; exporting a float32 copy with the same weights")
        crf = _make_crf(a) if a.with_crf else None
        precision = {"none": "float32"}.get(a.quantize, a.quantize)
        tolerance = TOLERANCES[precision]
        if a.max_diff is not None or a.min_agreement is not None:
            tolerance = Tolerance(a.max_diff if a.max_diff is not None else tolerance.max_abs_diff,
                                  a.min_agreement if a.min_agreement is not None else tolerance.min_agreement)
        shared = dict(overwrite=a.overwrite, crf=crf, sample_dir=a.samples, num_samples=a.num_samples,
                      verify_size=tuple(a.verify_size), tolerance=tolerance, report_path=a.report, progress=progress)
        if a.format == "saved_model":
            from deeplab_keras.export.saved_model import export_saved_model
            report = export_saved_model(model, a.out, version=version, **shared)
        elif a.format == "tflite":
            from deeplab_keras.export.tflite import export_tflite
            report = export_tflite(model, a.out, quantize=a.quantize, input_size=a.input_size, outputs=a.outputs,
                                   representative=a.representative_data, num_calibration=a.num_calibration,
                                   int8_io=a.int8_io, **shared)
        else:
            from deeplab_keras.export.onnx import export_onnx
            report = export_onnx(model, a.out, opset=a.opset, input_size=a.input_size, outputs=a.outputs,
                                 **shared)
    except common.ExportError as e:
        print(f"deeplab-export: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"deeplab-export: verification failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"deeplab-export: error: {common.describe_os_error(e)}", file=sys.stderr)
        return 1
    created = "".join(f"; created folder {d}" for d in report.get("created_dirs") or ())
    print(f"exported {report['artifact']} ({report['size_bytes'] / 1e6:.2f} MB); report {report['report_path']}"
          f"{created}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
