"""Command lines ``deeplab-train`` and ``deeplab-eval``: thin layers over :mod:`deeplab_keras.train` and
:mod:`deeplab_keras.evaluate`.

Examples::

    deeplab-train --config voc_resnet101_aspp_l --manual_dir ~/data/VOCdevkit --run_dir runs/voc
    deeplab-train --config my.yaml --steps 2000 --crop_size 321 321 --mixed_precision mixed_float16
    deeplab-eval --checkpoint runs/voc --data ~/data/VOCdevkit --crf --scales 0.5 0.75 1 1.25 1.5 --flip

Exit codes: 0 success, 2 bad arguments / missing files (one-line error), 1 other failures.
"""
import argparse
import os
import sys

from deeplab_keras.utils import usage_error

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["train_main", "eval_main", "parse_overrides"]


def parse_overrides(tokens):
    """Turns ``--key value [value ...]`` / ``--key=value`` tokens into {key: value} (values parsed as YAML).

    Several values after one key make a list (``--crop_size 321 321``); dashes in keys become underscores.

    Raises:
        ValueError: a token that is not under a ``--key``.
    """
    import yaml

    out, key, values = {}, None, []

    def parse(raw):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:  # e.g. "[1," or "a: b: c": keep the text; the config check names the key
            return raw
        if isinstance(value, str) and _is_number(value):  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
        return value

    def flush():
        if key is not None:
            if not values:
                raise ValueError(f"--{key} needs a value (e.g. --{key} 100; use true/false for switches)")
            out[key] = values[0] if len(values) == 1 else values

    for token in tokens:
        if token.startswith("--") and len(token) > 2 and not _is_number(token):
            flush()
            name, sep, raw = token[2:].partition("=")
            key, values = name.replace("-", "_"), []
            if sep:
                values.append(parse(raw))
        else:
            if key is None:
                raise ValueError(f"unexpected argument {token!r}; overrides look like --key value")
            values.append(parse(token))
    flush()
    return out


def _is_number(token):
    try:
        float(token)
        return True
    except ValueError:
        return False


