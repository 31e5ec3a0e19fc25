"""Presets against a local HTTP server on 127.0.0.1 (nothing leaves the machine): the first call downloads,
checks, converts and caches; later calls use the cache without a request; a wrong or changed hash is an error
that leaves no file behind; zip members; unknown names; deeplab-predict / deeplab-eval --preset.

The served files are real ``.caffemodel`` s written by ``tests/caffe_writer.py`` from a seeded tiny
``DeepLabV2(backbone="vgg16", aspp="largefov", width_multiplier=1/16)`` (``conftest.TINY["vgg16"]``: the VGG-16
LargeFOV layer names, pool5a included, every width divided by 16; a 0.3 MB file that converts back into that
model in about a second), so the file runs in a clone without ``../shared``."""
import hashlib
import http.server
import io
import json
import os
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

import deeplab_keras as dk
from conftest import TINY, tiny_model
from deeplab_keras import cli
from deeplab_keras.weights import download, presets
from tests import caffe_writer as cw

WIDTH = TINY["vgg16"]["width_multiplier"]
NUM_CLASSES = 3


def tiny_vgg_caffemodel(seed=0):
    """(bytes of a width/16 VGG-16 LargeFOV .caffemodel with pool5a, {Caffe layer: its blobs as written})."""
    source = cw.randomize(tiny_model(NUM_CLASSES, "vgg16"), seed=seed)
    assert source.config.aspp == "largefov" and source.config.width_multiplier == WIDTH
    blobs = {}
    data = cw.net(cw.keras_to_caffe(source, with_pool5a=True, record=blobs))
    return data, blobs


class _Files(http.server.BaseHTTPRequestHandler):
    files = {}      # path -> bytes (changed by tests)
    requests = []   # paths asked for
    lengths = {}    # path -> the Content-Length to announce (None: none, the body ends when the connection closes)

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        length = self.lengths.get(self.path, len(body))
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def caffemodel():
    return tiny_vgg_caffemodel()


@pytest.fixture(scope="module")
def server(caffemodel):
    data, _ = caffemodel
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("test.prototxt", "name: 'tiny'\n")
        z.writestr("tiny_iter_1.caffemodel", data)
    _Files.files = {"/released/tiny.caffemodel": data, "/released/prototxt_and_model.zip": archive.getvalue()}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def requests():
    _Files.requests.clear()
    return _Files.requests


def _preset(monkeypatch, server, name, path="/released/tiny.caffemodel", **kwargs):
    preset = presets.Preset(name, server + path, "a tiny test model", "vgg16", NUM_CLASSES,
                            model_kwargs={"aspp": "largefov", "width_multiplier": WIDTH}, **kwargs)
    monkeypatch.setitem(presets.PRESETS, name, preset)
    return preset


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_first_call_downloads_and_converts_later_calls_use_the_cache(monkeypatch, server, caffemodel, requests,
                                                                    tmp_path):
    data, blobs = caffemodel
    _preset(monkeypatch, server, "tiny_vgg", sha256=_sha(data))
    model = dk.DeepLabV2.from_preset("tiny_vgg", cache_dir=tmp_path)
    assert requests == ["/released/tiny.caffemodel"]
    folder = download.cache_folder(tmp_path)
    assert folder == str(tmp_path / "models" / "deeplab_keras")
    assert _files(folder) == ["released-tiny.caffemodel", "tiny_vgg.keras", "tiny_vgg.keras.json"]
    assert isinstance(model, dk.DeepLabV2)   # the preset's config, with the file's pool5a (LargeFOV: True) stated
    assert model.config == presets.PRESETS["tiny_vgg"].config.replace(pool5a=True)
    # the weights are the file's (Caffe OIHW -> Keras HWIO), checked against the arrays the writer put in it
    kernel = model.network.get_layer("block1_conv1").kernel.numpy()
    np.testing.assert_array_equal(kernel, blobs["conv1_1"][0].transpose(2, 3, 1, 0))
    meta = json.loads((tmp_path / "models" / "deeplab_keras" / "tiny_vgg.keras.json").read_text())
    assert meta["source_sha256"] == _sha(data) and meta["conversion"]["backbone"] == "vgg16"

    again = download.from_preset("tiny_vgg", cache_dir=tmp_path)
    assert requests == ["/released/tiny.caffemodel"]  # no second request: the cached .keras was loaded
    image = np.random.default_rng(0).uniform(0, 255, (1, 65, 65, 3)).astype("float32")
    np.testing.assert_array_equal(model.predict(image, verbose=0), again.predict(image, verbose=0))


