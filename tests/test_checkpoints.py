"""Checkpoint resolution and loading: damaged `.keras` files give one line naming the file; a run directory falls
back to its newest intact checkpoint and says so."""
import os
import shutil
import zipfile

import numpy as np
import pytest

from conftest import tiny_model
from deeplab_keras.weights import load_model, resolve_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with model.keras and two checkpoints of three different tiny models."""
    run = tmp_path_factory.mktemp("checkpoints") / "run"
    os.makedirs(run / "checkpoints")
    models = {}
    for seed, name in ((0, "model.keras"), (1, "checkpoints/ckpt-4.keras"), (2, "checkpoints/ckpt-8.keras")):
        model = tiny_model(num_classes=3)
        model.build((None, 33, 33, 3))
        rng = np.random.default_rng(seed)
        model.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])
        model.save(str(run / name))
        models[name] = model
    return run, models


def _damaged(path, kind):
    data = path.read_bytes()
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "random":
        return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if kind == "flipped":  # bytes of the weights changed inside an otherwise valid archive
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("model.weights.h5")
        start = info.header_offset + 30 + len(info.filename) + 200
        return data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:]
    raise ValueError(kind)


def _without_config(src, dst):
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            if name != "config.json":
                b.writestr(name, a.read(name))


@pytest.mark.parametrize("kind,expected", [("truncated", "not a readable Keras model archive"),
                                           ("random", "not a readable Keras model archive"),
                                           ("flipped", "fails its CRC check"),
                                           ("no_config", "has no config.json")])
def test_damaged_keras_file_is_one_line_naming_it(saved, tmp_path, kind, expected):
    run, _ = saved
    bad = tmp_path / f"{kind}.keras"
    if kind == "no_config":
        _without_config(run / "model.keras", bad)
    else:
        bad.write_bytes(_damaged(run / "model.keras", kind))
    for call in (resolve_checkpoint, load_model):
        with pytest.raises(ValueError) as err:
            call(str(bad))
        message = str(err.value)
        assert "\n" not in message and str(bad) in message and expected in message
        assert "File not found" not in message


def test_run_dir_falls_back_to_newest_intact_checkpoint(saved, tmp_path, capsys):
    run, models = saved
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert resolve_checkpoint(str(copy)) == str(copy / "model.keras")  # intact: the final model
    (copy / "model.keras").write_bytes(_damaged(run / "model.keras", "truncated"))
    (copy / "checkpoints" / "ckpt-8.keras").write_bytes(_damaged(run / "checkpoints" / "ckpt-8.keras", "random"))
    capsys.readouterr()
    model = load_model(str(copy))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.keras" in err[0] and "ckpt-8.keras" in err[0]
    assert err[0].endswith(str(copy / "checkpoints" / "ckpt-4.keras"))
    for a, b in zip(model.get_weights(), models["checkpoints/ckpt-4.keras"].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_run_dir_without_intact_model_is_one_line(saved, tmp_path):
    run, _ = saved
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for name in ("model.keras", "checkpoints/ckpt-4.keras", "checkpoints/ckpt-8.keras"):
        (copy / name).write_bytes(b"")
    with pytest.raises(ValueError) as err:
        load_model(str(copy))
    assert "\n" not in str(err.value) and str(copy) in str(err.value) and "no intact model" in str(err.value)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "missing.keras"))