def _train_parser():
    from deeplab_keras.train import TrainConfig
    import dataclasses

    keys = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    parser = argparse.ArgumentParser(
        prog="deeplab-train",
        description="Train DeepLab v2 with model.fit (the paper's recipe). Any config key can be overridden "
                    "on the command line: --key value (YAML values; several values make a list). "
                    "Re-running the same command in the same run_dir resumes an interrupted run.",
        epilog=f"config keys: {keys}. Packaged configs: voc_resnet101_aspp_l, voc_vgg16_largefov, tiny_cpu.")
    parser.add_argument("--config", default=None,
                        help="YAML config file or a packaged config name (default: the paper's defaults)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser


def train_main(argv=None):
    """``deeplab-train --config FILE.yaml [--key value ...]``.

    Exit codes: 0 done; 2 a bad argument or config, or a run directory that holds a run of another model
    (one line, nothing written); 1 a failure while training (e.g. bad data, a full disk), or the run directory
    in use by another deeplab-train (the line names its pid); 130 Ctrl-C (the state is saved first: rerun the
    same command to resume from that step). Tracebacks only with ``--debug``.
    """
    from deeplab_keras.utils import quiet_tensorflow, run_command

    parser = _train_parser()
    args, rest = parser.parse_known_args(argv)
    quiet_tensorflow(args.debug)  # TensorFlow's CUDA/oneDNN start-up lines only with --debug
    try:
        from deeplab_keras.train import load_config

        overrides = parse_overrides(rest)
        config = load_config(args.config, overrides)
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        usage_error(parser, str(e) or repr(e))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    return run_command("deeplab-train", lambda: _train_run(config, parser, args.debug), debug=args.debug)


def _train_run(config, parser, debug):
    """Runs ``train(config)`` for :func:`train_main`: Ctrl-C and failures while training get a line that says
    where the saved state is; config errors are usage errors (exit 2)."""
    import tensorflow as tf

    from deeplab_keras.train import ResumableBackup, TrainingInterrupted, train
    from deeplab_keras.data._common import tf_error_line
    from deeplab_keras.utils import LockedError

    def resume_hint():
        epoch, batch, path = ResumableBackup.resume_point(os.path.join(os.path.abspath(config.run_dir), "backup"))
        if path is None:
            return "no training state was saved yet (a rerun starts at step 0)"
        return (f"the last saved state is {path} (step {epoch * config.steps_per_epoch + batch}); rerun the same "
                "command to resume from it")

    try:
        result = train(config)
    except KeyboardInterrupt as e:
        if debug:
            raise
        if isinstance(e, TrainingInterrupted):
            line = (f"interrupted at step {e.step} of {config.steps}; state saved to {e.state_path}; rerun the same "
                    f"command to resume from step {e.step}")
        else:  # a second Ctrl-C, or one before training started
            line = f"interrupted; {resume_hint()}"
        print(f"deeplab-train: {line}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # a bad config, or a run directory of another model
        if debug:
            raise
        usage_error(parser, e)
    except LockedError:
        raise  # its message names the run directory and the pid holding it
    except Exception as e:  # a failure while training: one line saying where the saved state is
        if debug:
            raise
        if isinstance(e, tf.errors.OpError):
            what = f"while training: {tf_error_line(e)}"
        elif isinstance(e, OSError) and e.strerror:
            what = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
        else:
            what = f"{type(e).__name__}: {' '.join(str(e).split())} (--debug shows the traceback)"
        raise RuntimeError(f"{what}; {resume_hint()}") from e
    last = {k: v[-1] for k, v in result.history.items() if v}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    print(f"deeplab-train: done; run dir {result.run_dir}; model {result.model_path}"
          + (f"; last epoch: {summary}" if summary else ""))
    return 0


PROTOCOLS = ("deeplab-v2",)
PAPER_PAD_SIZE = 513  # deeplab_keras.evaluate.PAPER_PAD_SIZE (not imported here: the parser stays TensorFlow-free)


def _eval_parser():
    from deeplab_keras.models.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="deeplab-eval",
        description="Evaluate a DeepLab checkpoint at full resolution: confusion-matrix mIoU (255 ignored), "
                    "per-class IoU and pixel accuracy, optionally with multi-scale + flip inference and with "
                    "the dense CRF (both results from one run). Prints the table and writes JSON.",
        epilog="The paper's test protocol on VOC 2012 val: deeplab-eval --preset deeplabv2_resnet101_msc_voc "
               "--data ~/data/VOCdevkit --protocol deeplab-v2. Exit codes: 0 success; 2 bad arguments, missing "
               "files, a class-count mismatch; 1 runtime failures (a bad data file, a failed download). "
               "Errors are one line; --debug shows the traceback.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="a .keras file or a deeplab-train run directory (its model.keras or newest ckpt)")
    source.add_argument("--preset", metavar="NAME",
                        help="a released DeepLab v2 model, downloaded and converted once into the Keras cache: "
                             + ", ".join(sorted(PRESETS)))
    parser.add_argument("--preset-sha256", metavar="HEX", default=None,
                        help="the sha256 you trust for the preset's download (the official files have no published "
                             "hash: without this the first download is pinned and later ones must match it)")
    parser.add_argument("--data", required=True,
                        help="'synthetic', a folder holding VOC2012/ (VOC val through the TFDS builder), or a "
                             "folder dataset with images/ and masks/")
    parser.add_argument("--split", default="val", help="VOC split (default: val)")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir for the prepared VOC records")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="deeplab-v2: the paper's test protocol, i.e. --pad-to 513 and --crf with the paper's "
                             "CRF parameters, at scale 1 without flip (a model with msc_scales fuses its own "
                             "scales); reports the results without and with the CRF")
    parser.add_argument("--pad-to", type=int, default=None, metavar="N",
                        help="pad each image at the bottom/right to NxN with the mean colour, predict, crop back "
                             "(the paper: 513); an image larger than N is an error")
    parser.add_argument("--crf", action="store_true", help="also evaluate with the dense CRF")
    parser.add_argument("--crf-iterations", type=int, default=None, help="mean-field iterations (default 10)")
    parser.add_argument("--crf-params", nargs="*", default=[], metavar="KEY=VALUE",
                        help="CRF parameters, e.g. bilateral_weight=4 bilateral_xy_std=67 bilateral_rgb_std=3 "
                             "gaussian_weight=3 gaussian_xy_std=1 (default: the paper's)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help="test scales, averaged (e.g. 0.5 0.75 1 1.25 1.5)")
    parser.add_argument("--flip", action="store_true", help="also average horizontally flipped predictions")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--num-images", type=int, default=50, help="synthetic: number of images (default 50)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[97, 97], metavar=("H", "W"),
                        help="synthetic: image size (default 97 97)")
    parser.add_argument("--seed", type=int, default=1000003,
                        help="synthetic: seed (default 1000003, the held-out split of a seed-0 training run)")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default: eval.json next to the checkpoint / in the run dir; "
                             "eval_<preset>.json in the current folder for --preset)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow's start-up logs")
    return parser