def test_wrong_hash_is_an_error_and_leaves_no_file(monkeypatch, server, requests, tmp_path):
    _preset(monkeypatch, server, "tiny_bad", sha256="0" * 64)
    with pytest.raises(download.PresetHashError, match=r"tiny\.caffemodel has sha256 [0-9a-f]{64}, expected 0{64} "
                                                      r"\(from the registry\); the download was deleted"):
        download.from_preset("tiny_bad", cache_dir=tmp_path)
    assert requests == ["/released/tiny.caffemodel"]
    assert _files(download.cache_folder(tmp_path)) == []  # no download, no partial file, no .keras, no lock


def test_user_hash_overrides_and_is_checked(monkeypatch, server, caffemodel, tmp_path):
    data, _ = caffemodel
    _preset(monkeypatch, server, "tiny_user")
    with pytest.raises(download.PresetHashError, match=r"from --preset-sha256 / sha256="):
        download.preset_path("tiny_user", tmp_path, sha256="1" * 64)
    assert _files(download.cache_folder(tmp_path)) == []
    with pytest.raises(presets.PresetError, match="is not a sha256"):
        download.preset_path("tiny_user", tmp_path, sha256="abc")
    path = download.preset_path("tiny_user", tmp_path, sha256=_sha(data).upper())
    assert path.endswith("tiny_user.keras") and os.path.isfile(path)


def test_unknown_hash_is_pinned_on_first_download_and_enforced_after(monkeypatch, server, caffemodel, requests,
                                                                     tmp_path, capsys):
    data, _ = caffemodel
    _preset(monkeypatch, server, "tiny_zip", path="/released/prototxt_and_model.zip",
            member="tiny_iter_1.caffemodel")
    archive = _Files.files["/released/prototxt_and_model.zip"]
    path = download.preset_path("tiny_zip", tmp_path)
    folder = download.cache_folder(tmp_path)
    pins = json.loads(open(os.path.join(folder, download.PINS_FILE)).read())
    assert pins["released-prototxt_and_model.zip"]["sha256"] == _sha(archive)
    assert f"no published sha256; pinned {_sha(archive)}" in capsys.readouterr().err
    assert _files(folder) == ["pins.json", "released-prototxt_and_model.zip", "tiny_zip.keras",
                              "tiny_zip.keras.json"]  # the extracted member is gone
    assert dk.weights.load_model(path).num_classes == NUM_CLASSES
    # the server now serves another file under that URL: after the cache is cleared, the pin refuses it
    for name in ("released-prototxt_and_model.zip", "tiny_zip.keras", "tiny_zip.keras.json"):
        os.remove(os.path.join(folder, name))
    monkeypatch.setitem(_Files.files, "/released/prototxt_and_model.zip", archive + b"changed")
    with pytest.raises(download.PresetHashError, match=r"\(from the hash pinned in .*pins\.json\)"):
        download.preset_path("tiny_zip", tmp_path)
    assert _files(folder) == ["pins.json"]
    assert requests == ["/released/prototxt_and_model.zip"] * 2


def test_archive_without_the_member_names_what_it_holds(monkeypatch, server, tmp_path):
    _preset(monkeypatch, server, "tiny_member", path="/released/prototxt_and_model.zip",
            member="train_iter_20000.caffemodel")
    with pytest.raises(download.PresetFetchError, match=r"holds no member\(s\) named 'train_iter_20000.caffemodel'; "
                                                       r"its \.caffemodel members: \['tiny_iter_1.caffemodel'\]"):
        download.preset_path("tiny_member", tmp_path)
    assert not any(name.endswith(".keras") or name.startswith(".")
                   for name in _files(download.cache_folder(tmp_path)))


