"""``deeplab predict`` (alias ``deeplab-predict``): segment image files into VOC-palette masks, overlays and
per-image class areas (:func:`deeplab_keras.predict.predict_files`).

Example:
    deeplab predict photos/ --checkpoint runs/voc --out masks/ --overlay --crf
"""
import os

from deeplab_keras.cli import options
from deeplab_keras.cli.options import usage_error

SUMMARY = "segment image files (masks, overlays, class areas)"
DESCRIPTION = ("Segment images with a DeepLab checkpoint, preset or exported SavedModel; writes VOC-palette index "
               "PNGs, optional overlays and per-image class areas (areas.json / areas.csv).")
EPILOG = ("Exit codes: 0 every image written; 1 some images failed (named on stderr) or the run stopped (a full "
          "disk); 2 bad arguments (nothing written); 130 Ctrl-C (the masks written so far are complete).")
INTERRUPTED = "interrupted; the masks written so far are complete and their areas recorded"  # a download says its own
MAX_PIXELS = 50_000_000  # deeplab_keras.predict.MAX_PIXELS (not imported here: the parser stays light)


def configure(parser):
    """Adds ``deeplab predict``'s options to ``parser``."""
    parser.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    options.add_model_source(parser, saved_model=True)
    test = parser.add_argument_group("inference")
    test.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test scales, e.g. 0.75 1 1.25")
    test.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    test.add_argument("--batch-size", type=int, default=1, help="images of one size run together (default 1)")
    test.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                      help=f"refuse larger images (default {MAX_PIXELS})")
    test.add_argument("--stop-on-error", action="store_true", help="stop at the first bad image")
    options.add_tiling(test)
    options.add_precision(test)
    options.add_crf(parser, what="refine the probabilities with the dense CRF (custom op) before the argmax")
    out = options.add_output(parser, required=True, help="output folder (created)")
    out.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    options.add_dataset(out, "the dataset the model was trained on: its class names (areas) and colours (masks)")
    out.add_argument("--label-ids", action="store_true",
                     help="with --dataset cityscapes: write the Cityscapes labelIds (grayscale PNGs, what the "
                          "benchmark server reads) instead of coloured train ids")
    options.add_common(parser)


def run(parser, args):
    """Runs ``deeplab predict``; returns the exit code (usage errors exit 2 from inside)."""
    from deeplab_keras.data._common import IMAGE_EXTENSIONS
    from deeplab_keras.predict import collect_inputs, output_names, predict_files, read_areas

    if args.batch_size < 1:
        usage_error(parser, f"--batch-size must be >= 1, got {args.batch_size}")
    if any(s <= 0 for s in args.scales):
        usage_error(parser, f"--scales must be > 0, got {args.scales}")
    if args.max_pixels < 1:
        usage_error(parser, f"--max-pixels must be >= 1, got {args.max_pixels}")
    crf_params = options.crf_params(parser, args)
    tile_size, tile_overlap = options.tiling(parser, args)
    precision = options.precision(parser, args)
    for item in args.inputs:
        if not os.path.exists(item):
            usage_error(parser, f"input {item!r} does not exist")
    paths = collect_inputs(args.inputs)
    if not paths:
        usage_error(parser, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {' '.join(args.inputs)}")
    options.check_out(parser, args.out, folder=True)  # a read-only or full --out: before the work
    try:
        output_names(paths, args.out, args.overlay)
        read_areas(args.out)
    except ValueError as err:
        usage_error(parser, str(err))
    if args.label_ids and args.dataset != "cityscapes":
        usage_error(parser, "--label-ids needs --dataset cityscapes (it writes Cityscapes labelIds)")
    model, _ = options.load_model_source(parser, args)  # a failed preset download raises: exit 1
    labelling = _labelling(parser, args, model)
    summary = predict_files(model, paths, args.out, crf=args.crf, crf_params=crf_params, overlay_images=args.overlay,
                            scales=tuple(args.scales), flip=args.flip, batch_size=args.batch_size,
                            overwrite=args.overwrite, stop_on_error=args.stop_on_error, max_pixels=args.max_pixels,
                            progress=not args.quiet, tile_size=tile_size, tile_overlap=tile_overlap,
                            precision=precision, **labelling)
    if not args.quiet:  # the failures were reported on stderr as they happened ("skipped ...")
        print(f"wrote {len(summary['written'])} masks to {args.out}; {len(summary['failed'])} failed")
    return 1 if summary["failed"] else 0


def _labelling(parser, args, model):
    """predict_files' ``class_names``, ``palette`` and ``label_ids`` of ``--dataset`` / ``--label-ids`` ({} without
    ``--dataset``); a model of another class count is a usage error."""
    if not args.dataset:
        return {}
    from deeplab_keras.data import dataset_info
    from deeplab_keras.data.classes import cityscapes_train_to_label_ids

    info = dataset_info(args.dataset)
    classes = getattr(model, "output_shape", (None,))[-1]
    if info.num_classes is not None and classes is not None and classes != info.num_classes:
        usage_error(parser, f"the model predicts {classes} classes but --dataset {args.dataset} has "
                            f"{info.num_classes}; give the dataset the model was trained on")
    return {"class_names": list(info.class_names) if info.class_names else None, "palette": info.palette,
            "label_ids": cityscapes_train_to_label_ids() if args.label_ids else None}
