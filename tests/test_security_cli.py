"""Outputs checked before the work, and the small command-line rows of issue 22 (K1, K2): an unwritable, full or
dangling-link ``--out`` of convert / eval / predict / train is one line and exit 2 before any model is loaded (a
permission error and a full disk say different things); ``deeplab-train`` without ``--out`` does not invent
``./runs/deeplab``; ``--preset-sha256`` without ``--preset`` is a usage error.

A read-only folder is simulated for root too: the probe of :func:`deeplab_keras.files.check_writable` fails
as the kernel would (EACCES / ENOSPC) for paths under the folder, which is also ``chmod 555``."""
import errno
import os
import tempfile

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model
from deeplab_keras import cli, files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_model(backbone="vgg16").save(path)
    return str(path)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(path)
    return str(path)


@pytest.fixture
def failing_folder(tmp_path, monkeypatch):
    """make(name, errno) -> a folder where creating anything fails with that errno (chmod 555 and, for root,
    the probe refused)."""
    real = tempfile.mkdtemp
    failing = {}

    def mkdtemp(*args, dir=None, **kwargs):
        for folder, code in failing.items():
            if dir is not None and os.path.abspath(dir).startswith(folder):
                raise OSError(code, os.strerror(code), dir)
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(files.tempfile, "mkdtemp", mkdtemp)

    def make(name, code=errno.EACCES):
        folder = tmp_path / name
        folder.mkdir()
        failing[str(folder)] = code
        os.chmod(folder, 0o555)
        return folder
    yield make
    for folder in failing:
        os.chmod(folder, 0o755)


def _usage(capsys, call):
    """The one stderr line of a call that must exit 2; stdout must be empty (no work was done)."""
    with pytest.raises(SystemExit) as e:
        call()
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("deeplab-")]
    assert e.value.code == 2 and out == "" and len(lines) == 1, (e.value.code, out, err)
    return lines[0]


