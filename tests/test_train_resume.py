"""Resume: an interrupted run continues from its last backup and ends with the same weights; the CLI; run-dir
artifacts (checkpoints, CSV history, PNG plot, TensorBoard, model.keras)."""
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import yaml

import deeplab_keras as dk
from deeplab_keras import cli
from deeplab_keras import train as T
from deeplab_keras.training.callbacks import _stop_on_sigint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {"model": dict(num_classes=3, backbone="resnet50", width_multiplier=0.125, stage_blocks=[1, 1, 1, 1]),
        "data": dict(dataset="synthetic", synthetic_images=10, synthetic_val_images=2, synthetic_size=[41, 41],
                     crop_size=[33, 33], batch_size=2),
        "schedule": dict(steps=8, steps_per_epoch=2, checkpoint_every=4, keep_checkpoints=2, validation_every=0),
        "optimizer": dict(base_lr=0.01, train_bn=True),
        "runtime": dict(tensorboard=False, plot=True, seed=11, verbose=0)}


def base_config(run_dir, *sets):
    """BASE in ``run_dir`` with ``sets`` ("section.key=value") applied."""
    return T.TrainConfig.from_dict(BASE).with_overrides([f"runtime.run_dir={run_dir}", *sets])


def base_yaml(path, *sets):
    """Writes BASE (with ``sets``) as a nested YAML config file for the CLI; returns its path."""
    path.write_text(base_config("unused", *sets).to_yaml())
    return path


