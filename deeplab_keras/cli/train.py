"""``deeplab train`` (alias ``deeplab-train``): train DeepLab v2 with ``model.fit`` and the paper's recipe from a
config (:func:`deeplab_keras.training.config.load_config`); re-running the same command resumes.

Examples:
    deeplab train --config voc_resnet101_aspp_l --data ~/data/VOCdevkit --out runs/voc
    deeplab train --config my.yaml --set schedule.steps=2000 --set data.crop_size=321,321
    deeplab train --config tiny_cpu --print-config
"""
import os
import sys

from deeplab_keras.cli import options
from deeplab_keras.cli.options import usage_error

SUMMARY = "train a model (config + --set overrides); rerun to resume"
DESCRIPTION = ("Train DeepLab v2 with model.fit (the paper's recipe). The config is a YAML file or a packaged name; "
               "any value can be overridden with --set section.key=value (typed by the config's fields). "
               "Re-running the same command with the same --out resumes an interrupted run.")
EPILOG = ("Packaged configs: voc_resnet101_aspp_l, voc_vgg16_largefov, cityscapes_resnet101_aspp_l, "
          "pascal_context_resnet101_aspp_l, person_part_resnet101_msc, tiny_cpu. Exit codes: 0 done; 2 a bad "
          "argument or config, or a run directory that holds a run of another model (nothing written); 1 a failure "
          "while training (bad data, a full disk) or a run directory in use; 130 Ctrl-C (the state is saved first: "
          "rerun the same command to resume).")


def configure(parser):
    """Adds ``deeplab train``'s options to ``parser``."""
    from deeplab_keras.training.config import config_keys

    keys = "; ".join(f"{section}: {', '.join(names)}" for section, names in config_keys().items())
    parser.add_argument("--config", metavar="NAME|FILE",
                        help="YAML config file or a packaged config name (default: the paper's defaults)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one config value (repeatable; lists as 321,321; null for None). Keys: {keys}")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    data = options.add_data(parser, help="'synthetic' or a dataset root: VOC2012/ (+ benchmark_RELEASE/ for the aug "
                                         "set), Cityscapes, PASCAL-Context, Person-Part, COCO-Stuff or a folder "
                                         "dataset with images/ and masks/, the layout detected (sets the config's "
                                         "data section)")
    options.add_dataset(data, "the dataset --data holds (its layout is checked, not detected); without --data, sets "
                              "data.dataset")
    options.add_output(parser, overwrite=False,
                       help="the run directory: checkpoints, model.keras, history, logs (runtime.run_dir); required "
                            "unless --config or --set runtime.run_dir=... names it")
    options.add_common(parser)


def parse_extra(parser, extra):
    """Refuses the tokens argparse did not know: 0.1's ``--key value`` overrides get one line naming the
    ``--set section.key=value`` form."""
    if not extra:
        return
    from deeplab_keras.training.config import suggest_key

    token = extra[0]
    if token.startswith("--"):
        key = suggest_key(token)
        value = token.partition("=")[2] or (extra[1] if len(extra) > 1 and not extra[1].startswith("--") else "VALUE")
        if key:
            usage_error(parser, f"{token.split('=')[0]} is not an option; config values are set with --set "
                                f"{key}={value}")
    usage_error(parser, f"unrecognized arguments: {' '.join(extra)}")


def load(parser, args):
    """The :class:`TrainConfig` of ``--config``, ``--set``, ``--data`` and ``--out``; errors exit 2."""
    from deeplab_keras.training.config import load_config

    sets = list(args.sets) + ([f"runtime.run_dir={args.out}"] if args.out else [])
    sets += ["runtime.verbose=0"] if args.quiet else []
    data = (args.dataset, args.data) if args.dataset and args.data else args.data
    try:
        if args.dataset and not args.data:
            from deeplab_keras.training.config_sections import DataConfig

            sets += [f"data.{key}={value}" for key, value in DataConfig.dataset_fields(args.dataset).items()]
        return load_config(args.config, sets, data=data)
    except (ValueError, OSError) as err:
        if args.debug:
            raise
        usage_error(parser, str(err) or repr(err))


def run(parser, args):
    """Runs ``deeplab train``; returns the exit code."""
    config = load(parser, args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.out is None:  # never a silent ./runs/deeplab: the run directory is given, or said
        if args.config is None and not any(s.startswith("runtime.run_dir=") for s in args.sets):
            usage_error(parser, "give --out DIR, the run directory (checkpoints, model.keras, logs; rerunning the "
                                "same command resumes there)")
        print(f"{parser.prog}: no --out: the run directory is {os.path.abspath(config.runtime.run_dir)} "
              "(the config's runtime.run_dir)", file=sys.stderr)
    options.check_out(parser, config.runtime.run_dir, folder=True, what="--out" if args.out else "runtime.run_dir")
    return _train(parser, args, config)


def _resume_hint(config):
    from deeplab_keras.training import ResumableBackup

    epoch, batch, path = ResumableBackup.resume_point(os.path.join(os.path.abspath(config.runtime.run_dir), "backup"))
    if path is None:
        return "no training state was saved yet (a rerun starts at step 0)"
    return (f"the last saved state is {path} (step {epoch * config.schedule.steps_per_epoch + batch}); rerun the "
            "same command to resume from it")


def _train(parser, args, config):
    """``train(config)``: Ctrl-C and failures while training get a line that says where the saved state is;
    config errors are usage errors (exit 2)."""
    import tensorflow as tf

    from deeplab_keras.data._common import tf_error_line
    from deeplab_keras.training import TrainingInterrupted, train
    from deeplab_keras.locks import LockedError

    try:
        result = train(config)
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        if isinstance(err, TrainingInterrupted):
            line = (f"interrupted at step {err.step} of {config.schedule.steps}; state saved to {err.state_path}; "
                    f"rerun the same command to resume from step {err.step}")
        else:  # a second Ctrl-C, or one before training started
            line = f"interrupted; {_resume_hint(config)}"
        print(f"{parser.prog}: {line}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:  # a bad config, or a run directory of another model
        if args.debug:
            raise
        usage_error(parser, err)
    except LockedError:
        raise  # its message names the run directory and the pid holding it
    except Exception as err:  # a failure while training: one line saying where the saved state is
        if args.debug:
            raise
        if isinstance(err, tf.errors.OpError):
            what = f"while training: {tf_error_line(err)}"
        elif isinstance(err, OSError) and err.strerror:
            what = f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
        else:
            what = f"{type(err).__name__}: {' '.join(str(err).split())} (--debug shows the traceback)"
        raise RuntimeError(f"{what}; {_resume_hint(config)}") from err
    last = {k: v[-1] for k, v in result.history.items() if v}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    print(f"{parser.prog}: done; run dir {result.run_dir}; model {result.model_path}"
          + (f"; last epoch: {summary}" if summary else ""))
    return 0