def _eval_dataset(args, num_classes, parser):
    from deeplab_keras import data

    if args.data == "synthetic":
        ds = data.make_synthetic(args.num_images, size=tuple(args.image_size), num_classes=num_classes,
                                 seed=args.seed)
        return ds, data.synthetic.class_names(num_classes)
    path = os.path.expanduser(args.data)
    if not os.path.isdir(path):
        usage_error(parser, f"--data {args.data!r} is neither 'synthetic' nor an existing folder")
    if os.path.isdir(os.path.join(path, "VOC2012")):
        if num_classes < len(data.VOC_CLASSES):
            usage_error(parser, f"the model predicts {num_classes} classes but VOC 2012 has {len(data.VOC_CLASSES)}; "
                          "evaluate a VOC model on VOC data")
        ds = data.load_voc(args.split, config="voc", manual_dir=path, data_dir=args.data_dir)
        names = list(data.VOC_CLASSES) if num_classes == len(data.VOC_CLASSES) else None
        return ds, names
    if os.path.isdir(os.path.join(path, "images")):
        names = data.read_class_names(path)
        if names is not None and len(names) != num_classes:
            usage_error(parser, f"{path} lists {len(names)} classes but the model predicts {num_classes}")
        return data.folder_dataset(path, num_classes=num_classes), names
    usage_error(parser, f"--data {path!r} holds neither VOC2012/ nor images/ + masks/")


def _usage_error(parser, args, error):
    """A usage error from a library call: one line and exit 2, or the traceback with --debug."""
    if args.debug:
        raise error
    usage_error(parser, error)


def _eval_settings(args, parser):
    """Checks the numbers and resolves ``--protocol``: returns (pad_to, crf, crf_params)."""
    if any(s <= 0 for s in args.scales):
        usage_error(parser, f"--scales must be positive, got {args.scales}")
    if args.max_images is not None and args.max_images < 1:
        usage_error(parser, f"--max-images must be >= 1, got {args.max_images}")
    if args.crf_iterations is not None and args.crf_iterations < 0:
        usage_error(parser, f"--crf-iterations must be >= 0, got {args.crf_iterations}")
    if args.pad_to is not None and args.pad_to < 1:
        usage_error(parser, f"--pad-to must be >= 1 (the paper: 513), got {args.pad_to}")
    crf_params = {} if args.crf_iterations is None else {"iterations": args.crf_iterations}
    for item in args.crf_params:
        key, sep, value = item.partition("=")
        try:
            crf_params[key.replace("-", "_")] = float(value)
        except ValueError:
            sep = ""
        if not sep or key.replace("-", "_") not in _crf_keys():
            usage_error(parser, f"--crf-params {item!r}: expected KEY=NUMBER with KEY in {sorted(_crf_keys())}")
    if args.protocol is None:
        return args.pad_to, args.crf, crf_params
    conflicts = [flag for flag, given in (
        (f"--pad-to {args.pad_to}", args.pad_to not in (None, PAPER_PAD_SIZE)),
        (f"--scales {' '.join(f'{s:g}' for s in args.scales)}", args.scales != [1.0]),
        ("--flip", args.flip), ("--crf-iterations", args.crf_iterations is not None),
        ("--crf-params", bool(args.crf_params))) if given]
    if conflicts:
        usage_error(parser, f"--protocol {args.protocol} fixes the test settings (pad to {PAPER_PAD_SIZE}, scale 1, no "
                      f"flip, the paper's CRF); drop {', '.join(conflicts)} or leave out --protocol")
    return PAPER_PAD_SIZE, True, {}


