"""The model core (deeplab_keras.models / .layers / .backbones) under KERAS_BACKEND=jax with TensorFlow blocked:
build from a ModelConfig, call (same logits as the TensorFlow backend for the same weights), the trainer's
``multi_scale_logits``, one ``fit`` step, single-scale and MSC;
and the GPU benchmark's tiny configuration on the JAX CPU backend."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import REPO, tiny_model

JAX_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, os, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, NoTensorFlow())
    import keras
    import numpy as np

    import deeplab_keras as dk
    from deeplab_keras.layers.preprocessing import resize_aligned

    assert keras.backend.backend() == "jax", keras.backend.backend()
    out_dir, images = sys.argv[1], np.load(os.path.join(sys.argv[1], "images.npy"))
    result = {}
    for name in ("single", "msc"):
        config = json.load(open(os.path.join(out_dir, name + ".json")))
        model = dk.ModelConfig.from_dict(config).build()
        model.load_weights(os.path.join(out_dir, name + ".weights.h5"))
        np.save(os.path.join(out_dir, name + "_jax.npy"), np.asarray(model(images)))
        scales = model.multi_scale_logits(images, training=True)  # what the trainer calls for MSC
        per_scale = np.stack([np.asarray(v) for k, v in scales.items() if k != "fused"])
        result[name + "_scales"] = sorted(scales)
        result[name + "_fused_is_max"] = bool(np.allclose(np.asarray(scales["fused"]), per_scale.max(0)))
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                      loss=lambda y, p: keras.losses.sparse_categorical_crossentropy(
                          y, resize_aligned(p, keras.ops.shape(y)[1:3]), from_logits=True))
        labels = np.random.default_rng(0).integers(0, config["num_classes"], images.shape[:3])
        before = [np.array(w) for w in model.trainable_weights]
        history = model.fit(images, labels, batch_size=len(images), epochs=1, verbose=0)
        changed = sum(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.trainable_weights))
        result[name] = {"loss": history.history["loss"][0], "changed": changed, "trainable": len(before)}
    result["tensorflow_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
    json.dump(result, open(os.path.join(out_dir, "result.json"), "w"))
""")


def _jax_env():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.slow
def test_model_core_runs_on_jax_without_tensorflow(tmp_path):
    """Same weights -> same logits on both backends; one fit step trains every trainable weight; no TF import."""
    images = np.random.default_rng(1).uniform(0, 255, (2, 65, 81, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    reference = {}
    for name, msc in (("single", None), ("msc", (1.0, 0.75, 0.5))):
        model = tiny_model(3, "resnet50", msc_scales=msc)
        model.save_weights(str(tmp_path / f"{name}.weights.h5"))
        (tmp_path / f"{name}.json").write_text(json.dumps({k: v for k, v in model.get_config().items()
                                                           if k not in ("name", "trainable")}))
        reference[name] = np.asarray(model(images))
    script = tmp_path / "core_on_jax.py"
    script.write_text(JAX_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=_jax_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tensorflow_modules"] == []
    for name in ("single", "msc"):
        logits = np.load(tmp_path / f"{name}_jax.npy")
        assert logits.shape == reference[name].shape == (2, 9, 11, 3)
        scale = np.abs(reference[name]).max()
        np.testing.assert_allclose(logits, reference[name], atol=1e-4 * max(scale, 1.0), rtol=0)
        assert np.isfinite(result[name]["loss"]) and result[name]["loss"] > 0
        assert result[name]["changed"] == result[name]["trainable"] > 0
        assert result[name + "_fused_is_max"]
    assert result["single_scales"] == ["fused", "scale_1.0"]
    assert result["msc_scales"] == ["fused", "scale_0.5", "scale_0.75", "scale_1.0"]


@pytest.mark.slow
def test_gpu_benchmark_tiny_on_jax_cpu(tmp_path):
    """benchmarks/gpu_jax.py --tiny (MSC on, which runs the single-scale network too): every precision x (train,
    infer) row, finite rates, no TensorFlow."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_jax.py"), "--tiny", "--msc", "on",
                           "--json", str(out)],
                          env=_jax_env(), capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tensorflow_modules"] == []
    assert result["device"].startswith("cpu")
    seen = {(r["kind"], r["precision"], r["msc"]) for r in result["rows"]}
    assert seen == {(k, p, True) for k in ("train", "infer") for p in ("float32", "mixed_bfloat16", "mixed_float16")}
    for row in result["rows"]:
        for key in ("median_s", "images_per_s", "tflop", "tflop_per_s", "x_matmul", "peak_memory_mb"):
            assert np.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["logits_finite"] and np.isfinite(row["loss_first"]) and np.isfinite(row["loss_last"])
        assert row["x_peak"] is None  # a CPU has no entry in the chip table
    assert "train" in proc.stdout and "x peak" in proc.stdout
