"""The demo application (deeplab_keras.apps.demo): packaged sample data (found with importlib.resources from any
working directory, in a built package too), the VOC CRF study on it or on another folder, and run() end to end
(global dtype policy kept)."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deeplab_keras.apps import demo
from deeplab_keras.data import sample_data_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
PAIRS = ["2007_000032", "2007_000033", "2007_000063", "2008_000009", "2009_000006", "2010_000002", "2011_000003"]


def _listing(root):
    voc = pathlib.Path(root) / "VOC2012"
    lists = {s: (voc / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val",
                                                                                                  "trainval")}
    return sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg")), \
        sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png")), lists


def test_sample_data_dir_holds_the_packaged_voc_pairs():
    root = pathlib.Path(sample_data_dir())
    assert root == REPO / "deeplab_keras" / "data" / "samples"
    jpegs, pngs, lists = _listing(root)
    assert jpegs == pngs == sorted(lists["trainval"]) == PAIRS
    assert sorted(lists["train"] + lists["val"]) == PAIRS
    for name in PAIRS:  # the original formats: JPEG image, palette PNG of class indices of the same size
        with Image.open(root / "VOC2012" / "JPEGImages" / f"{name}.jpg") as image, \
                Image.open(root / "VOC2012" / "SegmentationClass" / f"{name}.png") as label:
            assert image.format == "JPEG" and label.format == "PNG" and label.mode == "P"
            assert image.size == label.size
            assert set(np.unique(np.asarray(label))) <= set(range(21)) | {255}
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 1_100_000, f"the packaged samples grew to {size} bytes"


def test_sample_data_dir_from_a_built_package_and_another_cwd(tmp_path):
    """setup.py's package_data carries the samples (a build_py copy, as a wheel holds it), and the folder is found
    from the package, not the working directory."""
    build, elsewhere = tmp_path / "build", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=REPO, check=True,
                   capture_output=True)
    code = "import json; from deeplab_keras.data import sample_data_dir; print(json.dumps(sample_data_dir()))"
    env = dict(os.environ, PYTHONPATH=str(build), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True).stdout
    root = json.loads(out.strip().splitlines()[-1])
    assert pathlib.Path(root) == build / "deeplab_keras" / "data" / "samples"
    jpegs, pngs, lists = _listing(root)
    assert jpegs == pngs == sorted(lists["trainval"]) == PAIRS


def test_voc_crf_study_on_the_packaged_data_and_on_another_folder(tmp_path):
    result = demo.voc_crf_study(sample_data_dir(), tmp_path / "packaged")
    assert result["images"] == len(PAIRS) and 0.5 < result["no_crf"] <= 1 and 0.5 < result["crf"] <= 1
    assert result["crf"] > result["no_crf"]  # on the 7 packaged pairs the CRF improves the coarse maps
    assert sorted(os.listdir(tmp_path / "packaged")) == [f"voc_{n}_coarse_vs_crf.png" for n in PAIRS[:3]]

    other = tmp_path / "other" / "VOC2012"  # --data elsewhere: one pair, and a stray file that is not a label
    for sub, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
        (other / sub).mkdir(parents=True)
        shutil.copy(pathlib.Path(sample_data_dir()) / "VOC2012" / sub / (PAIRS[1] + ext), other / sub)
    (other / "SegmentationClass" / "notes.txt").write_text("not a label")
    single = demo.voc_crf_study(other.parent, tmp_path / "other_out")
    assert single["images"] == 1 and 0.5 < single["no_crf"] <= 1
    assert os.listdir(tmp_path / "other_out") == [f"voc_{PAIRS[1]}_coarse_vs_crf.png"]


def test_data_without_voc2012_is_refused_before_anything_is_written(tmp_path):
    message = re.escape(f"data folder {tmp_path} holds no VOC2012/SegmentationClass/")
    with pytest.raises(FileNotFoundError, match=message):
        demo.run(tmp_path / "report", steps=1, data=tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no VOC2012/"):
        demo.voc_crf_study(tmp_path, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
def test_run_end_to_end_on_the_packaged_data_keeps_the_dtype_policy(tmp_path):
    """The whole demo (1 training step) under a non-default global policy: it runs, uses the packaged samples by
    default, and leaves the policy as it found it."""
    import keras

    before = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        report = demo.run(tmp_path / "report", steps=1, log=lambda line: None)
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy(before)
    assert report["voc_samples_crf"]["data"] == sample_data_dir() and report["voc_samples_crf"]["images"] == len(PAIRS)
    assert report["train"]["steps"] == 1 and report["predict"]["failed"] == 0
    assert all(r["verification"]["passed"] for r in report["export"].values()), report["export"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["voc_samples_crf"]["images"] == len(PAIRS)