def test_failed_download_is_one_error_and_leaves_nothing(monkeypatch, server, tmp_path):
    _preset(monkeypatch, server, "tiny_missing", path="/released/missing.caffemodel")
    with pytest.raises(download.PresetFetchError, match=r"download of .*/released/missing.caffemodel failed .*404"):
        download.preset_path("tiny_missing", tmp_path)
    assert _files(download.cache_folder(tmp_path)) == []


def test_unknown_preset_lists_the_names(monkeypatch, server, tmp_path):
    _preset(monkeypatch, server, "tiny_listed")
    with pytest.raises(presets.PresetError, match=r"unknown preset 'nope'; known presets: .*"
                                                  r"deeplabv2_resnet101_msc_voc, .*tiny_listed"):
        dk.DeepLabV2.from_preset("nope", cache_dir=tmp_path)
    assert not os.path.exists(download.cache_folder(tmp_path))


def test_registry_entries_are_well_formed():
    voc = presets.get_preset("deeplabv2_resnet101_msc_voc")
    assert voc.url == "http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/prototxt_and_model.zip"
    assert voc.member == "train_iter_20000.caffemodel" and voc.msc_scales == (1.0, 0.75, 0.5)
    assert voc.num_classes == 21 and voc.backbone == "resnet101" and not voc.backbone_only
    assert presets.get_preset("deeplabv2_resnet101_coco_init").backbone_only
    for preset in presets.PRESETS.values():
        assert preset.sha256 is None  # no published hashes: pinned on first download (see the module docstring)
        assert preset.url.startswith(("http://", "https://")) and preset.filename
    with pytest.raises(presets.PresetError, match="exists"):
        presets.register_preset(voc)
    assert voc.config == dk.ModelConfig(21, "resnet101", msc_scales=(1.0, 0.75, 0.5))
    assert presets.get_preset("deeplab_largefov_vgg16_voc").config.aspp == "largefov"
    # the model description is checked when the preset is made, not after a download
    with pytest.raises(presets.PresetError, match=r"preset bad: model.aspp must be .*'largefov' is the VGG-16 head"):
        presets.Preset("bad", "https://example.org/x.caffemodel", "bad", "resnet101", 21,
                       model_kwargs={"aspp": "largefov"})
    with pytest.raises(presets.PresetError, match=r"preset bad: unknown model key\(s\) \['rates'\]"):
        presets.Preset("bad", "https://example.org/x.caffemodel", "bad", "resnet101", 21, model_kwargs={"rates": 6})


def test_deeplab_predict_and_eval_with_preset(monkeypatch, server, caffemodel, requests, tmp_path, capsys):
    data, _ = caffemodel
    _preset(monkeypatch, server, "tiny_cli", sha256=_sha(data))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (65, 81, 3)).astype(np.uint8)).save(image)
    assert cli.predict_main([str(image), "--preset", "tiny_cli", "--out", str(tmp_path / "masks")]) == 0
    mask = np.array(Image.open(tmp_path / "masks" / "photo.png"))
    assert mask.shape == (65, 81) and mask.max() < NUM_CLASSES
    assert os.path.isfile(tmp_path / "keras_home" / "models" / "deeplab_keras" / "tiny_cli.keras")
    assert requests == ["/released/tiny.caffemodel"]

    monkeypatch.chdir(tmp_path)
    assert cli.eval_main(["--preset", "tiny_cli", "--data", "synthetic", "--num-images", "1", "--image-size", "65",
                          "65", "--quiet"]) == 0
    results = json.loads((tmp_path / "eval_tiny_cli.json").read_text())
    assert results["preset"] == "tiny_cli" and results["images"] == 1
    assert requests == ["/released/tiny.caffemodel"]  # the cached model again

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--preset", "nope", "--data", "synthetic"])
    assert e.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.predict_main([str(image), "--preset", "nope", "--out", str(tmp_path / "m2")])
    assert e.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err


def test_eval_preset_hash_mismatch_is_a_runtime_error(monkeypatch, server, tmp_path, capsys):
    _preset(monkeypatch, server, "tiny_cli_bad")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    code = cli.eval_main(["--preset", "tiny_cli_bad", "--preset-sha256", "2" * 64, "--data", "synthetic",
                          "--quiet"])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deeplab-eval")]
    assert len(err) == 1 and "expected " + "2" * 64 in err[0] and "nothing was cached" in err[0]
    assert _files(download.cache_folder(tmp_path)) == []


