"""What the ``deeplab`` commands share: the parser class (one-line errors, exit 2), the option groups (model
source, data, CRF, output, ``--quiet`` / ``--debug``), the one table of deprecated spellings, and model loading.

Example:
    >>> from deeplab_keras.cli.options import Parser, add_common
    >>> parser = Parser(prog="deeplab-x")
    >>> add_common(parser)
    >>> parser.parse_args(["--quiet"]).quiet
    True
"""
import argparse
import dataclasses
import os
import re
import sys

# Old spellings, accepted for one release: {command: {old flag: new flag}}. Each use prints one note on stderr.
DEPRECATED = {
    "train": {"--manual_dir": "--data", "--manual-dir": "--data", "--run_dir": "--out", "--run-dir": "--out"},
    "eval": {"--no-progress": "--quiet"},
    "export": {"--samples": "--data", "--representative-data": "--data", "--with-crf": "--crf"},
    "demo": {"--voc": "--data"},
}


class Parser(argparse.ArgumentParser):
    """argparse with the one error path of every command: ``<prog>: error: <message>`` on one line, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def usage_error(parser, message):
    """Exit 2 with one line naming the problem (``parser.error``); the usage errors every command raises."""
    parser.error(message)


class _Deprecated(argparse.Action):
    """An old spelling of ``new``: stores into the new option's destination and prints one note."""

    def __init__(self, option_strings, dest, new, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        value = self.const if self.nargs == 0 else values
        old = getattr(namespace, self.dest, None)
        if old not in (None, False, value, self.default):
            parser.error(f"{option_string} {value} and {self.new} {old} name different values; give one {self.new}")
        setattr(namespace, self.dest, value)


def add_deprecated(parser, command):
    """Registers the old spellings of ``command`` (:data:`DEPRECATED`) as hidden aliases of their new options."""
    for old, new in DEPRECATED.get(command, {}).items():
        action = parser._option_string_actions[new]  # noqa: SLF001  (argparse keeps no public lookup)
        parser.add_argument(old, dest=action.dest, nargs=action.nargs, const=action.const, type=action.type,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=_Deprecated, new=new,
                            metavar=action.metavar)


def add_common(parser):
    """``--quiet`` and ``--debug``, on every command."""
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or progress lines (results, warnings and errors still print)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow's start-up logs")


def add_model_source(parser, *, saved_model=False, extra=()):
    """The model source (one of): ``--checkpoint``, ``--preset`` (+ ``--preset-sha256``), ``--saved-model``.

    Args:
        saved_model: also offer ``--saved-model`` (an exported SavedModel: ``deeplab predict``).
        extra: (flag, kwargs) pairs of further sources in the same one-of group (``export``'s ``--backbone``).

    Returns:
        the argument group (for further options about the model).
    """
    from deeplab_keras.weights.presets import PRESETS

    group = parser.add_argument_group("model (one of)")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH",
                       help="a .keras file or a 'deeplab train' run directory (its model.keras or newest checkpoint)")
    which.add_argument("--preset", metavar="NAME",
                       help="a released DeepLab v2 model, downloaded and converted once into the Keras cache: "
                            + ", ".join(sorted(PRESETS)))
    if saved_model:
        which.add_argument("--saved-model", metavar="DIR",
                           help="a SavedModel written by 'deeplab export' (OUT/ or OUT/<version>/)")
    for flag, kwargs in extra:
        which.add_argument(flag, **kwargs)
    group.add_argument("--preset-sha256", metavar="HEX",
                       help="the sha256 you trust for the preset's download (the official files have no published "
                            "hash: without this the first download that converts is pinned and later ones must "
                            "match it)")
    return group


