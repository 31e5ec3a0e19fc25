"""deeplab-predict: VOC palette PNGs, overlays, class areas, bad files reported and skipped, exit codes."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from deeplab_keras.inference import predict_probabilities
from deeplab_keras.predict import MAX_PIXELS, main, predict_files, read_image, ImageError, voc_palette
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(21, "resnet50")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.keras"
    model.save(path)
    return model, str(path)


def good_images(folder, voc_samples_dir):
    folder.mkdir(parents=True, exist_ok=True)
    jpgs = sorted((voc_samples_dir / "VOC2012" / "JPEGImages").glob("*.jpg"))[:2]
    for j in jpgs:
        img = Image.open(j).convert("RGB").resize((96, 72))
        img.save(folder / (j.stem + ".jpg"), quality=95)
    Image.fromarray(np.random.RandomState(1).randint(0, 255, (50, 61, 3), np.uint8)).save(folder / "noise.png")
    return sorted(p for p in folder.iterdir())


def test_palette_is_voc_own(voc_samples_dir):
    png = next((voc_samples_dir / "VOC2012" / "SegmentationClass").glob("*.png"))
    with Image.open(png) as label:
        assert label.mode == "P"
        np.testing.assert_array_equal(np.array(label.getpalette()[:768], np.uint8).reshape(256, 3), voc_palette())


def test_writes_masks_overlays_and_areas(tmp_path, checkpoint, voc_samples_dir):
    model, _ = checkpoint
    paths = good_images(tmp_path / "in", voc_samples_dir)
    summary = predict_files(model, [str(p) for p in paths], tmp_path / "out", overlay_images=True, progress=False)
    assert sorted(summary["written"]) == sorted(p.stem for p in paths) and not summary["failed"]
    for p in paths:
        image = read_image(p)
        with Image.open(tmp_path / "out" / (p.stem + ".png")) as mask:
            assert mask.mode == "P" and mask.size == (image.shape[1], image.shape[0])
            labels = np.asarray(mask)
        expected = predict_probabilities(model, image[None])[0].argmax(-1)
        np.testing.assert_array_equal(labels, expected)
        with Image.open(tmp_path / "out" / (p.stem + "_overlay.png")) as ov:
            assert ov.size == (2 * image.shape[1], image.shape[0])
        areas = json.loads((tmp_path / "out" / "areas.json").read_text())[p.stem]
        assert abs(sum(areas.values()) - 1.0) < 1e-4
        assert set(areas) <= {"background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                              "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
                              "sheep", "sofa", "train", "tvmonitor"}
    assert (tmp_path / "out" / "areas.csv").read_text().startswith("image,")


def test_batching_gives_the_same_masks(tmp_path, checkpoint, voc_samples_dir):
    model, _ = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (40, 48, 3), np.uint8)).save(folder / f"{i}.png")
    predict_files(model, sorted(map(str, folder.iterdir())), tmp_path / "a", batch_size=1, progress=False)
    predict_files(model, sorted(map(str, folder.iterdir())), tmp_path / "b", batch_size=3, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / f"{i}.png")),
                                      np.asarray(Image.open(tmp_path / "b" / f"{i}.png")))


def make_bad_files(folder, voc_samples_dir):
    folder.mkdir(parents=True, exist_ok=True)
    jpg = sorted((voc_samples_dir / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    data = jpg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    Image.new("RGB", (400, 400)).save(folder / "huge.png")
    return {"truncated.jpg": "readable", "empty.jpg": "empty", "notes.png": "readable", "huge.png": "over the limit"}


def test_read_image_rejects_bad_files(tmp_path, voc_samples_dir):
    bad = make_bad_files(tmp_path, voc_samples_dir)
    for name, reason in bad.items():
        with pytest.raises(ImageError, match=reason) as err:
            read_image(tmp_path / name, max_pixels=150_000)
        assert name in str(err.value)
    assert MAX_PIXELS >= 4096 * 4096


def test_cli_skips_bad_files_and_reports_them(tmp_path, checkpoint, voc_samples_dir, capsys):
    _, ckpt = checkpoint
    good = good_images(tmp_path / "in", voc_samples_dir)
    bad = make_bad_files(tmp_path / "in", voc_samples_dir)
    code = main([str(tmp_path / "in"), "--checkpoint", ckpt, "--out", str(tmp_path / "out"), "--max-pixels", "150000",
                 "--overlay"])
    assert code == 1
    err = capsys.readouterr()
    for name in bad:
        assert name in err.out + err.err
        assert not (tmp_path / "out" / (name.split(".")[0] + ".png")).exists()
    for p in good:
        assert (tmp_path / "out" / (p.stem + ".png")).exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]
    # all good inputs -> 0; outputs are not overwritten unless asked
    shutil.rmtree(tmp_path / "in")
    good = good_images(tmp_path / "in", voc_samples_dir)
    assert main([str(tmp_path / "in"), "--checkpoint", ckpt, "--out", str(tmp_path / "out2")]) == 0
    assert main([str(tmp_path / "in"), "--checkpoint", ckpt, "--out", str(tmp_path / "out2")]) == 1
    assert "--overwrite" in capsys.readouterr().out
    assert main([str(tmp_path / "in"), "--checkpoint", ckpt, "--out", str(tmp_path / "out2"), "--overwrite"]) == 0


@pytest.mark.parametrize("argv,match", [
    (["missing.jpg", "--checkpoint", "x.keras", "--out", "o"], "does not exist"),
    (["{img}", "--out", "o"], "--checkpoint"),
    (["{img}", "--checkpoint", "nope.keras", "--out", "o"], "nope.keras"),
    (["{img}", "--checkpoint", "{ckpt}", "--out", "o", "--batch-size", "0"], "batch-size"),
    (["{img}", "--checkpoint", "{ckpt}", "--out", "o", "--scales", "-1"], "scales"),
])
def test_cli_bad_arguments_exit_2(tmp_path, checkpoint, voc_samples_dir, capsys, argv, match):
    img = str(sorted((voc_samples_dir / "VOC2012" / "JPEGImages").glob("*.jpg"))[0])
    argv = [a.format(img=img, ckpt=checkpoint[1]) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