class AtStep(keras.callbacks.Callback):
    """Calls ``action()`` after a given global step (mid-epoch)."""

    def __init__(self, step, steps_per_epoch, action):
        super().__init__()
        self.step, self.steps_per_epoch, self.action, self.epoch = step, steps_per_epoch, action, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch * self.steps_per_epoch + batch + 1 == self.step:
            self.action()


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt("interrupted")


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def _weights(model):
    return [np.asarray(v) for v in model.weights]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted BASE run."""
    return T.train(base_config(tmp_path_factory.mktemp("full") / "run"))


def test_interrupted_mid_epoch_resumes_to_the_same_weights(tmp_path, full_run):
    full = full_run
    cfg = base_config(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, callbacks=[AtStep(5, 2, _raise_keyboard_interrupt)])  # epoch 2 (0-based), its first batch
    backup = tmp_path / "cut" / "backup"
    assert sorted(os.listdir(backup)) == ["state-2.weights.h5"]  # epochs 0 and 1 complete
    resumed = T.train(cfg)
    assert resumed.resumed_from_epoch == 2
    assert len(resumed.history["loss"]) == 2  # epochs 2 and 3 only
    for a, b in zip(_weights(resumed.model), _weights(full.model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(backup)) == ["state-4.weights.h5"]  # only the last state is kept
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["ckpt-4.keras", "ckpt-8.keras"]
    again = T.train(cfg)  # a finished run: nothing to train, the final state is restored
    assert again.history == {} and again.resumed_from_epoch == 4
    for a, b in zip(_weights(again.model), _weights(full.model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_the_rerun_resumes_there_to_the_same_weights(tmp_path, full_run):
    cfg = base_config(tmp_path / "cut")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(T.TrainingInterrupted) as stop:
        T.train(cfg, callbacks=[AtStep(5, 2, _ctrl_c)])  # inside epoch 2 (0-based), after 1 batch
    assert signal.getsignal(signal.SIGINT) is handler
    backup = tmp_path / "cut" / "backup"
    assert stop.value.step == 5 and stop.value.state_path == str(backup / "state-2-1.weights.h5")
    assert sorted(os.listdir(backup)) == ["state-2-1.weights.h5"]  # epochs 0, 1 and one batch of epoch 2
    resumed = T.train(cfg)
    assert resumed.resumed_from_epoch == 2
    assert len(resumed.history["loss"]) == 2  # the rest of epoch 2, then epoch 3
    for a, b in zip(_weights(resumed.model), _weights(full_run.model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(backup)) == ["state-4.weights.h5"]
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["ckpt-4.keras", "ckpt-8.keras"]
    assert [int(r["epoch"]) for r in T.read_history(str(tmp_path / "cut" / "history.csv"))] == [0, 1, 2, 3]


def test_second_ctrl_c_stops_at_once():
    class Stopper:
        requested = False

    handler = signal.getsignal(signal.SIGINT)
    with _stop_on_sigint(Stopper):
        os.kill(os.getpid(), signal.SIGINT)  # the first one only asks to stop after the step
        assert Stopper.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is handler


def test_run_dir_artifacts(tmp_path):
    cfg = base_config(tmp_path / "run", "schedule.validation_every=1", "data.val_batch_size=2",
                      "data.val_crop_size=41,41", "runtime.tensorboard=true")
    result = T.train(cfg)
    run = tmp_path / "run"
    bn = result.model.get_layer("deeplab_network").get_layer("conv1_bn")
    assert bn.trainable and np.abs(np.asarray(bn.moving_mean)).max() > 0  # train_bn: statistics updated
    rows = T.read_history(str(run / "history.csv"))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert all({"loss", "miou", "val_loss", "val_miou"} <= set(r) for r in rows)
    with open(run / "history.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load(open(run / "config.yaml"))
    assert saved["runtime"]["seed"] == 11 and saved["data"]["val_crop_size"] == [41, 41]
    assert T.load_config(str(run / "config.yaml")) == cfg  # the nested config.yaml reads back as the same config
    model = dk.weights.load_model(str(run))  # the run dir resolves to model.keras
    x = np.random.default_rng(0).uniform(0, 255, (1, 41, 41, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), result.model(x).numpy(), rtol=1e-5, atol=1e-5)
    # TensorBoard event files when the tensorboard package is installed (a requirement)
    events = [f for _, _, files in os.walk(run / "logs") for f in files if "tfevents" in f]
    assert events, "no TensorBoard event files under logs/"


def _usage_error(capsys, args):
    """deeplab-train ``args`` must exit 2 with one line on stderr; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.train_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_overrides_and_errors(capsys):
    line = _usage_error(capsys, ["--config", "tiny_cpu", "--set", "schedule.stepz=3"])
    assert "schedule.stepz" in line and "steps_per_epoch" in line  # the valid keys are listed
    assert "--set schedule.steps=3" in _usage_error(capsys, ["--config", "tiny_cpu", "--steps", "3"])  # 0.1's flag
    assert "missing.yaml" in _usage_error(capsys, ["--config", "missing.yaml"])
    assert cli.train_main(["--config", "tiny_cpu", "--set", "schedule.steps=100", "--set", "data.crop_size=65,65",
                           "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["schedule"]["steps"] == 100 and printed["model"]["backbone"] == "resnet50"
    assert printed["data"]["crop_size"] == [65, 65]
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--help"])
    assert e.value.code == 0
    assert "steps_per_epoch" in capsys.readouterr().out


def _cli(config_path, run_dir):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, "-m", "deeplab_keras.cli", "train", "--config", str(config_path),
                             "--out", str(run_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _signal_when(config_path, run, path, sig, delay=0.0):
    """Starts deeplab-train on ``run`` and sends it ``sig`` ``delay`` s after ``path`` appears: (exit code, output)."""
    proc = _cli(config_path, run)
    deadline = time.time() + 600
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"
    time.sleep(delay)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


@pytest.mark.slow
def test_sigkill_mid_epoch_and_rerun_same_command_gives_same_weights(tmp_path):
    config_path = base_yaml(tmp_path / "tiny.yaml", "schedule.steps=12", "schedule.steps_per_epoch=4",
                            "schedule.checkpoint_every=4", "runtime.deterministic=true", "runtime.verbose=1",
                            "data.synthetic_size=49,49", "data.crop_size=41,41")

    full = _cli(config_path, tmp_path / "full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    assert "deeplab train: done" in out

    run = tmp_path / "killed"
    # 0.3 s after the first epoch's state: into the second epoch (4 steps of ~0.1-1 s each)
    code, out_killed = _signal_when(config_path, run, run / "backup" / "state-1.weights.h5", signal.SIGKILL, 0.3)
    assert code == -signal.SIGKILL, out_killed[-3000:]
    assert not (run / "model.keras").exists()
    backups = os.listdir(run / "backup")
    assert any(name.startswith("state-") for name in backups)

    again = _cli(config_path, run)
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out2[-3000:]
    assert "resuming" in out2 and "from epoch" in out2
    a = dk.weights.load_model(str(tmp_path / "full" / "model.keras"))
    b = dk.weights.load_model(str(run / "model.keras"))
    for x, y in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(x, y)
    rows = T.read_history(str(run / "history.csv"))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_ctrl_c_in_the_cli_is_one_line_and_the_rerun_resumes_from_that_step(tmp_path):
    config_path = base_yaml(tmp_path / "tiny.yaml", "schedule.steps=8", "schedule.steps_per_epoch=8",
                            "schedule.checkpoint_every=2", "schedule.keep_checkpoints=0", "runtime.verbose=2",
                            "runtime.plot=false")
    run = tmp_path / "run"
    code, out = _signal_when(config_path, run, run / "checkpoints" / "ckpt-2.keras", signal.SIGINT)
    assert code == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    found = re.fullmatch(r"deeplab train: interrupted at step (\d+) of 8; state saved to (\S+); rerun the same "
                         r"command to resume from step \1", last)
    assert found, out[-3000:]
    step, state = int(found.group(1)), found.group(2)
    assert 2 <= step <= 8 and os.path.exists(state)
    assert T.ResumableBackup.resume_point(str(run / "backup"))[2] == state
    assert not (run / "model.keras").exists() and not (run / ".lock").exists()

    again = _cli(config_path, run)
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out2[-3000:]
    if step < 8:
        assert f"(step {step} of 8)" in out2, out2[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == [f"ckpt-{s}.keras" for s in (2, 4, 6, 8)]
    assert (run / "model.keras").exists()
