"""The ``deeplab`` command line: ``deeplab {train,eval,predict,export,convert,demo} [options]``.

``deeplab-train``, ``deeplab-eval``, ``deeplab-predict``, ``deeplab-export``, ``deeplab-convert`` and
``deeplab-demo`` are the same commands with the sub-command preselected (:func:`train_main`, ...), and
``python -m deeplab_keras`` is ``deeplab``. Each sub-command is one module here (``SUMMARY``, ``DESCRIPTION``,
``EPILOG``, ``configure(parser)``, ``run(parser, args) -> exit code``); the option groups they share, the parser
with one-line errors and the table of deprecated spellings are in :mod:`deeplab_keras.cli.options`.

Exit codes (every command): 0 success; 2 bad arguments or unusable input (one line, nothing written); 1 a runtime
failure (one line); 130 Ctrl-C. ``--debug`` shows tracebacks and TensorFlow's start-up logs.

Example:
    >>> from deeplab_keras.cli import build_parser
    >>> build_parser("export").prog
    'deeplab-export'
"""
import argparse
import importlib
import sys

from deeplab_keras.cli.options import Parser, add_deprecated

__all__ = ["COMMANDS", "build_parser", "parse", "main", "train_main", "eval_main", "predict_main", "export_main",
           "convert_main", "demo_main"]

COMMANDS = ("train", "eval", "predict", "export", "convert", "demo")


def command_module(command):
    """The module of one sub-command (``deeplab_keras.cli.<command>``)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    return importlib.import_module(f"deeplab_keras.cli.{command}")


def _parser_kwargs(module):
    return dict(description=module.DESCRIPTION, epilog=module.EPILOG,
                formatter_class=(argparse.RawDescriptionHelpFormatter if getattr(module, "RAW_EPILOG", False)
                                 else argparse.HelpFormatter))


def _configure(parser, command):
    command_module(command).configure(parser)
    add_deprecated(parser, command)
    parser.set_defaults(_command=command, _parser=parser)
    return parser


def build_parser(command=None):
    """The parser of ``deeplab`` (``command=None``) or of one sub-command as its alias ``deeplab-<command>``.

    ``deeplab <command>`` and ``deeplab-<command>`` are built by the same ``configure`` (same options, same
    defaults); only ``prog`` differs.
    """
    if command is not None:
        return _configure(Parser(prog=f"deeplab-{command}", **_parser_kwargs(command_module(command))), command)
    parser = Parser(prog="deeplab", description="DeepLab v2 for TensorFlow / Keras 3: train, evaluate, predict, "
                                                "export and convert models, or run the demo.",
                    epilog="'deeplab COMMAND --help' describes a command; deeplab-COMMAND is the same command.")
    sub = parser.add_subparsers(title="commands", dest="_command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    for name in COMMANDS:
        module = command_module(name)
        _configure(sub.add_parser(name, help=module.SUMMARY, **_parser_kwargs(module)), name)
    return parser


def parse(argv, command=None):
    """Parses a command line as :func:`main` does, without running it: (the sub-command's parser, its args).

    Old spellings print their deprecation note; usage errors exit 2 with one line.

    Example:
        >>> parser, args = parse(["--checkpoint", "m.keras", "--format", "onnx", "--out", "m.onnx"], "export")
        >>> parser.prog, args.format
        ('deeplab-export', 'onnx')
    """
    args, extra = build_parser(command).parse_known_args([str(a) for a in argv])
    module, parser = command_module(args._command), args._parser
    if extra:  # train names the --set form of 0.1's free-form overrides; the others refuse them
        getattr(module, "parse_extra", lambda p, e: p.error(f"unrecognized arguments: {' '.join(e)}"))(parser, extra)
    return parser, args


def main(argv=None, command=None):
    """Runs ``deeplab [COMMAND] ...`` (``command`` preselects one: the ``deeplab-<command>`` aliases).

    Returns:
        the exit code (usage errors raise SystemExit(2) after their one line).
    """
    parser, args = parse(sys.argv[1:] if argv is None else argv, command)
    module = command_module(args._command)
    from deeplab_keras.tf_startup import quiet_tensorflow

    quiet_tensorflow(args.debug)  # TensorFlow's CUDA/oneDNN start-up lines only with --debug
    return run_command(parser.prog, lambda: module.run(parser, args), debug=args.debug,
                       interrupted=getattr(module, "INTERRUPTED", "interrupted"),
                       expected=getattr(module, "EXPECTED", (ValueError, RuntimeError, OSError)))


def run_command(prog, body, *, debug=False, interrupted="interrupted", expected=(ValueError, RuntimeError, OSError)):
    """Run a command line's ``body()`` (returns the exit code), turning failures into one line on stderr.

    Ctrl-C prints ``<prog>: <interrupted>`` (or the ``KeyboardInterrupt``'s own message, e.g. a download's) and
    returns 130; any other exception prints
    ``<prog>: error: <message>`` (with the exception's type and a ``--debug`` hint unless it is ``expected``)
    and returns 1. With ``debug`` both are re-raised, traceback included. ``SystemExit`` (usage errors) passes.

    Example:
        >>> run_command("deeplab-x", lambda: 0)
        0
    """
    try:
        return body()
    except KeyboardInterrupt as err:
        if debug:
            raise
        said = str(err) if type(err) is KeyboardInterrupt else ""  # a step may say what it stopped (a download)
        print(f"{prog}: {said or interrupted}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one line instead of a traceback; --debug shows it)
        if debug:
            raise
        hint = "" if isinstance(err, expected) else f" ({type(err).__name__}; rerun with --debug for the traceback)"
        print(f"{prog}: error: {' '.join(str(err).split()) or type(err).__name__}{hint}", file=sys.stderr)
        return 1


def _alias(command):
    """The entry point of ``deeplab-<command>``: :func:`main` with ``command`` preselected."""
    def alias(argv=None):
        return main(argv, command)

    alias.__name__ = alias.__qualname__ = f"{command}_main"
    alias.__doc__ = f"``deeplab-{command} ...``: the same as ``deeplab {command} ...``."
    return alias


train_main, eval_main, predict_main, export_main, convert_main, demo_main = (_alias(c) for c in COMMANDS)
