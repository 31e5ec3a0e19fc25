"""deeplab-predict: VOC palette PNGs, overlays, class areas, bad files reported and skipped, exit codes."""
import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from deeplab_keras.inference import predict_probabilities
from deeplab_keras.data import BadDataError
from deeplab_keras.cli import predict_main as main
from deeplab_keras.predict import MAX_PIXELS, predict_files, read_image, voc_palette
from tests.conftest import saved_tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory, 21, "ckpt")


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
    return {"truncated.jpg": "cannot decode", "empty.jpg": "empty", "notes.png": "cannot decode",
            "huge.png": "over the limit"}


def test_read_image_rejects_bad_files(tmp_path, voc_samples_dir):
    bad = make_bad_files(tmp_path, voc_samples_dir)
    for name, reason in bad.items():
        with pytest.raises(BadDataError, match=reason) as err:
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
    assert "--overwrite" in capsys.readouterr().err
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


def noise_image(path, seed, size=(40, 48)):
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, size + (3,), np.uint8)).save(path)
    return str(path)


def image_folder(folder, count):
    """``folder`` with noise images 0.png .. <count-1>.png."""
    folder.mkdir()
    for i in range(count):
        noise_image(folder / f"{i}.png", i)
    return folder


def test_areas_of_earlier_runs_are_kept(tmp_path, checkpoint):
    model, _ = checkpoint
    a, b = noise_image(tmp_path / "a.png", 0), noise_image(tmp_path / "b.png", 1)
    out = tmp_path / "o"
    first = predict_files(model, [a], out, progress=False)["areas"]
    predict_files(model, [b], out, progress=False)
    areas = json.loads((out / "areas.json").read_text())
    assert list(areas) == ["a", "b"] and areas["a"] == first["a"]
    rows = (out / "areas.csv").read_text().splitlines()
    assert rows[0].startswith("image,") and [r.split(",")[0] for r in rows[1:]] == ["a", "b"]
    # predicting a again (same file name) replaces its row only
    noise_image(tmp_path / "a.png", 2)
    again = predict_files(model, [a], out, overwrite=True, progress=False)["areas"]
    areas = json.loads((out / "areas.json").read_text())
    assert list(areas) == ["a", "b"] and areas["a"] == again["a"]


def test_concurrent_predictions_into_one_folder_lose_no_areas(tmp_path, checkpoint, monkeypatch):
    import threading

    from deeplab_keras import predict
    model, _ = checkpoint
    paths = [noise_image(tmp_path / f"{i}.png", i) for i in range(4)]
    read_areas = predict.read_areas

    def slow_read_areas(out_dir):  # widens the read-modify-write window: without the lock, one run's rows vanish
        areas = read_areas(out_dir)
        time.sleep(0.3)
        return areas
    monkeypatch.setattr(predict, "read_areas", slow_read_areas)
    errors = []

    def run(part):
        try:
            predict_files(model, part, tmp_path / "o", progress=False)
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=run, args=(paths[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(json.loads((tmp_path / "o" / "areas.json").read_text())) == ["0", "1", "2", "3"]
    assert len((tmp_path / "o" / "areas.csv").read_text().splitlines()) == 5
    assert not (tmp_path / "o" / ".areas.lock").exists()


@pytest.mark.parametrize("names,overlay", [(["x.jpg", "x.png"], False), (["x.png", "x_overlay.png"], True)])
def test_colliding_output_names_are_refused_up_front(tmp_path, checkpoint, capsys, names, overlay):
    model, ckpt = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(names):
        noise_image(folder / name, i)
    argv = [str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "o")] + (["--overlay"] if overlay else [])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert all(str(folder / n) in err[0] for n in names) and "would both write" in err[0]
    assert not (tmp_path / "o").exists()
    from deeplab_keras.predict import OutputNameError
    with pytest.raises(OutputNameError):
        predict_files(model, sorted(str(p) for p in folder.iterdir()), tmp_path / "o", overlay_images=overlay,
                      progress=False)
    assert not (tmp_path / "o").exists()
    if overlay:  # without overlays the same inputs are fine
        predict_files(model, sorted(str(p) for p in folder.iterdir()), tmp_path / "o", progress=False)
        assert sorted(json.loads((tmp_path / "o" / "areas.json").read_text())) == ["x", "x_overlay"]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, checkpoint):
    model, _ = checkpoint
    gray16 = (np.random.RandomState(0).randint(0, 65536, (40, 48))).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    image = read_image(tmp_path / "g16.png")
    expected = np.round(gray16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, -1))
    assert image.min() < 10 and image.max() > 245  # not all white
    predict_files(model, [str(tmp_path / "g16.png")], tmp_path / "o", progress=False)
    labels = np.asarray(Image.open(tmp_path / "o" / "g16.png"))
    np.testing.assert_array_equal(labels, predict_probabilities(model, image[None])[0].argmax(-1))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_images_are_refused_by_name(tmp_path, mode):
    Image.fromarray(np.full((8, 8), 1000, "int32" if mode == "I" else "float32"), mode).save(tmp_path / "x.tif")
    with pytest.raises(BadDataError, match=f"x.tif: image mode '{mode}'"):
        read_image(tmp_path / "x.tif")


