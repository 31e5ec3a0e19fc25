"""deeplab-convert: .caffemodel / .pth -> .keras, what it prints, one-line errors with exit code 2 and nothing
written, and the README's path (convert, then deeplab-predict)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deeplab_keras.cli import convert_main as main
from tests import caffe_writer as cw
from tests.conftest import REPO, tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny ResNet caffemodel with MSC copies of two layers, a tiny VGG LargeFOV caffemodel, and their sources."""
    folder = tmp_path_factory.mktemp("convert")
    resnet = cw.randomize(tiny_model(3, "resnet50", stage_blocks=(1, 1, 1, 1)), seed=20)
    layers = cw.keras_to_caffe(resnet, bn_scale=4.0)
    copies = [cw.layer(name, "Convolution", [np.transpose(resnet.network.get_layer(keras).kernel, (3, 2, 0, 1))],
                       conv=dict(num_output=8, kernel=7, bias=False))
              for name, keras in [("conv1_res075", "conv1_conv"), ("conv1_res05", "conv1_conv")]]
    (folder / "r.caffemodel").write_bytes(cw.net(layers + copies))
    vgg = cw.randomize(tiny_model(3, "vgg16"), seed=21)
    (folder / "v.caffemodel").write_bytes(cw.net(cw.keras_to_caffe(vgg)))
    return folder, resnet, vgg


def _run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "--backbone-only" in out and "deeplab convert train2_iter_20000.caffemodel" in out


def test_converts_and_prints_what_was_loaded(files, capsys, tmp_path):
    from deeplab_keras.weights import load_model

    folder, resnet, _ = files
    out = tmp_path / "r.keras"
    code, text, err = _run(capsys, folder / "r.caffemodel", "--out", out, "--msc-scales", 1, 0.75, 0.5)
    assert code == 0, err
    assert "loaded 55 layers with weights" in text and "3 classes, aspp='L'" in text
    assert "ignored 2 MSC branch copies equal to their shared layers: conv1_res075, conv1_res05" in text
    assert "wrote " + str(out) in text
    model = load_model(out)
    assert model.msc_scales == (1.0, 0.75, 0.5) and model.stage_blocks == (1, 1, 1, 1)
    for a, b in zip(model.network.get_weights(), resnet.network.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["r.keras"]


def test_backbone_only_fresh_head(files, capsys, tmp_path):
    folder, _, vgg = files
    out = tmp_path / "v.keras"
    code, text, err = _run(capsys, folder / "v.caffemodel", "--out", out, "--backbone-only", "--num-classes", 7,
                           "--aspp", "L", "--backbone", "vgg16")
    assert code == 0, err
    assert "fresh head" in text and "ignored (not loaded): fc6, fc7, fc8_voc12" in text


@pytest.mark.parametrize("args,message", [
    (["{v}", "--out", "{o}", "--num-classes", "5"],
     "holds a 3-class head (fc6, fc7, fc8_voc12), not 5 classes: use --num-classes 3"),
    (["{v}", "--out", "{o}", "--backbone", "resnet101"], "holds a vgg16 backbone, not resnet101"),
    (["{cut}", "--out", "{o}"], "is truncated"),
    (["{missing}", "--out", "{o}"], "no such file"),
    (["{v}", "--out", "{t}/m.h5"], "must end with .keras"),
    (["{v}", "--out", "{t}/no/such/m.keras"], "output folder"),
    (["{v}", "--out", "{o}", "--aspp", "S"], "--aspp applies to --backbone-only"),
    (["{v}", "--out", "{o}", "--backbone-only"], "needs its class count"),
    (["{v}", "--out", "{o}", "--msc-scales", "0.5"], "include 1"),
    (["{v}", "--out", "{o}", "--num-classes", "0"], "must be a positive integer"),
])
def test_bad_input_one_line_exit_2_nothing_written(files, capsys, tmp_path, args, message):
    folder = files[0]
    data = (folder / "v.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[:len(data) * 2 // 3])
    names = dict(v=folder / "v.caffemodel", o=tmp_path / "m.keras", cut=tmp_path / "cut.caffemodel",
                 missing=tmp_path / "missing.caffemodel", t=tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, out, err = _run(capsys, *[a.format(**names) for a in args])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deeplab-convert: error: ") and message in lines[0], err
    assert sorted(os.listdir(tmp_path)) == before


def test_existing_output_needs_overwrite(files, capsys, tmp_path):
    folder = files[0]
    out = tmp_path / "m.keras"
    out.write_bytes(b"keep me")
    code, _, err = _run(capsys, folder / "v.caffemodel", "--out", out)
    assert code == 2 and "exists; pass --overwrite" in err and out.read_bytes() == b"keep me"
    code, _, err = _run(capsys, folder / "v.caffemodel", "--out", out, "--overwrite", "--quiet")
    assert code == 0 and out.read_bytes()[:2] == b"PK" and sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_pth_source(capsys, tmp_path):
    """A deeplab-pytorch .pth (tests/data/pth/kazuto_aspp.pth, written by torch.save) converts like a .caffemodel."""
    out = tmp_path / "p.keras"
    code, text, err = _run(capsys, REPO / "tests" / "data" / "pth" / "kazuto_aspp.pth", "--out", out,
                           "--num-classes", 3)
    assert code == 0, err
    assert "loaded 64 layers with weights from" in text and "kazuto_aspp.pth" in text and out.is_file()


@pytest.mark.slow
def test_console_script_then_deeplab_predict(files, tmp_path, voc_samples_dir):
    """The README's path: deeplab-convert writes a .keras that deeplab-predict takes."""
    exe = shutil.which("deeplab-convert")
    assert exe, "the deeplab-convert console script is not installed: run `pip install --no-build-isolation -e .`"
    folder = files[0]
    out = tmp_path / "model.keras"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([exe, str(folder / "v.caffemodel"), "--backbone", "vgg16", "--num-classes", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "pool5a=True" in proc.stdout and out.is_file()
    image = voc_samples_dir / "VOC2012" / "JPEGImages" / "2007_000033.jpg"
    proc = subprocess.run([sys.executable, "-m", "deeplab_keras", "predict", str(image), "--checkpoint", str(out),
                           "--out", str(tmp_path / "masks")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "masks" / "2007_000033.png").is_file()


def test_crafted_weight_files_exit_2_one_line(capsys, tmp_path):
    """Issue #22 S1 / S2: a caffemodel whose float run is cut short and a .pth tensor with a negative stride are
    the reader's one-line error naming the file, exit 2, nothing written."""
    from tests import pth_writer as pw

    (tmp_path / "s1.caffemodel").write_bytes(cw.bytes_field(100, cw.bytes_field(1, "c") + cw.bytes_field(2, "C")
                                                            + cw.bytes_field(7, b"\x2d\x00\x00")))
    (tmp_path / "s2.pth").write_bytes(pw.zip_pth({"w": pw.tensor("0", (3,), (-1,), 2)},
                                                 {"0": np.arange(3, dtype=np.float32)}))
    before = sorted(os.listdir(tmp_path))
    for name, message in (("s1.caffemodel", "is not a .caffemodel"), ("s2.pth", "negative size, stride or offset")):
        code, out, err = _run(capsys, tmp_path / name, "--out", tmp_path / "m.keras")
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, err
        assert str(tmp_path / name) in lines[0] and message in lines[0], err
    assert sorted(os.listdir(tmp_path)) == before
