"""Inference precision: the CPU check (refused with one line where the CPU lacks native bfloat16), the bfloat16 copy
of a model, and bf16 through predict_probabilities / evaluate / the CLIs. Speed and the agreement on trained models
are measured by benchmarks/precision.py, not here."""
import json

import numpy as np
import pytest
from PIL import Image

from deeplab_keras import precision as P
from deeplab_keras.cli import eval_main, predict_main
from deeplab_keras.evaluate import evaluate
from deeplab_keras.inference import predict_probabilities
from tests.conftest import saved_tiny_model

needs_bf16 = pytest.mark.skipif(not P.bf16_supported(), reason="this CPU has no avx512_bf16 / AMX")
NO_BF16 = frozenset({"fpu", "avx2", "avx512f"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory, 3, "precision")


def test_cpu_flags_and_the_check(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t: fpu amx_tile\n")
    flags = P.cpu_flags(str(info))
    assert {"avx512_bf16", "amx_tile", "fpu"} <= flags and "processor" not in flags
    assert P.cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert P.bf16_supported(flags) and P.bf16_supported({"amx_bf16"}) and not P.bf16_supported(NO_BF16)
    assert P.check_precision(None) == P.check_precision("float32", NO_BF16) == "float32"
    assert P.check_precision("bf16", {"avx512_bf16"}) == "bf16"
    with pytest.raises(ValueError, match=r"bf16 needs a CPU with avx512_bf16 or amx_bf16 .*use float32"):
        P.check_precision("bf16", NO_BF16)
    with pytest.raises(ValueError, match="'fp16' is not one of float32, bf16"):
        P.check_precision("fp16")


@needs_bf16
def test_bf16_copy_and_probabilities(checkpoint):
    model = checkpoint[0]
    assert P.with_precision(model, "float32") is model
    copy = P.with_precision(model, "bf16")
    assert {w.dtype for w in copy.weights} == {"bfloat16"}
    assert all(w.dtype == "float32" for w in model.weights)  # the original is untouched
    for a, b in zip(model.get_weights(), copy.get_weights()):  # the same weights, rounded to bfloat16's 8 bits
        np.testing.assert_allclose(np.asarray(b, np.float32), a, rtol=2 ** -8, atol=1e-30)
    images = np.random.RandomState(0).randint(0, 256, (2, 65, 81, 3)).astype(np.float32)
    fp32 = predict_probabilities(model, images)
    bf16 = predict_probabilities(model, images, precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    np.testing.assert_allclose(bf16.sum(-1), 1.0, atol=1e-5)
    diff = np.abs(bf16 - fp32).max()
    assert 0 < diff < 0.05, diff  # bfloat16 arithmetic: different, and close
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.97


@needs_bf16
def test_evaluate_and_predict_cli_in_bf16(tmp_path, checkpoint):
    model, path = checkpoint
    rng = np.random.RandomState(1)
    data = [{"image": rng.randint(0, 256, (65, 65, 3)).astype(np.uint8),
             "label": rng.randint(0, 3, (65, 65)).astype(np.uint8)}]
    result = evaluate(model, data, progress=False, precision="bf16")
    assert result["precision"] == "bf16" and result["no_crf"]["pixels"] == 65 * 65
    assert evaluate(model, data, progress=False)["precision"] == "float32"
    Image.fromarray(data[0]["image"]).save(tmp_path / "a.png")
    assert predict_main([str(tmp_path / "a.png"), "--checkpoint", path, "--out", str(tmp_path / "o"),
                         "--precision", "bf16", "--quiet"]) == 0
    mask = np.asarray(Image.open(tmp_path / "o" / "a.png"))
    want = predict_probabilities(model, data[0]["image"], precision="bf16")[0].argmax(-1)
    assert (mask == want).mean() > 0.999
    assert set(json.loads((tmp_path / "o" / "areas.json").read_text())) == {"a"}


def test_bf16_refused_with_one_line(tmp_path, checkpoint, capsys, monkeypatch):
    """On a CPU without native bfloat16 (its flags faked here), and with a SavedModel, --precision bf16 exits 2."""
    model, path = checkpoint
    monkeypatch.setattr(P, "cpu_flags", lambda path=P.CPUINFO: NO_BF16)
    with pytest.raises(ValueError, match="avx512_bf16"):
        predict_probabilities(model, np.zeros((33, 33, 3)), precision="bf16")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "sm").mkdir()
    runs = [(predict_main, [str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--checkpoint", path],
             "--precision bf16: bf16 needs a CPU with avx512_bf16"),
            (eval_main, ["--data", "synthetic", "--checkpoint", path], "--precision bf16: bf16 needs a CPU"),
            (predict_main, [str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--saved-model",
                            str(tmp_path / "sm")], "--precision bf16 needs --checkpoint or --preset")]
    for main, argv, match in runs:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--precision", "bf16"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
