"""deeplab-eval failure behaviour (issue 13): a label value out of range in folder data and a class-count mismatch
give one line naming the file and the fix (no TensorFlow traceback), exit 1 (bad data) or 2 (usage); --debug
shows the traceback; nothing is written."""
import os

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model
from deeplab_keras import cli
from deeplab_keras.data import BadDataError, write_synthetic_folder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("errors") / "tiny3.keras")
    tiny_model(3).save(path)
    return path


@pytest.fixture(scope="module")
def bad_label_folder(tmp_path_factory):
    """Three 3-class images without classes.txt; the second mask holds the value 7."""
    root = write_synthetic_folder(str(tmp_path_factory.mktemp("bad_label") / "data"), 3, size=(41, 41),
                                  num_classes=3)
    os.remove(os.path.join(root, "classes.txt"))
    mask = os.path.join(root, "masks", "synthetic_00001.png")
    values = np.array(Image.open(mask))
    values[5, 5] = 7
    Image.fromarray(values, mode="L").save(mask)
    return root


def _one_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_label_value_out_of_range_is_one_line_exit_1(model_path, bad_label_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli.eval_main(["--checkpoint", model_path, "--data", bad_label_folder, "--out", str(out),
                          "--quiet"])
    assert code == 1
    line = _one_line(capsys)
    assert line.startswith("deeplab-eval: error: ") and "synthetic_00001.png" in line
    assert "label values [7] outside {0..2, 255}" in line and "fix the mask" in line
    assert not out.exists()


def test_debug_shows_the_traceback(model_path, bad_label_folder, tmp_path):
    with pytest.raises(BadDataError, match="synthetic_00001.png"):
        cli.eval_main(["--checkpoint", model_path, "--data", bad_label_folder, "--out", str(tmp_path / "e.json"),
                       "--quiet", "--debug"])


def test_more_classes_in_the_data_than_the_model_without_class_file(model_path, tmp_path, capsys):
    root = write_synthetic_folder(str(tmp_path / "five"), 2, size=(41, 41), num_classes=5, seed=2)
    os.remove(os.path.join(root, "classes.txt"))
    assert cli.eval_main(["--checkpoint", model_path, "--data", root, "--out", str(tmp_path / "e.json"),
                          "--quiet"]) == 1
    line = _one_line(capsys)
    assert "outside {0..2, 255}" in line and "pass the right num_classes" in line


def test_class_file_mismatch_is_a_usage_error(model_path, tmp_path, capsys):
    root = write_synthetic_folder(str(tmp_path / "five"), 1, size=(41, 41), num_classes=5)
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--checkpoint", model_path, "--data", root, "--quiet"])
    assert e.value.code == 2
    assert "lists 5 classes but the model predicts 3" in _one_line(capsys)


def test_voc_data_with_a_3_class_model_is_refused_up_front(model_path, voc_samples_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--checkpoint", model_path, "--data", str(voc_samples_dir), "--data-dir",
                       str(tmp_path / "tfds"), "--quiet"])
    assert e.value.code == 2
    assert "the model predicts 3 classes but VOC 2012 has 21" in _one_line(capsys)
    assert not (tmp_path / "tfds").exists()  # refused before preparing any data


def test_unexpected_error_is_one_line_with_a_hint(model_path, monkeypatch, capsys):
    import deeplab_keras.evaluate

    def broken(*args, **kwargs):
        raise TypeError("something unforeseen\nsecond line")

    monkeypatch.setattr(deeplab_keras.evaluate, "evaluate", broken)
    assert cli.eval_main(["--checkpoint", model_path, "--data", "synthetic", "--quiet"]) == 1
    line = _one_line(capsys)
    assert line == ("deeplab-eval: error: something unforeseen second line (TypeError; rerun with --debug for the "
                    "traceback)")
    with pytest.raises(TypeError):
        cli.eval_main(["--checkpoint", model_path, "--data", "synthetic", "--quiet", "--debug"])
