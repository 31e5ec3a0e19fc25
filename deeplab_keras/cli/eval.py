"""``deeplab eval`` (alias ``deeplab-eval``): mIoU of a checkpoint or preset at full resolution, with and without
the dense CRF, optionally multi-scale + flip or with the paper's test protocol; prints the table, writes JSON.

Example:
    deeplab eval --checkpoint runs/voc --data ~/data/VOCdevkit --crf --scales 0.5 0.75 1 1.25 1.5 --flip
"""
import os
import sys

from deeplab_keras.cli import options
from deeplab_keras.cli.options import usage_error

SUMMARY = "evaluate mIoU (with / without the CRF)"
DESCRIPTION = ("Evaluate a DeepLab checkpoint at full resolution: confusion-matrix mIoU (255 ignored), per-class IoU "
               "and pixel accuracy, optionally with multi-scale + flip inference and with the dense CRF (both results "
               "from one run). Prints the table and writes JSON.")
EPILOG = ("The paper's test protocol on VOC 2012 val: deeplab eval --preset deeplabv2_resnet101_msc_voc --data "
          "~/data/VOCdevkit --protocol deeplab-v2. Exit codes: 0 success; 2 bad arguments, missing files, a "
          "class-count mismatch; 1 runtime failures (a bad data file, a failed download). Errors are one line; "
          "--debug shows the traceback.")
INTERRUPTED = "interrupted; nothing was written"
PROTOCOLS = ("deeplab-v2",)


def configure(parser):
    """Adds ``deeplab eval``'s options to ``parser``."""
    options.add_model_source(parser)
    data = options.add_data(parser, required=True,
                            help="'synthetic' or a dataset root, the layout detected: VOC2012/ (VOC val through "
                                 "the TFDS builder), Cityscapes, PASCAL-Context, Person-Part, COCO-Stuff, or a folder "
                                 "dataset with images/ and masks/")
    options.add_dataset(data, "the dataset --data holds (its layout is checked, not detected; class names from it)")
    data.add_argument("--split", default="val", help="split of the dataset (default: val)")
    data.add_argument("--data-dir", default=None, help="TFDS data_dir for the prepared VOC records")
    data.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    data.add_argument("--num-images", type=int, default=50, help="synthetic: number of images (default 50)")
    data.add_argument("--image-size", type=int, nargs=2, default=[97, 97], metavar=("H", "W"),
                      help="synthetic: image size (default 97 97)")
    data.add_argument("--seed", type=int, default=1000003,
                      help="synthetic: seed (default 1000003, the held-out split of a seed-0 training run)")
    test = parser.add_argument_group("test protocol")
    test.add_argument("--protocol", choices=PROTOCOLS, default=None,
                      help="deeplab-v2: the paper's test protocol, i.e. --pad-to 513 and --crf with the paper's CRF "
                           "parameters, at scale 1 without flip (a model with msc_scales fuses its own scales); "
                           "reports the results without and with the CRF")
    test.add_argument("--pad-to", type=int, default=None, metavar="N",
                      help="pad each image at the bottom/right to NxN with the mean colour, predict, crop back (the "
                           "paper: 513); an image larger than N is an error")
    test.add_argument("--scales", type=float, nargs="+", default=[1.0],
                      help="test scales, averaged (e.g. 0.5 0.75 1 1.25 1.5)")
    test.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    options.add_tiling(test)
    options.add_precision(test)
    options.add_crf(parser, what="also evaluate with the dense CRF (both results from one run)")
    options.add_output(parser, overwrite=False,
                       help="a folder (eval.json inside) or a .json file (default: eval.json next to the checkpoint "
                            "/ in the run dir; eval_<preset>.json in the current folder for --preset)")
    options.add_common(parser)


def _settings(parser, args):
    """Checks the numbers and resolves ``--protocol``: returns (pad_to, crf, crf_params)."""
    from deeplab_keras.evaluate import PAPER_PAD_SIZE

    if any(s <= 0 for s in args.scales):
        usage_error(parser, f"--scales must be positive, got {args.scales}")
    if args.max_images is not None and args.max_images < 1:
        usage_error(parser, f"--max-images must be >= 1, got {args.max_images}")
    if args.pad_to is not None and args.pad_to < 1:
        usage_error(parser, f"--pad-to must be >= 1 (the paper: 513), got {args.pad_to}")
    if args.protocol is None:
        return args.pad_to, args.crf, options.crf_params(parser, args)
    conflicts = [flag for flag, given in (
        (f"--pad-to {args.pad_to}", args.pad_to not in (None, PAPER_PAD_SIZE)),
        (f"--scales {' '.join(f'{s:g}' for s in args.scales)}", args.scales != [1.0]),
        ("--flip", args.flip), ("--crf-iterations", args.crf_iterations is not None),
        ("--crf-params", bool(args.crf_params))) if given]
    if conflicts:
        usage_error(parser, f"--protocol {args.protocol} fixes the test settings (pad to {PAPER_PAD_SIZE}, scale 1, "
                            f"no flip, the paper's CRF); drop {', '.join(conflicts)} or leave out --protocol")
    args.crf = True
    return PAPER_PAD_SIZE, True, options.crf_params(parser, args)


