"""``--dataset`` on train / eval / predict: the layout of ``--data`` is detected or checked (one line naming what
was looked for), eval names the dataset's classes, predict writes its colours or Cityscapes labelIds; the
per-dataset configs load."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model
from deeplab_keras import cli
from deeplab_keras.data import classes as C
from deeplab_keras.training.config import load_config
from test_datasets import _cityscapes_files


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes"))
    _cityscapes_files(root, ("train", "val"), size=(33, 41))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "city.keras")
    tiny_model(num_classes=19).save(path)
    return path


def _usage_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def test_train_config_from_dataset_and_data(cityscapes, tmp_path, capsys):
    assert cli.main(["train", "--config", "cityscapes_resnet101_aspp_l", "--data", cityscapes, "--out",
                     str(tmp_path / "run"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "dataset: cityscapes" in printed and f"root: {cityscapes}" in printed and "num_classes: 19" in printed
    line = _usage_line(capsys, ["train", "--dataset", "person_part", "--data", cityscapes, "--print-config"])
    assert "does not hold the person_part layout: looked for pascal_person_part_gt/" in line
    line = _usage_line(capsys, ["train", "--data", str(tmp_path), "--print-config"])
    assert "matches no dataset layout: it holds neither VOC2012/" in line and "leftImg8bit/" in line


@pytest.mark.parametrize("name,classes,extra", [
    ("cityscapes_resnet101_aspp_l", 19, {"msc_scales": None}),
    ("pascal_context_resnet101_aspp_l", 60, {"msc_scales": [1.0, 0.75, 0.5]}),
    ("person_part_resnet101_msc", 7, {"msc_scales": [1.0, 0.75, 0.5]}),
])
def test_dataset_configs(name, classes, extra):
    cfg = load_config(name)
    from deeplab_keras.data import dataset_info
    assert cfg.model.num_classes == classes == dataset_info(cfg.data.dataset).num_classes
    model = cfg.to_dict()["model"]
    assert all(model[k] == v for k, v in extra.items()) and cfg.optimizer.lr_power == 0.9


@pytest.mark.slow  # ~12 s: a tiny model evaluated and run by predict twice
def test_eval_and_predict_with_dataset(cityscapes, checkpoint, tmp_path, capsys):
    out = str(tmp_path / "eval.json")
    assert cli.main(["eval", "--checkpoint", checkpoint, "--data", cityscapes, "--dataset", "cityscapes", "--out", out,
                     "--quiet"]) == 0
    with open(out) as f:
        results = json.load(f)
    assert set(json.dumps(results).split('"')) >= {"road", "car", "bicycle"}
    image = os.path.join(cityscapes, "leftImg8bit", "val", "aachen", "aachen_000001_000019_leftImg8bit.png")
    masks = str(tmp_path / "masks")
    assert cli.main(["predict", image, "--checkpoint", checkpoint, "--out", masks, "--dataset", "cityscapes",
                     "--label-ids", "--quiet"]) == 0
    ids = np.asarray(Image.open(os.path.join(masks, "aachen_000001_000019_leftImg8bit.png")))
    assert ids.ndim == 2 and set(np.unique(ids)) <= set(C.CITYSCAPES_LABEL_IDS)
    coloured = str(tmp_path / "coloured")
    assert cli.main(["predict", image, "--checkpoint", checkpoint, "--out", coloured, "--dataset", "cityscapes",
                     "--quiet"]) == 0
    mask = Image.open(os.path.join(coloured, "aachen_000001_000019_leftImg8bit.png"))
    assert mask.mode == "P" and mask.getpalette()[:6] == [128, 64, 128, 244, 35, 232]
    train_ids = np.asarray(mask)
    np.testing.assert_array_equal(C.cityscapes_train_to_label_ids()[train_ids], ids)  # the same prediction
    with open(os.path.join(coloured, "areas.json")) as f:
        assert set(next(iter(json.load(f).values()))) <= set(C.CITYSCAPES_CLASSES)
    line = _usage_line(capsys, ["predict", image, "--checkpoint", checkpoint, "--out", masks, "--label-ids"])
    assert "--label-ids needs --dataset cityscapes" in line
    line = _usage_line(capsys, ["eval", "--checkpoint", checkpoint, "--data", cityscapes, "--dataset", "person_part"])
    assert "person_part layout" in line