def test_broken_symlinks_in_a_folder_are_skipped_by_name(tmp_path, checkpoint, capsys):
    _, ckpt = checkpoint
    folder = tmp_path / "in"
    folder.mkdir()
    noise_image(folder / "a.png", 0)
    noise_image(folder / "c.png", 1)
    (folder / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    assert main([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'b.jpg'}: dangling symbolic link" in err and f"{folder / 'loop.png'}: symbolic link loop" in err
    assert "Traceback" not in err
    assert sorted(json.loads((tmp_path / "o" / "areas.json").read_text())) == ["a", "c"]


@pytest.mark.parametrize("extra,match", [
    (["--max-pixels", "-1"], "--max-pixels must be >= 1"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1"),
    (["--out", "{file}"], "is an existing file"),
])
def test_bad_out_and_max_pixels_exit_2_with_one_line(tmp_path, checkpoint, capsys, extra, match):
    image = noise_image(tmp_path / "a.png", 0)
    (tmp_path / "file").write_text("keep")
    argv = [image, "--checkpoint", checkpoint[1], "--out", str(tmp_path / "o")] + extra
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(file=tmp_path / "file") for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and match in err[0] and len(err) == 1
    assert (tmp_path / "file").read_text() == "keep" and not (tmp_path / "o").exists()


def test_full_disk_stops_with_one_line_and_nothing_half_written(tmp_path, checkpoint, capsys, monkeypatch):
    import errno
    import os
    _, ckpt = checkpoint
    folder = image_folder(tmp_path / "in", 3)
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the disk fills up at the second file: the second mask
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    assert main([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "1.png" in err[0] and "no space left" in err[0].lower()
    out = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert out == ["0.png", "areas.csv", "areas.json"]  # no temp files, no half-written mask
    assert list(json.loads((tmp_path / "o" / "areas.json").read_text())) == ["0"]
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    assert main([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--quiet", "--overwrite"]) == 1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == out
    assert list(json.loads((tmp_path / "o" / "areas.json").read_text())) == ["0"]


def test_quiet_and_debug(tmp_path, checkpoint, capsys):
    _, ckpt = checkpoint
    image = noise_image(tmp_path / "a.png", 0)
    assert main([image, "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    argv = [image, str(tmp_path / "bad.png"), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--overwrite",
            "--stop-on-error"]
    assert main(argv + ["--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deeplab-predict: error: ") and "bad.png" in err[0]
    with pytest.raises(BadDataError, match="bad.png"):
        main(argv + ["--debug"])


def test_unloadable_models_are_one_line(tmp_path, capsys):
    import tensorflow as tf
    image = noise_image(tmp_path / "a.png", 0)
    (tmp_path / "random.keras").write_bytes(np.random.RandomState(0).bytes(1000))
    module = tf.Module()
    module.f = tf.function(lambda x: x, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"other": module.f})
    for source, match in [(["--checkpoint", str(tmp_path / "random.keras")], "random.keras"),
                          (["--saved-model", str(tmp_path / "sm")], "no 'serving_default' signature")]:
        with pytest.raises(SystemExit) as exit_info:
            main([image, "--out", str(tmp_path / "o")] + source)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and match in err[0] and len(err) == 1, err
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_stderr_is_clean_in_a_real_process(tmp_path, checkpoint):
    """No TensorFlow start-up noise (CUDA drivers, cuInit, oneDNN) from importing TF and running the model."""
    import subprocess
    import sys
    image = noise_image(tmp_path / "a.png", 0)
    quiet = subprocess.run([sys.executable, "-m", "deeplab_keras", "predict", image, "--checkpoint", checkpoint[1],
                            "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert (tmp_path / "o" / "a.png").exists()


def test_ctrl_c_keeps_written_masks_and_their_areas(tmp_path, checkpoint, capsys, monkeypatch):
    from deeplab_keras import predict
    _, ckpt = checkpoint
    folder = image_folder(tmp_path / "in", 3)
    encode, calls = predict.label_png_bytes, []

    def interrupted_at_second(labels):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(labels)
    monkeypatch.setattr(predict, "label_png_bytes", interrupted_at_second)
    assert main([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "o"), "--quiet"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0.png", "areas.csv", "areas.json"]
    assert list(json.loads((tmp_path / "o" / "areas.json").read_text())) == ["0"]


def test_crf_options_reach_the_crf(tmp_path, checkpoint, voc_samples_dir):
    """--crf --crf-iterations / --crf-params give the masks of dense_crf with those CRFParams (not the defaults)."""
    from deeplab_keras import crf

    model, ckpt = checkpoint
    image_path = good_images(tmp_path / "in", voc_samples_dir)[0]
    image = read_image(str(image_path))
    probs = predict_probabilities(model, image[None])
    # Either option alone turns the CRF into the identity (no iterations; no pairwise terms), so each gives the
    # plain prediction, which the default 10-iteration CRF smooths.
    settings = {"default": ([], crf.CRFParams()),
                "no iterations": (["--crf-iterations", "0"], crf.CRFParams(iterations=0)),
                "no pairwise": (["--crf-params", "bilateral_weight=0", "gaussian_weight=0"],
                                crf.CRFParams(bilateral_weight=0.0, gaussian_weight=0.0))}
    masks = {}
    for name, (flags, params) in settings.items():
        out = tmp_path / name.replace(" ", "_")
        assert main([str(image_path), "--checkpoint", ckpt, "--out", str(out), "--quiet", "--crf"] + flags) == 0
        masks[name] = np.array(Image.open(out / (image_path.stem + ".png")))
        expected = np.asarray(crf.dense_crf(probs, image[None], params))[0].argmax(-1)
        np.testing.assert_array_equal(masks[name], expected)
    plain = probs[0].argmax(-1)
    np.testing.assert_array_equal(masks["no iterations"], plain)
    np.testing.assert_array_equal(masks["no pairwise"], plain)
    assert (masks["default"] != plain).mean() > 0.01  # the settings are told apart