def _dataset(parser, args, num_classes):
    """(dataset, class names) of ``--data`` (and ``--dataset``): 'synthetic', or a root holding a registry layout
    (resolved as ``deeplab train --data``: :func:`deeplab_keras.training.config_sections.data_source`)."""
    from deeplab_keras import data
    from deeplab_keras.training.config_sections import data_source

    try:
        kind, path = data_source(args.data, args.dataset)
    except ValueError as err:
        usage_error(parser, err)
    if kind == "synthetic":
        ds = data.make_synthetic(args.num_images, size=tuple(args.image_size), num_classes=num_classes,
                                 seed=args.seed)
        return ds, data.synthetic.class_names(num_classes)
    if kind in ("voc", "voc_aug"):  # VOC val (voc_aug's val is VOC's)
        if num_classes < len(data.VOC_CLASSES):
            usage_error(parser, f"the model predicts {num_classes} classes but VOC 2012 has {len(data.VOC_CLASSES)}; "
                                "evaluate a VOC model on VOC data")
        ds = data.load_voc(args.split, config="voc", manual_dir=path, data_dir=args.data_dir)
        return ds, list(data.VOC_CLASSES) if num_classes == len(data.VOC_CLASSES) else None
    if kind != "folder":
        info = data.dataset_info(kind)
        if info.num_classes != num_classes:
            usage_error(parser, f"the model predicts {num_classes} classes but {kind} has {info.num_classes}; "
                                f"evaluate a {kind} model on it")
        if args.split not in info.splits:
            usage_error(parser, f"--split {args.split!r} is not a split of {kind} ({', '.join(info.splits)})")
        tfds_dir = {"data_dir": args.data_dir} if kind == "cityscapes" and args.data_dir else {}
        return data.load_dataset(kind, path, args.split, **tfds_dir), list(info.class_names)
    names = data.read_class_names(path)
    if names is not None and len(names) != num_classes:
        usage_error(parser, f"{path} lists {len(names)} classes but the model predicts {num_classes}")
    return data.folder_dataset(path, num_classes=num_classes), names


def _out_path(args, checkpoint):
    """The JSON file: ``--out`` (a .json file, or a folder holding eval.json) or the default next to the model."""
    if args.out is not None:
        return args.out if args.out.endswith(".json") else os.path.join(args.out, "eval.json")
    if args.preset:
        return f"eval_{args.preset}.json"
    folder = (os.path.abspath(args.checkpoint) if os.path.isdir(args.checkpoint)
              else os.path.dirname(os.path.abspath(checkpoint)))
    return os.path.join(folder, "eval.json")


def run(parser, args):
    """Runs ``deeplab eval``; returns the exit code (usage errors exit 2 from inside)."""
    pad_to, crf, crf_params = _settings(parser, args)
    tile_size, tile_overlap = options.tiling(parser, args)
    precision = options.precision(parser, args)
    from deeplab_keras.data import BadDataError
    from deeplab_keras.evaluate import evaluate, format_table, write_json

    out = options.check_out(parser, _out_path(args, args.checkpoint or ""),  # before the work, not after it
                            what="--out" if args.out else "the results file (--out sets it)")
    model, ckpt = options.load_model_source(parser, args)
    num_classes = int(model.output_shape[-1])
    if args.protocol and not getattr(model, "msc_scales", None):
        print(f"{parser.prog}: note: the model has no msc_scales: --protocol {args.protocol} runs it at one scale",
              file=sys.stderr)
    try:
        dataset, names = _dataset(parser, args, num_classes)
        results = evaluate(model, dataset, num_classes, scales=args.scales, flip=args.flip, crf=crf,
                           crf_params=crf_params, pad_to=pad_to, class_names=names, max_images=args.max_images,
                           progress=not args.quiet, tile_size=tile_size, tile_overlap=tile_overlap,
                           precision=precision)
    except BadDataError:
        raise  # a bad data file (named in the message): a runtime failure, exit 1
    except (FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        usage_error(parser, err)
    results.update(checkpoint=os.path.abspath(ckpt), preset=args.preset, protocol=args.protocol, data=args.data)
    print(format_table(results))
    try:
        print(f"{parser.prog}: wrote {write_json(results, out)}")
    except OSError as err:  # the disk filled up (or the folder changed) during the run: say which
        from deeplab_keras.files import write_error_text

        raise RuntimeError(f"cannot write {out}: {write_error_text(err, os.path.dirname(out))} (the table above "
                           "holds the results)") from None
    return 0
