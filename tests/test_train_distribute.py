"""tf.distribute: MirroredStrategy on 2 logical CPUs and MultiWorkerMirroredStrategy with 2 local worker
processes give the same weights as one device with the same global batch.

Each run is a subprocess (logical devices and TF_CONFIG must be set before TensorFlow starts); this file is
also the worker script: ``python tests/test_train_distribute.py RUN_DIR OUT.npz STRATEGY [VIRTUAL_CPUS]``.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFIG = {"model": dict(num_classes=3, backbone="resnet50", width_multiplier=0.125, stage_blocks=[1, 1, 1, 1]),
          "data": dict(dataset="synthetic", synthetic_images=12, synthetic_size=[41, 41], crop_size=[33, 33],
                       batch_size=4),
          "schedule": dict(steps=3, steps_per_epoch=3, checkpoint_every=0, validation_every=0),
          "optimizer": dict(base_lr=0.01),
          "runtime": dict(tensorboard=False, plot=False, verbose=0, seed=5, deterministic=True)}


def _worker(run_dir, out, strategy, virtual_cpus=0, reference_out=None):
    from deeplab_keras.train import TrainConfig, train

    if reference_out:  # the single-device run, in the same process (one device: the default strategy)
        ref = train(TrainConfig.from_dict(CONFIG).with_overrides(
            [f"runtime.run_dir={run_dir}-single", f"runtime.virtual_cpus={virtual_cpus}"]))
        np.savez(reference_out, *[np.asarray(v) for v in ref.model.trainable_variables],
                 loss=np.asarray(ref.history["loss"]))
        assert ref.num_replicas == 1
    import keras

    start = {}

    class Initial(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            start["w"] = [np.asarray(v).copy() for v in self.model.trainable_variables]

    cfg = TrainConfig.from_dict(CONFIG).with_overrides(
        [f"runtime.run_dir={run_dir}", f"runtime.strategy={strategy}", f"runtime.virtual_cpus={virtual_cpus}"])
    result = train(cfg, callbacks=[Initial()])
    moved = max(float(np.abs(np.asarray(v) - w).max()) for v, w in zip(result.model.trainable_variables, start["w"]))
    replicas = result.num_replicas
    np.savez(out, *[np.asarray(v) for v in result.model.trainable_variables],
             loss=np.asarray(result.history["loss"]))
    print(json.dumps({"loss": result.history["loss"], "replicas": replicas, "moved": moved}))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _run(args, env, timeout=400):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__)] + [str(a) for a in args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=400):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"worker timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


def _load(path):
    data = np.load(path)
    return [data[f"arr_{i}"] for i in range(len(data.files) - 1)], data["loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process: the single-device run, then MirroredStrategy over 2 logical CPUs."""
    d = tmp_path_factory.mktemp("mirrored")
    out = _finish(_run([d / "run", d / "mirrored.npz", "mirrored", 2, d / "single.npz"], _env()))
    return _load(d / "single.npz"), _load(d / "mirrored.npz"), out


def _assert_same(weights, reference):
    ref_w, ref_loss = reference
    w, loss = weights
    assert len(w) == len(ref_w)
    for a, b in zip(w, ref_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)


@pytest.mark.slow
def test_mirrored_two_cpus_equals_single_device(runs):
    reference, mirrored, out = runs
    report = json.loads(out.strip().splitlines()[-1])
    assert report["replicas"] == 2 and report["moved"] > 1e-3, out[-2000:]  # the steps changed the weights
    _assert_same(mirrored, reference)


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_two_processes_equals_single_device(tmp_path, runs):
    reference = runs[0]
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(_run([tmp_path / "run", tmp_path / f"w{i}.npz", "multi_worker"], _env(TF_CONFIG=tf_config)))
    outs = [_finish(p) for p in procs]
    assert all('"replicas": 2' in o for o in outs), outs[0][-2000:]
    for i in range(2):
        _assert_same(_load(tmp_path / f"w{i}.npz"), reference)
    # only the chief writes the run's artifacts
    assert os.path.exists(tmp_path / "run" / "model.keras")


if __name__ == "__main__":
    _worker(*sys.argv[1:])