def add_data(parser, help, *, required=False, default=None):
    """``--data``: the one name of an image / dataset folder (or ``synthetic``)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="PATH", required=required, default=default, help=help)
    return group


def dataset_names():
    """The names ``--dataset`` takes: the registry's (``deeplab_keras.data.DATASET_NAMES``), read without
    importing the data package."""
    from deeplab_keras.training.config_sections import DATASETS

    return ("voc", "voc_aug") + DATASETS[1:]


def add_dataset(group, help):
    """``--dataset NAME`` (a registry dataset: its classes, colours and layout) on an argument group."""
    group.add_argument("--dataset", metavar="NAME", choices=dataset_names(),
                       help=f"{help} ({', '.join(dataset_names())})")


def add_crf(parser, *, what="refine the probabilities with the dense CRF"):
    """``--crf``, ``--crf-iterations N``, ``--crf-params KEY=VALUE ...`` (read with :func:`crf_params`)."""
    group = parser.add_argument_group("dense CRF")
    group.add_argument("--crf", action="store_true", help=what)
    group.add_argument("--crf-iterations", type=int, metavar="N", help="mean-field iterations (default 10)")
    group.add_argument("--crf-params", nargs="+", default=[], metavar="KEY=VALUE",
                       help="CRF parameters, e.g. bilateral_weight=4 bilateral_xy_std=67 bilateral_rgb_std=3 "
                            "gaussian_weight=3 gaussian_xy_std=1 (default: DeepLab v2 ResNet-101's)")
    return group


def crf_params(parser, args):
    """The :class:`deeplab_keras.crf.CRFParams` of ``--crf-iterations`` / ``--crf-params`` (the defaults when
    neither is given); a bad key or value, or either without ``--crf``, is a usage error naming it."""
    from deeplab_keras.crf.params import CRFParams

    try:
        if args.crf_iterations is not None:
            CRFParams(iterations=args.crf_iterations)  # names --crf-iterations when it is the bad one
    except ValueError as err:
        usage_error(parser, f"--crf-iterations: {err}")
    try:
        params = CRFParams.parse(args.crf_params, iterations=args.crf_iterations)
    except ValueError as err:
        usage_error(parser, f"--crf-params: {err}")
    for flag, given in (("--crf-iterations", args.crf_iterations is not None), ("--crf-params", args.crf_params)):
        if given and not args.crf:
            usage_error(parser, f"{flag} applies only to --crf")
    return params


def add_tiling(group):
    """``--tile H[xW]`` and ``--tile-overlap F`` on an argument group (read with :func:`tiling`)."""
    group.add_argument("--tile", metavar="H[xW]", default=None,
                       help="predict overlapping tiles of HxW px (H alone: square) and blend their probabilities, "
                            "for images larger than the network should take at once (memory bounded by the tile; "
                            "the CRF runs on the stitched result)")
    group.add_argument("--tile-overlap", type=float, default=None, metavar="F",
                       help="fraction of a tile shared with its neighbour, in [0, 1) (default 0.25)")


def tiling(parser, args):
    """``(tile_size, tile_overlap)`` of ``--tile`` / ``--tile-overlap`` (``(None, None)`` without ``--tile``); a
    bad value, or ``--tile-overlap`` without ``--tile``, is a usage error naming the option."""
    if args.tile is None:
        if args.tile_overlap is not None:
            usage_error(parser, "--tile-overlap applies only to --tile H[xW]")
        return None, None
    from deeplab_keras.inference import check_tiling

    parts = args.tile.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        usage_error(parser, f"--tile {args.tile!r} must be H or HxW in pixels, e.g. 513 or 513x1025")
    try:
        return check_tiling(tuple(int(p) for p in parts) * (3 - len(parts)), args.tile_overlap)
    except ValueError as err:
        usage_error(parser, f"--tile {args.tile} --tile-overlap {args.tile_overlap}: {err}")


def add_precision(group):
    """``--precision {float32,bf16}`` on an argument group (read with :func:`precision`)."""
    group.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                       help="bf16: run the network in bfloat16 (oneDNN; CPUs with avx512_bf16 or AMX only; about "
                            "half the float32 time, ~99%% of the labels unchanged)")


def precision(parser, args):
    """``--precision`` checked against the CPU (``deeplab_keras.precision.check_precision``): a usage error (exit 2,
    one line) for bf16 on a CPU without native bfloat16 or with ``--saved-model``."""
    from deeplab_keras.precision import check_precision

    if args.precision != "float32" and getattr(args, "saved_model", None):
        usage_error(parser, f"--precision {args.precision} needs --checkpoint or --preset (a SavedModel runs in "
                            "float32)")
    try:
        return check_precision(args.precision)
    except ValueError as err:
        usage_error(parser, f"--precision {args.precision}: {err}")


def add_output(parser, help, *, required=False, default=None, overwrite=True):
    """``--out`` (a folder of results, or the artifact path of export / convert) and ``--overwrite``."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="PATH", required=required, default=default, help=help)
    if overwrite:
        group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return group


def check_out(parser, path, *, folder=False, what="--out"):
    """Usage error (exit 2, one line) unless ``path`` can be written, checked before the work
    (:func:`deeplab_keras.files.check_writable`: a dangling link, a read-only folder, a full disk)."""
    from deeplab_keras.files import UnwritableError, check_writable

    try:
        return check_writable(path, what, folder=folder)
    except UnwritableError as err:
        usage_error(parser, err)


