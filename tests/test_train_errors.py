"""deeplab-train failure behaviour: bad values and data give one line and the right exit code, a run directory has
one writer and never contradicts its own model, files are written atomically with normal permissions, a full
disk loses nothing."""
import errno
import os
import stat

import pytest
import yaml

from deeplab_keras import cli
from deeplab_keras import train as T
from deeplab_keras.locks import exclusive_lock

def _sets(*items):
    return [token for item in items for token in ("--set", item)]


TINY = _sets("model.num_classes=3", "model.backbone=resnet50", "model.width_multiplier=0.125",
             "model.stage_blocks=[1,1,1,1]", "data.dataset=synthetic", "data.synthetic_images=4",
             "data.synthetic_size=41,41", "data.crop_size=33,33", "data.batch_size=2", "schedule.steps=4",
             "schedule.steps_per_epoch=2", "schedule.checkpoint_every=2", "schedule.validation_every=0",
             "runtime.tensorboard=false", "runtime.verbose=0", "optimizer.base_lr=0.01")


def _run(capsys, args):
    """deeplab-train in process: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        code = cli.train_main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("item", [
    "data.crop_size=97", "data.crop_size=a,b", "data.crop_size=20,20", "data.synthetic_size=0,0",
    "data.val_crop_size=513", "data.scale_range=1.5,0.5", "optimizer.momentum=[1,", "data.flip=3",
    "model.num_classes=300", "model.msc_scales=x", "model.stage_blocks=3", "model.aspp=6,x", "runtime.seed=-1",
    "schedule.validation_steps=0", "runtime.devices=7", "runtime.verbose=9"])
def test_bad_values_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, item):
    run, key = tmp_path / "run", item.split("=")[0]
    code, err = _run(capsys, TINY + ["--out", str(run), "--set", item])
    assert code == 2 and len(err) == 1 and key in err[0], err
    assert not run.exists()


def test_bad_yaml_config_file_and_debug_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("steps: [1,\n")
    code, err = _run(capsys, ["--config", str(config)])
    assert code == 2 and len(err) == 1 and str(config) in err[0] and "YAML" in err[0]
    with pytest.raises(ValueError, match="crop_size"):  # --debug: the exception itself, with its traceback
        cli.train_main(TINY + ["--out", str(tmp_path / "run"), "--set", "data.crop_size=97", "--debug"])


def test_locked_run_dir_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with exclusive_lock(run / ".lock"):  # as a running deeplab-train holds it
        code, err = _run(capsys, TINY + ["--out", str(run)])
    assert code == 1 and len(err) == 1, err
    assert str(run) in err[0] and f"process {os.getpid()}" in err[0]
    assert _files(run) == []  # nothing written (the lock file went with its holder)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (~15-35 s here): (run_dir, the umask)."""
    run = tmp_path_factory.mktemp("train_errors") / "run"
    code = cli.train_main(TINY + ["--out", str(run)])
    assert code == 0
    mask = os.umask(0)
    os.umask(mask)
    return run, mask


@pytest.mark.slow
def test_run_dir_files_have_normal_permissions_and_no_leftovers(finished):
    run, mask = finished
    files = _files(run)
    assert {"config.yaml", "model.keras", "summary.json", "history.png", "backup/state-2.weights.h5",
            "checkpoints/ckpt-4.keras"} <= set(files)
    assert not [f for f in files if os.path.basename(f).startswith(".")], files  # no temp files, no lock
    for name in ("config.yaml", "model.keras", "summary.json", "history.png", "backup/state-2.weights.h5",
                 "checkpoints/ckpt-4.keras"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o666 & ~mask, name


@pytest.mark.slow
@pytest.mark.parametrize("args,says", [(_sets("model.num_classes=5"), "model.num_classes=3 (this command: 5)"),
                                       (_sets("optimizer.train_bn=true"), "cannot restore the training state")])
def test_rerun_with_another_model_fails_before_writing(finished, capsys, args, says):
    run, _ = finished
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "model.keras", "summary.json")}
    code, err = _run(capsys, TINY + ["--out", str(run)] + args)
    assert code == 2 and len(err) == 1 and says in err[0] and str(run) in err[0], err
    for name, data in before.items():
        assert (run / name).read_bytes() == data, f"{name} was rewritten"


@pytest.mark.slow
def test_rerun_removes_temp_files_of_a_killed_run(finished, capsys):
    run, _ = finished
    (run / "backup" / ".tmp-abc-state-3.weights.h5").write_bytes(b"half")
    (run / "checkpoints" / ".tmp-xyz-ckpt-6.keras").write_bytes(b"half")
    code, _ = _run(capsys, TINY + ["--out", str(run)])  # finished: restores, trains nothing
    assert code == 0
    assert not [f for f in _files(run) if os.path.basename(f).startswith(".")]


@pytest.mark.slow
def test_label_out_of_range_in_folder_data_is_one_line(tmp_path, capsys):
    from deeplab_keras.data import write_synthetic_folder

    root = write_synthetic_folder(str(tmp_path / "shapes"), 4, size=(41, 41), num_classes=6)
    os.remove(os.path.join(root, "classes.txt"))
    code, err = _run(capsys, TINY + ["--out", str(tmp_path / "run"), "--data", root])  # --data: a folder dataset
    assert code == 1 and len(err) == 1, err
    assert "label values outside" in err[0] and os.path.join(root, "images") in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_full_disk_while_training_is_one_line_and_keeps_the_last_files(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    calls = []
    real_fsync = os.fsync

    def fsync(fd):  # the 3rd atomic write (config.yaml, ckpt-2, then the epoch-1 state) hits a full disk
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, err = _run(capsys, TINY + ["--out", str(run)])
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0], err
    assert _files(run) == ["checkpoints/ckpt-2.keras", "config.yaml", "history.csv"]  # nothing half written
    assert yaml.safe_load((run / "config.yaml").read_text())["schedule"]["steps"] == 4
    monkeypatch.setattr(os, "fsync", real_fsync)
    code, _ = _run(capsys, TINY + ["--out", str(run)])  # space again: the same command finishes the run
    assert code == 0 and (run / "model.keras").exists()
    assert T.ResumableBackup.resume_point(str(run / "backup"))[:2] == (2, 0)