def test_unwritable_out_is_refused_before_the_work(failing_folder, checkpoint, image, tmp_path, capsys,
                                                   monkeypatch):
    """K1: convert / eval / predict / train; permission and full disk are told apart."""
    import deeplab_keras.weights
    monkeypatch.setattr(deeplab_keras.weights, "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    locked, full = failing_folder("locked"), failing_folder("full", errno.ENOSPC)
    line = _usage(capsys, lambda: cli.predict_main([image, "--checkpoint", checkpoint, "--out", str(locked / "m")]))
    assert f"cannot write --out {locked / 'm'}: {locked} is not writable (Permission denied)" in line
    line = _usage(capsys, lambda: cli.predict_main([image, "--checkpoint", checkpoint, "--out", str(full)]))
    assert f"no space left on device in {full}; free some space" in line and "Permission" not in line
    line = _usage(capsys, lambda: cli.eval_main(["--checkpoint", checkpoint, "--data", "synthetic", "--num-images",
                                                 "1", "--image-size", "65", "65", "--out", str(locked / "e.json")]))
    assert f"cannot write --out {locked / 'e.json'}: {locked} is not writable" in line
    src = tmp_path / "weights.caffemodel"
    src.write_bytes(b"not read before --out is checked")
    line = _usage(capsys, lambda: cli.convert_main([str(src), "--out", str(full / "m.keras")]))
    assert f"cannot write --out {full / 'm.keras'}: no space left on device in {full}" in line
    line = _usage(capsys, lambda: cli.train_main(["--data", "synthetic", "--out", str(locked / "run")]))
    assert f"cannot write --out {locked / 'run'}: {locked} is not writable" in line
    assert sorted(os.listdir(locked)) == sorted(os.listdir(full)) == []


def test_dangling_link_out_is_a_usage_error(checkpoint, image, tmp_path, capsys):
    """K2: a --out that is a symbolic link to nothing: exit 2, naming it."""
    link = tmp_path / "masks"
    link.symlink_to(tmp_path / "gone")
    line = _usage(capsys, lambda: cli.predict_main([image, "--checkpoint", checkpoint, "--out", str(link)]))
    assert f"--out {link}: {link} is a dangling symbolic link" in line
    line = _usage(capsys, lambda: cli.eval_main(["--checkpoint", checkpoint, "--data", "synthetic", "--num-images",
                                                 "1", "--image-size", "65", "65", "--out", str(link)]))
    assert "dangling symbolic link" in line and not (tmp_path / "gone").exists()


def test_train_without_out_says_where_or_refuses(failing_folder, tmp_path, monkeypatch, capsys):
    """K2: no arguments creates nothing (a run directory is required); a config's run_dir is said on stderr."""
    monkeypatch.chdir(tmp_path)
    line = _usage(capsys, lambda: cli.train_main([]))
    assert "give --out DIR, the run directory" in line and os.listdir(tmp_path) == []
    locked = failing_folder("locked")
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--config", "tiny_cpu", "--data", "synthetic", "--set", f"runtime.run_dir={locked}/run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"no --out: the run directory is {locked}/run (the config's runtime.run_dir)" in err
    assert f"cannot write runtime.run_dir {locked}/run" in err


def test_preset_sha256_needs_preset(checkpoint, capsys):
    """K2: --preset-sha256 beside --checkpoint was silently ignored."""
    line = _usage(capsys, lambda: cli.eval_main(["--checkpoint", checkpoint, "--preset-sha256", "0" * 64, "--data",
                                                 "synthetic", "--num-images", "1", "--image-size", "65", "65"]))
    assert "--preset-sha256 applies only to --preset" in line


def test_write_error_text_tells_a_full_disk_from_a_permission_error():
    assert files.write_error_text(OSError(errno.EDQUOT, "Disk quota exceeded"), "/d") == (
        "no space left on device in /d; free some space or choose another path")
    assert files.write_error_text(OSError(errno.EROFS, "Read-only file system"), "/d") == (
        "/d is not writable (Read-only file system); choose another path or change its permissions")


def test_predict_write_error_mid_run_tells_permission_from_full_disk(tmp_path, monkeypatch):
    """K1: a permission error partway through deeplab-predict said "free some space"."""
    from deeplab_keras import predict

    labels, image = np.zeros((2, 2), np.int64), np.zeros((2, 2, 3), np.uint8)
    for code, words in ((errno.EACCES, "is not writable (Permission denied)"), (errno.ENOSPC, "no space left")):
        def fail(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(predict, "atomic_write_bytes", fail)
        with pytest.raises(RuntimeError) as e:
            predict._write_outputs(str(tmp_path), "a", image, labels, False, False)
        assert str(e.value).startswith(f"cannot write {tmp_path / 'a.png'}: ") and words in str(e.value)
        assert ("free some space" in str(e.value)) == (code == errno.ENOSPC)


def test_export_backbone_with_preset_sha256_is_a_usage_error(tmp_path, capsys):
    """K2: --preset-sha256 beside --backbone (a fresh model, nothing downloaded) was silently accepted."""
    line = _usage(capsys, lambda: cli.export_main(["--backbone", "vgg16", "--preset-sha256", "0" * 64, "--format",
                                                   "onnx", "--out", str(tmp_path / "m.onnx")]))
    assert "--preset-sha256 applies only to --preset" in line and os.listdir(tmp_path) == []


def test_from_preset_passes_timeout_and_progress(monkeypatch):
    """DeepLabV2.from_preset forwards timeout= / progress= to the preset download."""
    from deeplab_keras.models import deeplab
    from deeplab_keras.weights import download

    calls = []
    monkeypatch.setattr(download, "from_preset", lambda *a, **k: calls.append((a, k)) or "model")
    assert deeplab.DeepLabV2.from_preset("p", "/c", sha256="ab", timeout=5.0, progress=False) == "model"
    assert calls == [(("p", "/c"), dict(sha256="ab", timeout=5.0, progress=False))]


def test_readme_pins_the_first_download_that_converts():
    """The README's preset "Hashes" paragraph: a download is pinned once it converted (weights/download.py)."""
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8") as f:
        hashes = f.read().split("**Hashes.**", 1)[1].split("\n\n", 1)[0]
    assert "The first download of a file is *pinned*" not in hashes and "converts successfully" in hashes