# --- failing closed (issue 22: rows S5, S6, S7, W2, C2, K2) ---------------------------------------------------------

def _in_thread(call, seconds=30):
    """``call()`` in a daemon thread: (finished, its result or exception); a hang fails the test instead of CI."""
    out = []
    thread = threading.Thread(target=lambda: out.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    return (bool(out), out[0] if out else None)


def _outcome(call):
    try:
        return call()
    except BaseException as err:  # noqa: BLE001  (handed to the test thread)
        return err


def test_a_silent_server_times_out_and_the_lock_wait_is_announced_and_bounded(monkeypatch, tmp_path, capsys):
    """S5: a server that accepts and never answers; another process holding the cache lock."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # the kernel accepts the connection; nothing ever answers
    try:
        _preset(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}", "tiny_silent")
        monkeypatch.setenv(download.TIMEOUT_ENV, "0.5")
        done, err = _in_thread(lambda: download.preset_path("tiny_silent", tmp_path))
    finally:
        silent.close()
    assert done, "the download hung on a server that never answers"
    assert isinstance(err, download.PresetFetchError) and "no answer within 0.5 s" in str(err), err
    assert _files(download.cache_folder(tmp_path)) == []
    monkeypatch.setenv(download.TIMEOUT_ENV, "soon")
    with pytest.raises(presets.PresetError, match=r"\$DEEPLAB_DOWNLOAD_TIMEOUT='soon': give a positive number"):
        download.preset_path("tiny_silent", tmp_path)
    monkeypatch.delenv(download.TIMEOUT_ENV)

    folder = download.cache_folder(tmp_path)
    monkeypatch.setattr(download, "LOCK_TIMEOUT_S", 0.3)
    from deeplab_keras.locks import LockedError, exclusive_lock
    with exclusive_lock(os.path.join(folder, ".presets.lock")):  # another holder (a second flock conflicts)
        capsys.readouterr()
        done, err = _in_thread(lambda: download.preset_path("tiny_silent", tmp_path))
    assert done and isinstance(err, LockedError) and "gave up after 0.3 s" in str(err), err
    assert f"waiting up to 0.3 s for process {os.getpid()} to finish with the preset cache" in capsys.readouterr().err


def test_a_zip_member_over_the_cap_is_not_extracted(monkeypatch, server, tmp_path):
    """S6: the member's size is checked in the zip directory; nothing is extracted, pinned or kept."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.caffemodel", bytes(2 << 20))  # 2 MB of zeros: a 2 KB member
    monkeypatch.setitem(_Files.files, "/released/bomb.zip", archive.getvalue())
    monkeypatch.setattr(download, "MAX_MEMBER_BYTES", 1 << 20)
    _preset(monkeypatch, server, "tiny_bomb", path="/released/bomb.zip", member="big.caffemodel")
    with pytest.raises(download.PresetFetchError, match=r"member big.caffemodel of .*bomb.zip declares 2097152 bytes, "
                                                       r"over the cap of 1048576; not extracted"):
        download.preset_path("tiny_bomb", tmp_path)
    assert _files(download.cache_folder(tmp_path)) == []  # no extracted member, no pin, no unverified download


@pytest.mark.parametrize("pins", [b'{"released-tiny.caffemodel": {"sha2', b'{"released-tiny.caffemodel": '
                                  b'{"sha256": 1}}', b"[]", b"\xff\xfe"], ids=["cut", "entry", "list", "utf16"])
def test_a_malformed_pins_file_stops_and_is_kept(monkeypatch, server, requests, tmp_path, pins):
    """S7: a cut-short or malformed pins.json is never taken as 'no pins' (that would accept a tampered file)."""
    _preset(monkeypatch, server, "tiny_pins")
    folder = download.cache_folder(tmp_path)
    os.makedirs(folder)
    with open(os.path.join(folder, download.PINS_FILE), "wb") as f:
        f.write(pins)
    with pytest.raises(download.PresetCacheError, match=r"the pins file .*pins\.json (is not|has a malformed)"):
        download.preset_path("tiny_pins", tmp_path)
    assert requests == [] and _files(folder) == ["pins.json"]
    assert open(os.path.join(folder, download.PINS_FILE), "rb").read() == pins  # not rewritten


def test_a_truncated_first_download_is_not_pinned(monkeypatch, server, caffemodel, requests, tmp_path):
    """W2: a truncated download without Content-Length does not convert: deleted, not pinned; a short read of an
    announced length is an error; once the server is fixed, the good file converts and is pinned."""
    data, _ = caffemodel
    _preset(monkeypatch, server, "tiny_cut")
    folder = download.cache_folder(tmp_path)
    monkeypatch.setitem(_Files.files, "/released/tiny.caffemodel", data[: len(data) // 2])
    monkeypatch.setitem(_Files.lengths, "/released/tiny.caffemodel", None)
    with pytest.raises(ValueError, match="truncated|not a .caffemodel"):  # CaffeModelError
        download.preset_path("tiny_cut", tmp_path)
    assert _files(folder) == []
    monkeypatch.setitem(_Files.lengths, "/released/tiny.caffemodel", len(data))  # announces more than it sends
    with pytest.raises(download.PresetFetchError, match=rf"received {len(data) // 2} of the {len(data)} bytes"):
        download.preset_path("tiny_cut", tmp_path)
    assert _files(folder) == []
    monkeypatch.setitem(_Files.files, "/released/tiny.caffemodel", data)
    download.preset_path("tiny_cut", tmp_path)
    pins = json.loads(open(os.path.join(folder, download.PINS_FILE)).read())
    assert pins["released-tiny.caffemodel"]["sha256"] == _sha(data) and len(requests) == 3


def test_a_complete_read_only_cache_is_usable_and_a_corrupt_model_is_named(monkeypatch, server, caffemodel, requests,
                                                                           tmp_path, capsys):
    """C2: a complete cache is read without the lock (on a read-only folder the lock file cannot be made);
    K2: progress=False hides the download bar and lines; a corrupt cached .keras names the file to delete."""
    data, _ = caffemodel
    _preset(monkeypatch, server, "tiny_ro")
    download.preset_path("tiny_ro", tmp_path, progress=False)
    err = capsys.readouterr().err
    assert "pinned" in err and "downloading" not in err and "B/s" not in err and "converting" not in err
    folder = download.cache_folder(tmp_path)

    def read_only(*args, **kwargs):  # what exclusive_lock meets on a read-only folder (also for root)
        raise OSError(30, "Read-only file system", os.path.join(folder, ".presets.lock"))
    monkeypatch.setattr(download, "exclusive_lock", read_only)
    os.chmod(folder, 0o555)
    try:
        assert download.preset_path("tiny_ro", tmp_path) == os.path.join(folder, "tiny_ro.keras")
        assert requests == ["/released/tiny.caffemodel"]
        other = _preset(monkeypatch, server, "tiny_ro_other")  # not cached: needs the lock
        with pytest.raises(presets.PresetError, match=r"cannot write the preset cache .* \(Read-only file system\)"):
            download.preset_path(other, tmp_path)
    finally:
        os.chmod(folder, 0o755)
    with open(os.path.join(folder, "tiny_ro.keras"), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(download.PresetCacheError, match=r"the cached preset model .*tiny_ro\.keras does not load .*; "
                                                       r"delete it \(and tiny_ro\.keras\.json\)"):
        download.from_preset("tiny_ro", tmp_path)


def test_ctrl_c_during_a_download_says_so(monkeypatch, server, tmp_path, capsys):
    """K2: deeplab-predict interrupted while downloading a preset says what happened (not 'masks written')."""
    _preset(monkeypatch, server, "tiny_ctrl_c")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    folder = download.cache_folder(tmp_path)

    def interrupted(preset, dest, timeout, progress):
        with open(dest, "wb") as f:
            f.write(b"part")
        raise KeyboardInterrupt
    monkeypatch.setattr(download, "_fetch", interrupted, raising=False)
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert cli.predict_main([str(image), "--preset", "tiny_ctrl_c", "--out", str(tmp_path / "masks")]) == 130
    err = capsys.readouterr().err
    assert "interrupted while downloading preset tiny_ctrl_c; the partial download was deleted" in err
    assert "masks written" not in err and _files(folder) == []
