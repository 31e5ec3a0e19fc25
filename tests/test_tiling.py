"""Tiled inference: stitching, the covering tile equal to the whole image, MSC + CRF on tiles, the CLI options."""
import json

import keras
import numpy as np
import pytest
from PIL import Image

from deeplab_keras.cli import eval_main, predict_main
from deeplab_keras.evaluate import confusion_matrix, evaluate
from deeplab_keras.inference import Predictor, check_tiling, predict_probabilities, tile_starts, tiled_probabilities
from tests.conftest import tiny_model


def _images(n=1, size=(97, 130), seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n,) + size + (3,)).astype(np.float32)


@pytest.fixture(scope="module")
def pointwise():
    """A model whose logits at a pixel depend on that pixel only (full-resolution 1x1 conv): any tiling of it must
    give the whole-image probabilities, so the blending weights are checked exactly."""
    inputs = keras.Input((None, None, 3))
    logits = keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.RandomNormal(0, 0.05, seed=1),
                                 bias_initializer="ones")(inputs)
    return keras.Model(inputs, logits)


@pytest.fixture(scope="module")
def msc_checkpoint(tmp_path_factory):
    model = tiny_model(3, "resnet50", msc_scales=(1.0, 0.75))
    path = tmp_path_factory.mktemp("tiling") / "msc.keras"
    model.save(path)
    return model, str(path)


@pytest.mark.parametrize("tile,overlap", [((40, 50), 0.25), ((33, 33), 0.5), ((97, 64), 0.0), (60, 0.9)])
def test_tiles_blend_back_to_the_whole_image(pointwise, tile, overlap):
    images = _images(2)
    whole = predict_probabilities(pointwise, images)
    tiled = predict_probabilities(pointwise, images, tile_size=tile, tile_overlap=overlap)
    np.testing.assert_allclose(tiled, whole, atol=2e-6)


def test_tiles_cover_every_pixel_with_at_least_the_overlap():
    for length, tile, overlap in [(100, 40, 0.25), (2048, 513, 0.5), (1024, 513, 0.0), (513, 513, 0.3), (34, 33, 0)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(0 < b - a <= tile * (1 - overlap) for a, b in zip(starts, starts[1:])), (length, tile, starts)


def test_a_covering_tile_is_exactly_the_whole_image(msc_checkpoint):
    model = msc_checkpoint[0]
    images = _images(1, (70, 90))
    whole = predict_probabilities(model, images, flip=True)
    covering = predict_probabilities(model, images, flip=True, tile_size=(70, 500))
    np.testing.assert_allclose(covering, whole, rtol=0, atol=1e-7)
    tiled = predict_probabilities(model, images, tile_size=(49, 57), tile_overlap=0.4)
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(tiled.sum(-1), 1.0, atol=1e-5)
    assert np.abs(tiled - predict_probabilities(model, images)).max() > 1e-4  # the tiles do see less context


def test_evaluate_with_tiles_msc_and_the_crf(msc_checkpoint):
    model = msc_checkpoint[0]
    rng = np.random.RandomState(3)
    data = [{"image": rng.randint(0, 256, (65, 90, 3)).astype(np.uint8),
             "label": rng.randint(0, 3, (65, 90)).astype(np.uint8)}]
    covering = evaluate(model, data, crf=False, progress=False, tile_size=128)
    want = predict_probabilities(model, data[0]["image"])[0].argmax(-1)
    assert covering["no_crf"]["confusion_matrix"] == confusion_matrix(data[0]["label"], want, 3).tolist()
    tiled = evaluate(model, data, crf=True, progress=False, tile_size=(49, 65), tile_overlap=0.5)
    assert tiled["tile_size"] == [49, 65] and tiled["tile_overlap"] == 0.5
    assert tiled["crf"]["pixels"] == tiled["no_crf"]["pixels"] == 65 * 90


def test_predict_cli_tiles(tmp_path, msc_checkpoint):
    image = np.random.RandomState(4).randint(0, 256, (65, 90, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    code = predict_main([str(tmp_path / "big.png"), "--checkpoint", msc_checkpoint[1], "--out", str(tmp_path / "o"),
                         "--tile", "49x65", "--tile-overlap", "0.5", "--crf", "--quiet"])
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "o" / "big.png"))
    assert mask.shape == (65, 90)
    probs = tiled_probabilities(Predictor(msc_checkpoint[0]), image[None].astype(np.float32), (49, 65), 0.5)
    from deeplab_keras import crf
    want = np.asarray(crf.dense_crf(probs, image[None])).argmax(-1)[0]
    assert (mask == want).mean() > 0.999
    assert set(json.loads((tmp_path / "o" / "areas.json").read_text())) == {"big"}


@pytest.mark.parametrize("extra,match", [
    (["--tile", "10"], "tile_size"), (["--tile", "65x"], "--tile '65x'"), (["--tile", "abc"], "--tile 'abc'"),
    (["--tile", "65", "--tile-overlap", "1"], "tile_overlap"), (["--tile-overlap", "0.5"], "applies only to --tile"),
])
def test_bad_tile_options_exit_2_with_one_line(tmp_path, msc_checkpoint, capsys, extra, match):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "x.png")
    for main, argv in ((predict_main, [str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]),
                       (eval_main, ["--data", "synthetic"])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--checkpoint", msc_checkpoint[1]] + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_check_tiling_names_the_argument():
    assert check_tiling(None, None) == (None, 0.25)
    assert check_tiling((65, 97), 0) == ((65, 97), 0.0)
    for size, overlap in [((65,), 0.1), (True, 0.1), (65.5, 0.1), ((65, 65), -0.1), ((65, 65), "0.5")]:
        with pytest.raises(ValueError, match="tile_size|tile_overlap"):
            check_tiling(size, overlap)
