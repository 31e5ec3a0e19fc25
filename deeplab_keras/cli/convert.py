"""``deeplab convert`` (alias ``deeplab-convert``): turn released DeepLab v2 weights into a normal ``.keras`` model.

Sources: a Caffe ``.caffemodel`` (the released DeepLab v2 ResNet-101 / VGG-16 models, the COCO init, Kaiming
He's ImageNet ResNets with ``--backbone-only``) or a kazuto1011/deeplab-pytorch ``.pth`` state dict; the reading
and loading is :func:`deeplab_keras.weights.convert.convert`.

Examples:
    deeplab convert train2_iter_20000.caffemodel --backbone resnet101 --num-classes 21 \\
        --msc-scales 1 0.75 0.5 --out deeplabv2_voc.keras
    deeplab convert init.caffemodel --backbone-only --num-classes 21 --out coco_init.keras
    deeplab convert deeplabv2_resnet101_msc-vocaug-20000.pth --msc-scales 1 0.75 0.5 --out voc.keras

Exit codes: 0 written; 2 bad input (unreadable or mismatching weights, bad arguments, existing --out without
--overwrite; nothing is written); 1 an unexpected failure, e.g. a full disk (traceback with --debug).
"""
import argparse
import os

from deeplab_keras.architecture import BACKBONES
from deeplab_keras.cli import options
from deeplab_keras.cli.options import usage_error

SUMMARY = "convert a released .caffemodel / .pth into a .keras model"
DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]
EPILOG = __doc__.split("\n\n", 2)[2]
RAW_EPILOG = True
INTERRUPTED = "interrupted; nothing was written"


def _aspp(text):
    if "," in text or text.isdigit():
        try:
            return tuple(int(r) for r in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"give 'L', 'S', 'largefov' or comma-separated rates, got {text}")
    return text


def configure(parser):
    """Adds ``deeplab convert``'s options to ``parser``."""
    parser.add_argument("src", help="the .caffemodel or deeplab-pytorch .pth file")
    model = parser.add_argument_group("model (checked against the file)")
    model.add_argument("--backbone", choices=BACKBONES, help="checked against the file (default: the file's)")
    model.add_argument("--num-classes", type=options.positive_int,
                       help="checked against the file's head (default: the file's); with --backbone-only the fresh "
                            "head's classes (required)")
    model.add_argument("--msc-scales", type=float, nargs="+", metavar="S",
                       help="multi-scale inputs of the MSC models, e.g. 1 0.75 0.5 (weights shared by all scales)")
    model.add_argument("--backbone-only", action="store_true",
                       help="load only the backbone (ImageNet / COCO inits) and keep a fresh head")
    model.add_argument("--aspp", type=_aspp,
                       help="with --backbone-only: the fresh head ('L', 'S', 'largefov' or rates)")
    options.add_output(parser, required=True, help="the .keras file to write")
    options.add_common(parser)


def _names(names, limit=6):
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _summary(report, out):
    """What was loaded, in a few lines."""
    head = report["head"]
    lines = [f"loaded {len(report['loaded'])} layers with weights from {report['source']} into "
             f"{report['keras_layers']} Keras layers: {report['backbone']}"
             + (f", {report['num_classes']} classes, aspp={report['aspp']!r}" if head == "loaded" else
                ", fresh head") + (f", pool5a={report['pool5a']}" if "pool5a" in report else "")]
    if report["msc_copies"]:
        lines.append(f"ignored {len(report['msc_copies'])} MSC branch copies equal to their shared layers: "
                     f"{_names(report['msc_copies'])}")
    if report["ignored"]:
        lines.append(f"ignored (not loaded): {_names(report['ignored'])}")
    if report["zero_bias"]:
        lines.append(f"{len(report['zero_bias'])} convolutions have no bias in the file: Keras biases set to 0")
    lines.append(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    return "\n".join(lines)


def run(parser, args):
    """Runs ``deeplab convert``; returns the exit code (usage errors exit 2 from inside)."""
    if args.msc_scales and (any(s <= 0 for s in args.msc_scales) or 1.0 not in args.msc_scales):
        usage_error(parser, f"--msc-scales must be positive and include 1, got {args.msc_scales}")
    if args.aspp is not None and not args.backbone_only:
        usage_error(parser, "--aspp applies to --backbone-only (a full import takes the file's head)")
    if not os.path.isfile(args.src):
        usage_error(parser, f"{args.src}: no such file")
    from deeplab_keras.weights.convert import check_output, convert, save_keras

    try:  # unreadable / mismatching weights and bad arguments: one line, exit 2, nothing written
        out = check_output(args.out, args.overwrite)
        options.check_out(parser, out)  # a dangling link, a read-only folder, a full disk: before the work
        model, report = convert(args.src, backbone=args.backbone, num_classes=args.num_classes,
                                msc_scales=tuple(args.msc_scales) if args.msc_scales else None,
                                backbone_only=args.backbone_only,
                                **({"aspp": args.aspp} if args.aspp is not None else {}))
    except (ValueError, FileExistsError) as err:  # CaffeModelError / PthError are ValueErrors
        if args.debug:
            raise
        usage_error(parser, str(err))
    try:
        save_keras(model, out, args.overwrite)
    except FileExistsError:
        raise
    except OSError as err:  # the disk filled up during the conversion: a full disk is not a permission error
        from deeplab_keras.files import write_error_text

        raise RuntimeError(f"cannot write {out}: {write_error_text(err, os.path.dirname(os.path.abspath(out)))}; "
                           "nothing was written") from None
    if not args.quiet:
        print(_summary(report, out))
    return 0
