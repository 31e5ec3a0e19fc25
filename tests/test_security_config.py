"""YAML configs are untrusted input (issue 22, row S8): aliases are refused (a few hundred bytes of nested aliases
expand to gigabytes), a file over the size cap or nested too deeply is refused before it is built, and every
error line stays short, at the library and at ``deeplab-train --config``."""
import pytest

from deeplab_keras import cli
from deeplab_keras.training import config

LAUGHS = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abc", "bcd")]
                   + ["model: {num_classes: *d}"]) + "\n"   # 6561 'lol's from 250 bytes


@pytest.mark.parametrize("text, message", [
    (LAUGHS, r"line 2: YAML aliases \(\*name\) are not supported; write the value out"),
    ("model: " + "[" * 60_000 + "\n", r"line 1: nested deeper than 50 levels"),
    ("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 120)), r"line 51: nested deeper than 50 levels"),
    ("model: {num_classes: '" + "9" * 5000 + "'}\n", r"num_classes.* \.\.\. \(\d+ characters in all\)"),
    ("model: {num_classes: [" + ", ".join(["1"] * 3000) + "]}\n", r"\.\.\. \(\d+ characters in all\)"),
], ids=["aliases", "deep-flow", "deep-block", "long-string", "long-list"])
def test_bad_configs_are_one_short_line(tmp_path, capsys, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        config.load_config(str(path))
    assert len(str(e.value)) <= config.MAX_ERROR_CHARS and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--config", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and len(err[0]) < config.MAX_ERROR_CHARS + 40, err
    assert not (tmp_path / "run").exists()


def test_a_config_over_the_size_cap_is_not_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 1000)
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 101)
    with pytest.raises(ValueError, match=r"big\.yaml' is over 1000 bytes; a config is a short YAML file"):
        config.load_config(str(path))
    path.write_text("schedule: {steps: 7}\n# small\n")
    assert config.load_config(str(path)).schedule.steps == 7  # an alias-free config still loads
