"""``deeplab demo`` (alias ``deeplab-demo``): the whole story on a CPU in a few minutes
(:func:`deeplab_keras.apps.demo.run`): train a tiny model on synthetic data, evaluate with / without the CRF, run
the CRF on the VOC samples, export and verify SavedModel / TFLite / ONNX, predict, write a report.

Example:
    deeplab demo --out deeplab_report
"""
import os

from deeplab_keras.cli import options
from deeplab_keras.cli.options import usage_error

SUMMARY = "train, evaluate, export and predict a tiny model end to end (a few CPU minutes)"
DESCRIPTION = ("The main job, on a CPU in a few minutes: train a tiny DeepLab on synthetic data, evaluate it with and "
               "without the dense CRF, refine coarse score maps of real VOC samples with the CRF, export SavedModel, "
               "TFLite and ONNX (each verified), predict, and write report.json with the pictures.")
EPILOG = "Exit codes: 0 done; 2 bad arguments (nothing written); 1 a failure; 130 Ctrl-C."


def configure(parser):
    """Adds ``deeplab demo``'s options to ``parser``."""
    options.add_data(parser, help="folder holding VOC2012/ for the CRF study (default: the package's VOC samples)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny_cpu config's)")
    options.add_output(parser, default="deeplab_report", help="report folder (default: deeplab_report)")
    options.add_common(parser)


def run(parser, args):
    """Runs ``deeplab demo``; returns the exit code (usage errors exit 2 from inside)."""
    if args.steps is not None and args.steps < 1:
        usage_error(parser, f"--steps must be >= 1, got {args.steps}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        usage_error(parser, f"--out {args.out} is a file; give a folder for the report")
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "VOC2012", "SegmentationClass")):
        usage_error(parser, f"--data {args.data} holds no VOC2012/SegmentationClass/ folder; give the folder that "
                    "holds VOC2012/")
    from deeplab_keras.apps.demo import run as run_demo

    try:
        run_demo(args.out, args.steps, args.data, args.overwrite, log=(lambda *_: None) if args.quiet else print)
    except FileExistsError as err:
        usage_error(parser, err)
    return 0
