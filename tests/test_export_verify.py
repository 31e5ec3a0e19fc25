"""Verification metrics, sample images and atomic publishing of the export stage (no conversions: fast)."""
import os

import numpy as np
import pytest

from deeplab_keras.export import common, staging, verify
from deeplab_keras.files import atomic_write_json


def test_sample_images(voc_samples_dir, tmp_path):
    a, b = verify.synthetic_images((33, 47), 3, seed=4), verify.synthetic_images((33, 47), 3, seed=4)
    assert a.dtype == np.uint8 and a.shape == (3, 33, 47, 3)
    np.testing.assert_array_equal(a, b)
    assert a.std() > 20  # structured content, not a constant
    voc = verify.sample_images((41, 57), str(voc_samples_dir / "VOC2012"), count=5)
    assert voc.shape == (5, 41, 57, 3) and voc.dtype == np.uint8
    from deeplab_keras.data.synthetic import write_synthetic_folder
    folder = write_synthetic_folder(tmp_path / "data", 2, (33, 33), 3)
    assert verify.load_images(str(folder), (17, 19)).shape == (2, 17, 19, 3)  # images/ of a folder dataset
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        verify.load_images(str(tmp_path), (8, 8))


def test_compare_and_tolerances():
    rng = np.random.RandomState(0)
    probs = rng.dirichlet(np.ones(4), size=(2, 10, 10)).astype(np.float32)
    reference = {"labels": probs.argmax(-1).astype(np.int32), "probabilities": probs}
    same = verify.compare(reference, {k: v.copy() for k, v in reference.items()})
    assert same["max_abs_diff"] == 0 and same["label_agreement"] == 1 and same["miou_vs_keras"] == 1
    assert verify.failures(same, verify.TOLERANCES["float32"]) == []

    noisy = {"probabilities": probs + 1e-3, "labels": reference["labels"].copy()}
    noisy["labels"][0, :5, :] = (noisy["labels"][0, :5, :] + 1) % 4  # 25 % of pixels changed
    metrics = verify.compare(reference, noisy)
    assert metrics["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert metrics["label_agreement"] == pytest.approx(0.75)
    assert 0 < metrics["miou_vs_keras"] < 0.75
    reasons = verify.failures(metrics, verify.TOLERANCES["float32"])
    assert len(reasons) == 2 and "max |diff|" in reasons[0] and "agreement" in reasons[1]
    assert verify.failures(metrics, verify.TOLERANCES["int8"]) == []  # int8: report only ...

    broken = {"probabilities": np.full_like(probs, np.nan), "labels": reference["labels"]}
    bad = verify.compare(reference, broken)
    assert not bad["finite"]
    assert "NaN" in verify.failures(bad, verify.TOLERANCES["int8"])[0]  # ... but NaN always fails

    with pytest.raises(verify.VerificationError, match="shape"):
        verify.compare(reference, {"probabilities": probs[:, :5], "labels": reference["labels"]})


def test_logits_outputs_compare_argmax():
    rng = np.random.RandomState(1)
    logits = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
    metrics = verify.compare({"logits": logits}, {"logits": logits + 2e-5})
    assert metrics["compared"] == "logits" and metrics["label_agreement"] == 1.0
    assert metrics["max_abs_diff"] == pytest.approx(2e-5, rel=1e-2)


def test_miou_against():
    ref = np.array([[0, 0, 1, 1]])
    assert verify.miou_against(ref, ref) == 1.0
    assert verify.miou_against(ref, np.array([[0, 1, 1, 1]])) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_publish_is_atomic_and_respects_overwrite(tmp_path):
    final = tmp_path / "m.onnx"
    stage = staging.staging_dir(str(final))
    (tmp_path / os.path.basename(stage) / "m.onnx").write_bytes(b"new")
    staging.publish(os.path.join(stage, "m.onnx"), str(final), overwrite=False)
    assert final.read_bytes() == b"new"
    staged = os.path.join(stage, "again")
    open(staged, "wb").write(b"newer")
    with pytest.raises(common.ExportError, match="--overwrite"):
        staging.publish(staged, str(final), overwrite=False)
    staging.publish(staged, str(final), overwrite=True)
    assert final.read_bytes() == b"newer"
    os.rmdir(stage)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no aside copies or temporaries left


def test_check_destination(tmp_path):
    staging.check_destination(str(tmp_path / "new" / "deep" / "m.tflite"), overwrite=False)  # parents created later
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(common.ExportError, match="already exists"):
        staging.check_destination(str(tmp_path / "m.tflite"), overwrite=False)
    staging.check_destination(str(tmp_path / "m.tflite"), overwrite=True)
    with pytest.raises(common.ExportError, match="not a directory"):
        staging.check_destination(str(tmp_path / "m.tflite" / "x.onnx"), overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["m.tflite"]  # the write probe left nothing behind


def test_report_json_is_written_atomically(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(str(path), {"a": np.float32(1.5), "b": np.int64(3), "c": np.arange(2)})
    assert path.read_text().strip().startswith("{") and '"a": 1.5' in path.read_text()
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
