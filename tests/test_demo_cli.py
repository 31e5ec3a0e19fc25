"""deeplab-demo refuses bad arguments with one line and exit 2, before anything is written."""
import pytest

from deeplab_keras.cli import demo_main


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--out", "{file}"], "is a file; give a folder"),
    (["--data", "{tmp}", "--out", "{tmp}/report"], "holds no VOC2012/SegmentationClass/ folder"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("x")
    args = [a.format(file=tmp_path / "a_file", tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as info:
        demo_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "report").exists()