def load_model_source(parser, args):
    """(model, checkpoint path) from ``--checkpoint`` / ``--preset`` (``--saved-model``: (predictor, path)).

    A missing or unloadable checkpoint, an unknown preset or a bad SavedModel is a usage error (exit 2, one
    line; the exception itself with ``--debug``); a failed or mismatching preset download is a runtime error
    (raised: exit 1). ``--preset-sha256`` without ``--preset`` is a usage error; ``--quiet`` hides the download bar.
    """
    from deeplab_keras.weights import load_model, resolve_checkpoint
    from deeplab_keras.weights.download import load_cached, preset_path
    from deeplab_keras.weights.presets import PresetError

    if getattr(args, "preset_sha256", None) and not args.preset:
        usage_error(parser, "--preset-sha256 applies only to --preset (a --checkpoint or --saved-model is not "
                            "downloaded)")
    try:
        if args.preset:
            path = preset_path(args.preset, sha256=args.preset_sha256, progress=not args.quiet)
            return load_cached(path), path  # a corrupt cached .keras is named for deletion (exit 1)
        if getattr(args, "saved_model", None):
            if not os.path.isdir(args.saved_model):
                usage_error(parser, f"--saved-model {args.saved_model!r} is not a directory")
            from deeplab_keras.predict import SavedModelPredictor

            return SavedModelPredictor(args.saved_model), args.saved_model
        path = resolve_checkpoint(args.checkpoint)
        return load_model(path), path
    except PresetError as err:  # an unknown name or a bad --preset-sha256 (a ValueError)
        _usage(parser, args, err)
    except (ValueError, OSError) as err:
        if args.preset and not isinstance(err, FileNotFoundError):
            raise  # a conversion failure of a released file: a runtime error (exit 1)
        _usage(parser, args, err)
    except RuntimeError:
        raise  # a preset's download failed or does not match its sha256
    except Exception as err:  # noqa: BLE001  (a corrupt .keras: Keras raises many kinds)
        _usage(parser, args, f"cannot load the model: {first_line(err)} ({type(err).__name__})", err)


def _usage(parser, args, message, err=None):
    """A usage error from a library call: one line and exit 2, or the exception with ``--debug``."""
    if args.debug:
        raise err if err is not None else message
    usage_error(parser, first_line(message))


def first_line(err):
    """The first line of an exception's message (its type name when empty)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _field_docs(cls):
    """{field: its line in ``cls``'s docstring Args section} (continuation lines joined)."""
    docs, name, inside = {}, None, False
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Args:":
            inside = True
        elif inside and not text:
            name = None if docs else name
            if docs:
                break
        elif inside and ": " in text and text.split(": ", 1)[0].isidentifier():
            name, doc = text.split(": ", 1)
            docs[name] = doc
        elif inside and name:
            docs[name] += " " + text
    return {name: re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).rstrip(".") for name, doc in docs.items()}


def _takes_list(annotation):
    """Whether a field annotation holds a tuple (``Tuple[...]``, ``Optional[Tuple[...]]``, ...): several values."""
    import typing

    return any(typing.get_origin(a) is tuple for a in (annotation,) + typing.get_args(annotation))


# ModelConfig fields without a flag: the trainable CRF on top (model.crf) comes from training (--set model.crf=...);
# deeplab-export's --crf appends the portable CRF with the CRF parameters instead.
MODEL_FIELDS_NOT_FLAGS = ("crf",)


def model_config_options():
    """One option per :class:`deeplab_keras.models.config.ModelConfig` field (``--backbone``, ``--num-classes``,
    ``--aspp``, ``--msc-scales``, ...; help from its docstring): the one description of a model on the command
    line. Read them back with :func:`model_config`.

    Returns:
        [(flag, add_argument keyword arguments)], in field order.
    """
    from deeplab_keras.models.config import ModelConfig

    from deeplab_keras.training.config_values import field_types

    docs, out = _field_docs(ModelConfig), []
    for field in dataclasses.fields(ModelConfig):
        if field.name in MODEL_FIELDS_NOT_FLAGS:
            continue
        default = " ".join(map(str, field.default)) if isinstance(field.default, tuple) else str(field.default)
        out.append(("--" + field.name.replace("_", "-"), dict(
            dest=f"model_{field.name}", nargs="+" if _takes_list(field_types(ModelConfig)[field.name]) else None,
            default=None,
            metavar=field.name.split("_")[-1].upper(),
            help=f"{docs.get(field.name, 'ModelConfig.' + field.name)} (default: {default})")))
    return out


def model_config(parser, args):
    """The :class:`ModelConfig` of the ``--<field>`` options given (the others keep its defaults; values typed
    by the field, as ``--set model.<field>=...``), or None when none is given; a bad value is a usage error."""
    from deeplab_keras.models.config import ModelConfig
    from deeplab_keras.training.config_values import field_types, parse_value

    values = {}
    for name, annotation in field_types(ModelConfig).items():
        tokens = getattr(args, f"model_{name}", None)
        if tokens is not None:
            flag = "--" + name.replace("_", "-")
            try:
                values[name] = parse_value(",".join(tokens) if isinstance(tokens, list) else tokens, annotation, flag)
            except ValueError as err:
                usage_error(parser, err)
    if not values:
        return None
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        usage_error(parser, err)
