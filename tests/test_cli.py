"""The one command line: ``deeplab COMMAND`` and the ``deeplab-COMMAND`` aliases build the same parser and run the
same code, deprecated spellings map to the new flag with one note, usage errors are one line with exit 2, every
``--help`` lists the shared groups, and every command line in the README parses. Nothing here runs a model."""
import argparse
import os
import re
import shlex

import pytest

from deeplab_keras import cli
from deeplab_keras.cli.options import DEPRECATED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest valid command line of each command (parsing only: the paths need not exist).
MINIMAL = {
    "train": [],
    "eval": ["--checkpoint", "m.keras", "--data", "synthetic"],
    "predict": ["photo.jpg", "--checkpoint", "m.keras", "--out", "masks"],
    "export": ["--checkpoint", "m.keras", "--format", "onnx", "--out", "m.onnx"],
    "convert": ["w.caffemodel", "--out", "m.keras"],
    "demo": [],
}


def _signature(parser):
    """What a parser accepts: every option's strings, destination, nargs, default, choices, required, help."""
    return [(tuple(a.option_strings), a.dest, a.nargs, repr(a.default), a.choices, a.required, a.help)
            for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _subparser(command):
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _exit(capsys, fn):
    """(exit code, stdout, stderr lines) of a call that ends in SystemExit."""
    with pytest.raises(SystemExit) as e:
        fn()
    out, err = capsys.readouterr()
    return e.value.code, out, err.strip().splitlines()


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_alias_and_subcommand_have_the_same_parser(command):
    alias, sub = cli.build_parser(command), _subparser(command)
    assert alias.prog == f"deeplab-{command}" and sub.prog == f"deeplab {command}"
    assert _signature(alias) == _signature(sub)


def test_console_scripts_are_the_aliases():
    """setup.py: `deeplab` is cli.main and each deeplab-<command> is cli.<command>_main."""
    setup = open(os.path.join(ROOT, "setup.py")).read()
    scripts = dict(re.findall(r'"(deeplab[\w-]*)=deeplab_keras\.cli:(\w+)"', setup))
    assert scripts == {"deeplab": "main", **{f"deeplab-{c}": f"{c}_main" for c in cli.COMMANDS}}


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_alias_and_subcommand_run_the_same_code(command, monkeypatch):
    """Both spellings reach the command module's run() with the same arguments."""
    seen = []
    module = cli.command_module(command)
    monkeypatch.setattr(module, "run", lambda parser, args: seen.append((parser.prog, vars(args))) or 0)
    assert getattr(cli, f"{command}_main")(MINIMAL[command]) == 0
    assert cli.main([command] + MINIMAL[command]) == 0
    (prog_a, args_a), (prog_b, args_b) = seen
    assert (prog_a, prog_b) == (f"deeplab-{command}", f"deeplab {command}")
    drop = ("_parser",)
    assert {k: v for k, v in args_a.items() if k not in drop} == {k: v for k, v in args_b.items() if k not in drop}


@pytest.mark.parametrize("command, old, new", [(c, o, n) for c, table in DEPRECATED.items() for o, n in table.items()])
def test_deprecated_spelling_maps_to_the_new_flag_with_one_note(command, old, new, capsys):
    new_action = cli.build_parser(command)._option_string_actions[new]
    value = [] if new_action.nargs == 0 else ["some/folder"]
    _, old_args = cli.parse(MINIMAL[command] + [old] + value, command)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deeplab-{command}: note: {old} is deprecated and will be removed in the next release; use {new}"]
    _, new_args = cli.parse(MINIMAL[command] + [new] + value, command)
    assert capsys.readouterr().err == ""
    assert vars(old_args) | {"_parser": None} == vars(new_args) | {"_parser": None}
    assert getattr(new_args, new_action.dest) == (True if not value else value[0])


def test_two_old_flags_naming_different_folders_are_refused(capsys):
    argv = MINIMAL["export"] + ["--samples", "a", "--representative-data", "b"]
    code, _, err = _exit(capsys, lambda: cli.parse(argv, "export"))
    assert code == 2 and err[-1].startswith("deeplab-export: error: --representative-data b and --data a")


@pytest.mark.parametrize("command", cli.COMMANDS)
@pytest.mark.parametrize("extra, message", [(["--no-such-option"], "unrecognized arguments: --no-such-option"),
                                            (["--quiet", "--debug", "--help-me"], "--help-me")])
def test_usage_errors_are_one_line_exit_2(command, extra, message, capsys):
    for prog, fn in ((f"deeplab-{command}", lambda: cli.parse(MINIMAL[command] + extra, command)),
                     (f"deeplab {command}", lambda: cli.parse([command] + MINIMAL[command] + extra))):
        code, out, err = _exit(capsys, fn)
        assert code == 2 and out == "" and len(err) == 1, err
        assert err[0].startswith(f"{prog}: error: ") and message in err[0]


@pytest.mark.parametrize("command", ["eval", "predict", "export", "convert"])
def test_missing_required_arguments_are_one_line_exit_2(command, capsys):
    code, _, err = _exit(capsys, lambda: cli.parse([], command))
    assert code == 2 and len(err) == 1 and "required" in err[0] and err[0].startswith(f"deeplab-{command}: error:")


def test_unknown_command_is_one_line_exit_2(capsys):
    code, _, err = _exit(capsys, lambda: cli.parse(["exprot"]))
    assert code == 2 and len(err) == 1 and "invalid choice: 'exprot'" in err[0]


def test_train_old_overrides_name_the_set_form(capsys):
    code, _, err = _exit(capsys, lambda: cli.parse(["--config", "tiny_cpu", "--steps", "2"], "train"))
    assert code == 2 and len(err) == 1 and "--set schedule.steps=2" in err[0], err
    code, _, err = _exit(capsys, lambda: cli.parse(["train", "--crop_size=321"]))
    assert code == 2 and len(err) == 1 and "--set data.crop_size=321" in err[0], err


# option groups every command shows in --help: {group title: options}
SHARED = {"train": {"data": ["--data"], "output": ["--out"]},
          "eval": {"model (one of)": ["--checkpoint", "--preset", "--preset-sha256"], "data": ["--data"],
                   "dense CRF": ["--crf", "--crf-iterations", "--crf-params"], "output": ["--out"]},
          "predict": {"model (one of)": ["--checkpoint", "--preset", "--preset-sha256", "--saved-model"],
                      "dense CRF": ["--crf", "--crf-iterations", "--crf-params"], "output": ["--out", "--overwrite"]},
          "export": {"model (one of)": ["--checkpoint", "--preset", "--preset-sha256", "--backbone"],
                     "data": ["--data"], "dense CRF": ["--crf", "--crf-iterations", "--crf-params"],
                     "output": ["--out", "--overwrite"]},
          "convert": {"output": ["--out", "--overwrite"]},
          "demo": {"data": ["--data"], "output": ["--out", "--overwrite"]}}


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_help_lists_the_shared_groups(command, capsys):
    code, out, _ = _exit(capsys, lambda: cli.main([command, "--help"]))
    assert code == 0
    sections = {}
    for block in re.split(r"\n(?=\S[^\n]*:\n)", out):
        title, _, body = block.partition(":\n")
        sections[title.strip()] = body
    for title, flags in SHARED[command].items():
        assert title in sections, (title, sorted(sections))
        for flag in flags:
            assert re.search(rf"^\s+{re.escape(flag)}\b", sections[title], re.M), (title, flag)
    assert "--quiet" in out and "--debug" in out
    assert not [flag for flag in DEPRECATED.get(command, {}) if flag in out]  # old spellings stay out of --help


def test_export_model_options_are_the_model_config_fields():
    """--backbone, --num-classes, ... are ModelConfig's fields (one description of a model), typed as --set is."""
    import dataclasses

    from deeplab_keras.cli.options import MODEL_FIELDS_NOT_FLAGS
    from deeplab_keras.models.config import ModelConfig

    flags = {a.dest for a in cli.build_parser("export")._actions if a.dest.startswith("model_")}
    assert flags == {f"model_{f.name}" for f in dataclasses.fields(ModelConfig)
                     if f.name not in MODEL_FIELDS_NOT_FLAGS}
    assert MODEL_FIELDS_NOT_FLAGS == ("crf",)  # the trainable CRF head: --set model.crf=..., not an export flag
    parser, args = cli.parse(["--backbone", "resnet50", "--num-classes", "3", "--aspp", "6,12", "--msc-scales", "1",
                              "0.5", "--stage-blocks", "1", "1", "1", "1", "--format", "onnx", "--out", "m.onnx"],
                             "export")
    from deeplab_keras.cli.options import model_config

    assert model_config(parser, args) == ModelConfig(num_classes=3, backbone="resnet50", aspp=(6, 12),
                                                     msc_scales=(1.0, 0.5), stage_blocks=(1, 1, 1, 1))


def test_export_model_option_errors_are_one_line(capsys):
    from deeplab_keras.cli.options import model_config

    parser, args = cli.parse(["--backbone", "vgg16", "--stage-blocks", "1", "1", "1", "1", "--format", "onnx",
                              "--out", "m.onnx"], "export")
    code, _, err = _exit(capsys, lambda: model_config(parser, args))
    assert code == 2 and len(err) == 1 and "stage_blocks" in err[0]
    parser, args = cli.parse(["--backbone", "vgg16", "--num-classes", "x", "--format", "onnx", "--out", "m.onnx"],
                             "export")
    code, _, err = _exit(capsys, lambda: model_config(parser, args))
    assert code == 2 and len(err) == 1 and "--num-classes='x' is not an integer" in err[0]


def readme_commands(path=os.path.join(ROOT, "README.md")):
    """The `deeplab ...` / `deeplab-<command> ...` command lines of the README's shell code blocks (continuations
    joined, comments dropped, `a && deeplab-demo ...` split)."""
    blocks, lines, fence = [], [], None
    for line in open(path):
        if line.startswith("```"):
            if fence is None:
                fence, lines = line.strip(), []
            else:
                if fence in ("```bash", "```sh", "```console"):
                    blocks.append("".join(lines))
                fence = None
        elif fence is not None:
            lines.append(line)
    commands = []
    for text in blocks:
        for line in text.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if re.match(r"\s*deeplab(-\w+)?\s", part):
                    commands.append(shlex.split(part, comments=True))
    return commands


def test_readme_has_commands_of_every_kind():
    kinds = {words[0] if words[0] != "deeplab" else f"deeplab-{words[1]}" for words in readme_commands()}
    assert {f"deeplab-{c}" for c in cli.COMMANDS} <= kinds, kinds


@pytest.mark.parametrize("words", readme_commands() + readme_commands(os.path.join(ROOT, "export", "README.md")),
                         ids=lambda w: " ".join(w)[:60])
def test_readme_command_parses(words, capsys):
    """Each README command line parses without a usage error or a deprecation note (nothing is run)."""
    if words[0] == "deeplab":
        parser, args = cli.parse(words[1:])
    else:
        parser, args = cli.parse(words[1:], words[0][len("deeplab-"):])
    assert capsys.readouterr().err == ""
    if parser.prog in ("deeplab train", "deeplab-train"):  # the --set keys and values exist (data folders need not)
        from deeplab_keras.training.config import load_config

        load_config(args.config, args.sets)


@pytest.mark.slow  # a fresh interpreter imports TensorFlow: ~12 s
def test_python_m_deeplab_keras_is_the_deeplab_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "deeplab_keras", "export", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: deeplab export"), proc.stderr[-2000:]


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
@pytest.mark.parametrize("extra, message", [
    (["--crf-iterations", "3"], "--crf-iterations applies only to --crf"),
    (["--crf", "--crf-params", "foo=1"], "'foo=1': expected KEY=NUMBER"),
    (["--crf", "--crf-iterations", "-1"], "crf.iterations must be an integer in 0..10000"),
])
def test_crf_options_are_one_crfparams_with_one_line_errors(command, extra, message, capsys):
    from deeplab_keras.cli.options import crf_params
    from deeplab_keras.crf import CRFParams

    parser, args = cli.parse(MINIMAL[command] + ["--crf", "--crf-iterations", "3", "--crf-params", "gaussian_weight=0"],
                             command)
    assert crf_params(parser, args) == CRFParams(iterations=3, gaussian_weight=0.0)
    parser, args = cli.parse(MINIMAL[command] + extra, command)
    code, _, err = _exit(capsys, lambda: crf_params(parser, args))
    assert code == 2 and len(err) == 1 and err[0].startswith(f"deeplab-{command}: error: ") and message in err[0]
