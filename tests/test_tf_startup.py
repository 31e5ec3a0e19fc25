"""deeplab_keras.tf_startup: TensorFlow's start-up noise hidden (real errors shown), --debug shows it all."""
import os
import subprocess
import sys

import pytest

from deeplab_keras import tf_startup

TF_STARTUP_FILE = tf_startup.__file__

# A stand-in "tensorflow" package that prints TensorFlow's real start-up lines (as captured on a CPU-only machine)
# and one genuine error to file descriptor 2, the way the C++ library does.
FAKE_TF = r'''
import os
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796072127.374922    6768 port.cc:153] oneDNN custom operations are on.\n"
            b"I0000 00:00:1796072127.375298    6768 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
            b"GPU will not be used.\n"
            b"E0000 00:00:1796072127.5    6768 op_kernel.cc:12] a genuine error\n")
class config:
    @staticmethod
    def list_physical_devices(kind):
        os.write(2, b"E0000 00:00:1796072227.448247    7997 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
        return []
'''
QUIET = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("u", {TF_STARTUP_FILE!r}); u = importlib.util.module_from_spec(spec)
spec.loader.exec_module(u)
u.quiet_tensorflow(debug=sys.argv[1] == "debug")
print("after import", file=sys.stderr)
u.quiet_tensorflow(debug=sys.argv[2] == "debug")
"""
NOISE = ("InitializeLog", "oneDNN", "cuda drivers", "cuInit")


@pytest.mark.parametrize("first, second", [("quiet", "quiet"), ("debug", "quiet"), ("quiet", "debug")])
def test_quiet_tensorflow_hides_start_up_noise_only(tmp_path, first, second):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TF)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run([sys.executable, "-c", QUIET, first, second], capture_output=True, text=True, env=env,
                            check=True)
    lines = result.stderr.splitlines()
    assert sum("a genuine error" in line for line in lines) == 1  # real errors are never hidden
    noise = [line for line in lines if any(word in line for word in NOISE)]
    if first == second == "quiet":
        assert noise == [] and lines == [lines[0], "after import"]
    else:  # --debug shows the start-up lines, at import or replayed later
        assert len(noise) == 4
        assert (lines.index("after import") > lines.index(noise[0])) == (first == "debug")


@pytest.mark.slow
def test_package_import_and_first_op_print_nothing():
    code = ("import numpy as np, deeplab_keras as dk, tensorflow as tf; tf.constant([1.0]) * 2; "
            "dk.DeepLabV2(num_classes=2, backbone='vgg16')(np.zeros((1, 33, 33, 3), 'float32'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stderr == ""


@pytest.mark.slow
def test_every_command_starts_without_tensorflow_noise(tmp_path):
    """Each CLI imports TensorFlow and (eval, export) runs a model: no CUDA/oneDNN start-up lines on stderr."""
    from tests.conftest import tiny_model
    tiny_model(2, "vgg16").save(tmp_path / "tiny.keras")
    run = "import sys; from {module} import {main}; sys.exit({main}(sys.argv[1:]))"
    commands = {
        "train": ("deeplab_keras.cli", "train_main", ["--config", "tiny_cpu", "--print-config"]),
        "eval": ("deeplab_keras.cli", "eval_main", ["--checkpoint", str(tmp_path / "tiny.keras"), "--data",
                                                    "synthetic", "--num-images", "2", "--image-size", "33", "33",
                                                    "--quiet", "--out", str(tmp_path / "eval.json")]),
        "export": ("deeplab_keras.cli", "export_main", ["--checkpoint", str(tmp_path / "tiny.keras"), "--format",
                                                         "saved_model", "--out", str(tmp_path / "sm"), "--quiet",
                                                         "--num-samples", "1", "--verify-size", "33", "33"]),
        "demo": ("deeplab_keras.cli", "demo_main", ["--steps", "0"]),
    }
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    procs = {name: subprocess.Popen([sys.executable, "-c", run.format(module=module, main=main)] + args,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for name, (module, main, args) in commands.items()}
    results = {name: (p.wait(), p.stderr.read()) for name, p in procs.items()}
    for name, (code, stderr) in results.items():
        assert not [line for line in stderr.splitlines() if any(word in line for word in NOISE)], (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
    assert [results[name][0] for name in commands] == [0, 0, 0, 2], results
    assert (tmp_path / "eval.json").exists() and (tmp_path / "sm").is_dir()
