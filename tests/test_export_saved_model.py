"""SavedModel export: TF Serving layout, both signatures, a fresh process without deeplab_keras, saved_model_cli."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras.export import ExportError, saved_model, serving, staging
from deeplab_keras.export.verify import load_images
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    import keras
    keras.utils.set_random_seed(1)
    return tiny_model(3, "resnet50")


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory, voc_samples_dir):
    base = tmp_path_factory.mktemp("sm") / "deeplab"
    report = saved_model.export_saved_model(model, str(base), sample_dir=str(voc_samples_dir / "VOC2012"),
                                            num_samples=3, verify_size=(65, 81))
    return base, report


def test_layout_signatures_and_report(exported):
    base, report = exported
    version_dir = base / "1"
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    assert sorted(os.listdir(base)) == ["1", "1.report.json"]  # no temporary leftovers
    on_disk = json.loads((base / "1.report.json").read_text())
    assert on_disk["verification"]["passed"] is True
    for name in (saved_model.SIGNATURE_IMAGE, saved_model.SIGNATURE_BYTES):
        check = on_disk["verification"]["checks"][name]
        assert check["max_abs_diff"] <= 1e-4 and check["label_agreement"] >= 0.999 and check["finite"]
    assert on_disk["version"] == 1 and on_disk["tags"] == ["serve"] and on_disk["size_bytes"] > 0
    assert saved_model.non_stock_ops(str(version_dir)) == []
    assert "ResizeBilinear" in on_disk["ops"] and "DecodeImage" in on_disk["ops"]



def test_weights_stored_once(exported, model):
    """variables/ holds each weight once (ExportArchive.track would store the keras.Variable wrappers too: 2x);
    with batch norm folded, each folded layer's 4 vectors are one bias of its convolution."""
    base, report = exported
    variables = staging.path_size(str(base / "1" / "variables"))
    weight_bytes = sum(np.asarray(w).nbytes for w in model.weights)
    assert report["graph_rewrites"]["folded_batch_norms"] > 0
    assert 0.9 * weight_bytes <= variables <= 1.05 * weight_bytes, (variables, weight_bytes)
    stored = tf.train.load_checkpoint(str(base / "1" / "variables" / "variables")).get_variable_to_shape_map()
    folded = report["graph_rewrites"]["folded_batch_norms"]  # conv kernel + bias replaced, the BN's 4 gone
    fused = 2 * len(model.rates) - 2 if report["graph_rewrites"]["aspp_head"] == "fused" else 0  # one kernel + bias
    assert len([k for k in stored if k.endswith("VARIABLE_VALUE")]) == len(model.weights) - 4 * folded - fused

def test_matches_keras_prediction_at_new_sizes(exported, model):
    """Any H, W: odd sizes that are not 8k+1, and a batch of 2; labels/probabilities equal deeplab-predict's."""
    from deeplab_keras.inference import predict_probabilities

    base, _ = exported
    rng = np.random.RandomState(0)
    for shape in [(1, 50, 70, 3), (2, 97, 33, 3)]:
        images = rng.randint(0, 256, shape).astype(np.uint8)
        out = saved_model.run_saved_model(str(base / "1"), images)
        assert out["labels"].dtype == np.int32 and out["labels"].shape == shape[:3]
        assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == shape[:3] + (3,)
        expected = predict_probabilities(model, images)
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-4)
        assert np.mean(out["labels"] == expected.argmax(-1)) >= 0.999


def test_fresh_process_without_deeplab_keras(exported, model, tmp_path, voc_samples_dir):
    """The serving contract: a plain TensorFlow process (no deeplab_keras, no custom op) loads and runs it."""
    base, _ = exported
    images = load_images(str(voc_samples_dir / "VOC2012"), (61, 77), count=2)
    jpeg = sorted((voc_samples_dir / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({str(base / "1")!r}, tags=["serve"])
        images = np.load("images.npy")
        out = loaded.signatures["serving_default"](image=tf.constant(images))
        png = [tf.io.encode_png(im).numpy() for im in images]
        out_png = loaded.signatures["serving_bytes"](image_bytes=tf.constant(png))
        jpeg = open({str(jpeg)!r}, "rb").read()
        out_jpeg = loaded.signatures["serving_bytes"](image_bytes=tf.constant([jpeg]))
        np.savez("out.npz", labels=out["labels"].numpy(), probabilities=out["probabilities"].numpy(),
                 png_labels=out_png["labels"].numpy(), jpeg_shape=np.array(out_jpeg["labels"].shape),
                 jpeg_decoded=tf.io.decode_jpeg(jpeg).shape.as_list())
        assert not [m for m in sys.modules if m.startswith("deeplab_keras")], "deeplab_keras was imported"
        print("FRESH-OK", sorted(loaded.signatures))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FRESH-OK ['serving_bytes', 'serving_default']" in proc.stdout
    out = np.load(tmp_path / "out.npz")
    reference = serving.reference_outputs(model, images)
    np.testing.assert_allclose(out["probabilities"], reference["probabilities"], atol=1e-4)
    assert np.mean(out["labels"] == reference["labels"]) >= 0.999
    np.testing.assert_array_equal(out["png_labels"], out["labels"])  # PNG is lossless: same pixels, same labels
    h, w = out["jpeg_decoded"][:2]
    assert tuple(out["jpeg_shape"]) == (1, h, w)


def test_saved_model_cli_lists_signatures(exported):
    base, _ = exported
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    proc = subprocess.run(cli + ["show", "--dir", str(base / "1"), "--all"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "signature_def['serving_default']" in text and "signature_def['serving_bytes']" in text
    for needle in ("inputs['image'] tensor_info", "dtype: DT_UINT8", "shape: (-1, -1, -1, 3)",
                   "inputs['image_bytes'] tensor_info", "dtype: DT_STRING", "outputs['labels']",
                   "outputs['probabilities']", "dtype: DT_INT32"):
        assert needle in text, needle


@pytest.mark.slow
def test_versions_overwrite_and_atomicity(exported, model):
    base, _ = exported
    with pytest.raises(ExportError, match="already exists"):
        saved_model.export_saved_model(model, str(base), version=1)
    assert saved_model.next_version(str(base)) == 2
    before = (base / "1" / "saved_model.pb").stat().st_mtime_ns
    report = saved_model.export_saved_model(model, str(base), version=1, overwrite=True, num_samples=1,
                                            verify_size=(33, 41))
    assert report["verification"]["passed"]
    assert (base / "1" / "saved_model.pb").stat().st_mtime_ns != before
    assert sorted(os.listdir(base)) == ["1", "1.report.json"]