def _eval_model(args, parser):
    """(model, checkpoint path) from --checkpoint or --preset; usage errors exit 2."""
    from deeplab_keras.models import load_model, resolve_checkpoint
    from deeplab_keras.models.presets import PresetError, preset_path

    try:
        ckpt = (preset_path(args.preset, sha256=args.preset_sha256) if args.preset
                else resolve_checkpoint(args.checkpoint))
        return load_model(ckpt), ckpt
    except (FileNotFoundError, PresetError) as e:
        _usage_error(parser, args, e)
    except ValueError as e:
        if args.preset:
            raise  # a conversion failure of a released file: a runtime error (exit 1)
        _usage_error(parser, args, e)


def _run_eval(args, parser):
    pad_to, crf, crf_params = _eval_settings(args, parser)
    from deeplab_keras.data import BadDataError
    from deeplab_keras.evaluate import evaluate, format_table, write_json

    model, ckpt = _eval_model(args, parser)
    num_classes = int(model.output_shape[-1])
    if args.protocol and not getattr(model, "msc_scales", None):
        print(f"deeplab-eval: note: the model has no msc_scales: --protocol {args.protocol} runs it at one scale",
              file=sys.stderr)
    try:
        dataset, names = _eval_dataset(args, num_classes, parser)
        results = evaluate(model, dataset, num_classes, scales=args.scales, flip=args.flip, crf=crf,
                           crf_params=crf_params, pad_to=pad_to, class_names=names, max_images=args.max_images,
                           progress=not args.no_progress)
    except BadDataError:
        raise  # a bad data file (named in the message): a runtime failure, exit 1
    except (FileNotFoundError, ValueError) as e:
        _usage_error(parser, args, e)
    results["checkpoint"] = os.path.abspath(ckpt)
    results["preset"] = args.preset
    results["protocol"] = args.protocol
    results["data"] = args.data
    out = args.out
    if out is None and args.preset:
        out = f"eval_{args.preset}.json"
    elif out is None:
        folder = os.path.abspath(args.checkpoint) if os.path.isdir(args.checkpoint) else os.path.dirname(
            os.path.abspath(ckpt))
        out = os.path.join(folder, "eval.json")
    print(format_table(results))
    print(f"deeplab-eval: wrote {write_json(results, out)}")
    return 0


def eval_main(argv=None):
    """``deeplab-eval --checkpoint PATH | --preset NAME --data ... [--protocol deeplab-v2] [--crf] [--scales ...]``.

    Expected failures print one line: exit 2 for usage errors, 1 for runtime failures; ``--debug`` re-raises
    them with the traceback.
    """
    parser = _eval_parser()
    args = parser.parse_args(argv)
    from deeplab_keras.utils import quiet_tensorflow, run_command

    quiet_tensorflow(args.debug)
    return run_command("deeplab-eval", lambda: _run_eval(args, parser), debug=args.debug,
                       interrupted="interrupted; nothing was written")


def _crf_keys():
    from deeplab_keras.evaluate import DEFAULT_CRF_PARAMS

    return set(DEFAULT_CRF_PARAMS)


if __name__ == "__main__":  # python -m deeplab_keras.cli train|eval ...
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "eval"):
        command = sys.argv.pop(1)
        sys.exit(train_main() if command == "train" else eval_main())
    sys.exit("usage: python -m deeplab_keras.cli {train,eval} [options]")
