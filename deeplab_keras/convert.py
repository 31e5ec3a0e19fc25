"""``deeplab-convert``: turn released DeepLab v2 weights into a normal ``.keras`` model.

Sources: a Caffe ``.caffemodel`` (the released DeepLab v2 ResNet-101 / VGG-16 models, the COCO init, Kaiming
He's ImageNet ResNets with ``--backbone-only``) or a kazuto1011/deeplab-pytorch ``.pth`` state dict.

Examples:
    deeplab-convert train2_iter_20000.caffemodel --backbone resnet101 --num-classes 21 \\
        --msc-scales 1 0.75 0.5 --out deeplabv2_voc.keras
    deeplab-convert init.caffemodel --backbone-only --num-classes 21 --out coco_init.keras
    deeplab-convert deeplabv2_resnet101_msc-vocaug-20000.pth --msc-scales 1 0.75 0.5 --out voc.keras

Exit codes: 0 written; 2 bad input (unreadable or mismatching weights, bad arguments, existing --out without
--overwrite; nothing is written); 1 an unexpected failure, e.g. a full disk (traceback with --debug).
"""
import argparse
import os
import sys

from deeplab_keras.utils import usage_error

BACKBONES = ("resnet50", "resnet101", "vgg16")


def _aspp(text):
    if "," in text or text.isdigit():
        try:
            return tuple(int(r) for r in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"give 'L', 'S', 'largefov' or comma-separated rates, got {text}")
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        usage_error(self, f"{message} (see --help)")


def build_parser():
    """The ``deeplab-convert`` argument parser."""
    p = _Parser(prog="deeplab-convert", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("src", help="the .caffemodel or deeplab-pytorch .pth file")
    p.add_argument("--out", required=True, help="the .keras file to write")
    p.add_argument("--backbone", choices=BACKBONES, help="checked against the file (default: the file's)")
    p.add_argument("--num-classes", type=int,
                   help="checked against the file's head (default: the file's); with --backbone-only the fresh "
                        "head's classes (required)")
    p.add_argument("--msc-scales", type=float, nargs="+", metavar="S",
                   help="multi-scale inputs of the MSC models, e.g. 1 0.75 0.5 (weights shared by all scales)")
    p.add_argument("--backbone-only", action="store_true",
                   help="load only the backbone (ImageNet / COCO inits) and keep a fresh head")
    p.add_argument("--aspp", type=_aspp, help="with --backbone-only: the fresh head ('L', 'S', 'largefov' or rates)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="tracebacks and TensorFlow's logs")
    return p


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


def _run(p, a):
    from deeplab_keras.models.caffe import check_output, convert, save_keras

    try:  # unreadable / mismatching weights and bad arguments: one line, exit 2, nothing written
        out = check_output(a.out, a.overwrite)
        model, report = convert(a.src, backbone=a.backbone, num_classes=a.num_classes,
                                msc_scales=tuple(a.msc_scales) if a.msc_scales else None,
                                backbone_only=a.backbone_only, **({"aspp": a.aspp} if a.aspp is not None else {}))
    except (ValueError, FileExistsError) as e:  # CaffeModelError / PthError are ValueErrors
        if a.debug:
            raise
        usage_error(p, str(e))
    save_keras(model, out, a.overwrite)
    if not a.quiet:
        print(_summary(report, out))
    return 0


def main(argv=None):
    """``deeplab-convert``: 0 written, 2 bad input (nothing written), 1 unexpected failure, 130 interrupted."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.num_classes is not None and a.num_classes < 1:
        p.error(f"--num-classes must be a positive integer, got {a.num_classes}")
    if a.msc_scales and (any(s <= 0 for s in a.msc_scales) or 1.0 not in a.msc_scales):
        p.error(f"--msc-scales must be positive and include 1, got {a.msc_scales}")
    if a.aspp is not None and not a.backbone_only:
        p.error("--aspp applies to --backbone-only (a full import takes the file's head)")
    if not os.path.isfile(a.src):
        p.error(f"{a.src}: no such file")
    from deeplab_keras.utils import quiet_tensorflow, run_command

    quiet_tensorflow(a.debug)
    return run_command("deeplab-convert", lambda: _run(p, a), debug=a.debug,
                       interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
