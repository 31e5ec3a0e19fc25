"""CRFParams: the CRF's one set of defaults and one validation, and every CRF entry point taking its values from it."""
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from deeplab_keras.crf.params import MAX_ITERATIONS, MAX_WEIGHT, CRFParams

CRF_DIR = os.path.join(os.path.dirname(__file__), "..", "deeplab_keras", "crf")
# DeepLab v2 ResNet-101's released VOC 2012 test prototxt, DenseCRF layer: max_iter 10, bi_w 4, bi_xy_std 67,
# bi_rgb_std 3, pos_w 3, pos_xy_std 1.
PROTOTXT = dict(iterations=10, bilateral_weight=4.0, bilateral_xy_std=67.0, bilateral_rgb_std=3.0,
                gaussian_weight=3.0, gaussian_xy_std=1.0)
OTHER = CRFParams(iterations=3, bilateral_weight=5.0, bilateral_xy_std=20.0, bilateral_rgb_std=10.0,
                  gaussian_weight=2.0, gaussian_xy_std=1.5)


def test_defaults_are_deeplab_v2_resnet101s_and_json_safe():
    params = CRFParams()
    assert params.to_dict() == PROTOTXT
    assert list(params.to_dict()) == list(CRFParams.keys()) == list(PROTOTXT)
    assert json.loads(json.dumps(params.to_dict())) == PROTOTXT
    assert type(params.iterations) is int and all(type(v) is float for v in list(params.to_dict().values())[1:])


BAD = [("iterations", -1, "0..10000"), ("iterations", MAX_ITERATIONS + 1, "0..10000"),
       ("iterations", 2.0, "an integer"), ("iterations", True, "an integer"), ("iterations", "10", "an integer"),
       ("iterations", None, "an integer")]
for _weight in ("bilateral_weight", "gaussian_weight"):
    BAD += [(_weight, -0.5, "0..1e"), (_weight, MAX_WEIGHT * 2, "0..1e"), (_weight, math.nan, "finite"),
            (_weight, math.inf, "finite"), (_weight, "4", "a finite number"), (_weight, False, "a finite number")]
for _std in ("bilateral_xy_std", "bilateral_rgb_std", "gaussian_xy_std"):
    BAD += [(_std, 0.0, "> 0"), (_std, -3, "> 0"), (_std, math.nan, "finite"), (_std, math.inf, "finite"),
            (_std, None, "a finite number"), (_std, [1.0], "a finite number")]


@pytest.mark.parametrize("field,value,rule", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_each_field_rejects_bad_values_in_one_line_naming_it(field, value, rule):
    with pytest.raises(ValueError, match=rf"^crf\.{field} must be .*{re.escape(rule)}") as err:
        CRFParams(**{field: value})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=field):
        CRFParams.from_dict({field: value})


def test_valid_edge_values_and_number_types_are_normalised():
    params = CRFParams(iterations=np.int64(0), bilateral_weight=0, bilateral_xy_std=np.float32(0.5),
                       bilateral_rgb_std=1, gaussian_weight=MAX_WEIGHT, gaussian_xy_std=np.float64(2))
    assert params.to_dict() == dict(iterations=0, bilateral_weight=0.0, bilateral_xy_std=0.5, bilateral_rgb_std=1.0,
                                    gaussian_weight=MAX_WEIGHT, gaussian_xy_std=2.0)
    assert type(params.iterations) is int and type(params.bilateral_rgb_std) is float
    assert CRFParams(iterations=MAX_ITERATIONS).iterations == MAX_ITERATIONS
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.iterations = 5


def test_from_dict_round_trip_partial_and_unknown_keys():
    assert CRFParams.from_dict(OTHER.to_dict()) == OTHER
    assert CRFParams.from_dict({"gaussian_weight": 0}) == CRFParams(gaussian_weight=0.0)
    with pytest.raises(ValueError, match=r"unknown crf key\(s\) \['bilateral_wieght', 'sxy'\]; valid keys: "
                                         r"\['iterations', 'bilateral_weight', .*'gaussian_xy_std'\]$"):
        CRFParams.from_dict({"bilateral_wieght": 4, "sxy": 3})
    with pytest.raises(ValueError, match="crf must be a mapping of its keys .*, got list"):
        CRFParams.from_dict([("iterations", 3)])


def test_resolve_takes_params_dict_or_none_plus_overrides():
    assert CRFParams.resolve() == CRFParams()
    assert CRFParams.resolve(OTHER) is OTHER
    assert CRFParams.resolve({"iterations": 3}) == CRFParams(iterations=3)
    assert CRFParams.resolve(OTHER, iterations=7) == dataclasses.replace(OTHER, iterations=7)
    with pytest.raises(ValueError, match=r"unknown crf key\(s\) \['iters'\]; valid keys"):
        CRFParams.resolve(OTHER, iters=7)
    with pytest.raises(ValueError, match="must be a CRFParams, a dict or None, got 10"):
        CRFParams.resolve(10)  # e.g. iterations passed positionally the old way
    with pytest.raises(ValueError, match="bilateral_xy_std"):
        CRFParams.resolve(None, bilateral_xy_std=0)


def test_parse_reads_cli_items_and_iterations():
    assert CRFParams.parse([]) == CRFParams()
    parsed = CRFParams.parse(["bilateral_weight=5", "bilateral-xy-std=20", " gaussian_xy_std = 1.5",
                              "iterations=4"], iterations=None)
    assert parsed == CRFParams(iterations=4, bilateral_weight=5.0, bilateral_xy_std=20.0, gaussian_xy_std=1.5)
    assert CRFParams.parse(["iterations=4"], iterations=6).iterations == 6
    assert CRFParams.parse([], iterations=0).iterations == 0


@pytest.mark.parametrize("items,iterations,message", [
    (["bilateral_wieght=5"], None, r"CRF parameter 'bilateral_wieght=5': expected KEY=NUMBER with KEY one of "
                                   r"iterations, bilateral_weight, bilateral_xy_std, bilateral_rgb_std, "
                                   r"gaussian_weight, gaussian_xy_std$"),
    (["bilateral_weight"], None, "expected KEY=NUMBER"),
    (["bilateral_weight=high"], None, r"'bilateral_weight=high': bilateral_weight must be a number, got 'high'"),
    (["iterations=2.5"], None, r"'iterations=2.5': iterations must be an int, got '2.5'"),
    (["gaussian_xy_std=0"], None, "crf.gaussian_xy_std must be a finite number > 0, got 0.0"),
    ([], -1, "crf.iterations must be an integer in 0..10000, got -1"),
])
def test_parse_errors_are_one_line_naming_the_item(items, iterations, message):
    with pytest.raises(ValueError, match=message) as err:
        CRFParams.parse(items, iterations=iterations)
    assert "\n" not in str(err.value)


def test_importable_without_tensorflow():
    """... and `import deeplab_keras` registers the DenseCRF layer, so that .keras files holding it load."""
    code = ("import sys, keras, deeplab_keras; from deeplab_keras.crf import CRFParams, DenseCRF; "
            "p = CRFParams.parse(['iterations=3']); assert p.iterations == 3; "
            "assert keras.saving.get_registered_object('deeplab_keras>DenseCRF') is DenseCRF; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    env = dict(os.environ, KERAS_BACKEND="numpy")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_op_has_no_defaults_of_its_own_and_the_same_limits():
    """The C++ side takes every value from Python (no default values in CrfParams) and checks the same limits."""
    header = open(os.path.join(CRF_DIR, "dense_crf.h")).read()
    struct = re.search(r"struct CrfParams \{(.*?)\};", header, re.S).group(1)
    assert re.findall(r"\b(\w+);", struct) == list(CRFParams.keys()) and "=" not in struct
    assert int(re.search(r"kMaxIterations = (\d+);", header).group(1)) == MAX_ITERATIONS
    assert float(re.search(r"kMaxWeight = ([\de.]+)f;", header).group(1)) == MAX_WEIGHT


def _entry_points():
    from deeplab_keras.crf import DenseCRF, crf_postprocess, dense_crf, dense_crf_portable, memory_estimate
    from deeplab_keras.crf.portable import lattice_key_bits
    from deeplab_keras.evaluate import evaluate

    return [dense_crf, memory_estimate, dense_crf_portable, crf_postprocess, lattice_key_bits, DenseCRF.__init__,
            evaluate]


def test_no_entry_point_carries_a_default_value_of_its_own():
    for function in _entry_points():
        parameters = inspect.signature(function).parameters
        assert not set(parameters) & set(CRFParams.keys()), function.__qualname__
        assert "params" in parameters or "crf_params" in parameters, function.__qualname__


def test_changing_a_default_in_crfparams_changes_every_entry_point(monkeypatch):
    """Op, portable CRF, layer and evaluate all read the defaults from CRFParams: patch them there, and each
    entry point called without parameters computes what it computes with the patched values given explicitly."""
    import keras
    import tensorflow as tf

    import deeplab_keras as dk
    from deeplab_keras.data import make_synthetic
    from deeplab_keras.evaluate import evaluate

    rng = np.random.default_rng(0)
    probs = tf.nn.softmax(rng.normal(0, 2, (1, 12, 16, 3)).astype(np.float32)).numpy()
    images = rng.integers(0, 256, (1, 12, 16, 3), dtype=np.uint8)
    defaults = dk.crf.dense_crf(probs, images).numpy()
    monkeypatch.setattr(CRFParams.__init__, "__defaults__", tuple(OTHER.to_dict().values()))
    assert CRFParams() == OTHER

    op = dk.crf.dense_crf(probs, images).numpy()
    assert np.abs(op - defaults).max() > 1e-3  # the patch matters
    np.testing.assert_array_equal(op, dk.crf.dense_crf(probs, images, **OTHER.to_dict()).numpy())
    portable = dk.crf.dense_crf_portable(probs, images).numpy()
    np.testing.assert_array_equal(portable, dk.crf.dense_crf_portable(probs, images, **OTHER.to_dict()).numpy())
    np.testing.assert_allclose(portable, op, atol=1e-4)
    layer = dk.crf.DenseCRF()
    assert layer.params == OTHER and {k: layer.get_config()[k] for k in CRFParams.keys()} == OTHER.to_dict()
    np.testing.assert_array_equal(layer([probs, images]).numpy(), op)

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, kernel_initializer="ones")(inputs))
    data = make_synthetic(1, size=(17, 17), num_classes=2, seed=0)
    assert evaluate(model, data, 2, crf=True, progress=False)["crf_params"] == OTHER.to_dict()


def test_entry_points_take_params_objects_dicts_and_overrides():
    import tensorflow as tf

    import deeplab_keras as dk

    rng = np.random.default_rng(1)
    probs = tf.nn.softmax(rng.normal(0, 2, (1, 8, 12, 3)).astype(np.float32)).numpy()
    images = rng.integers(0, 256, (1, 8, 12, 3), dtype=np.uint8)
    explicit = dk.crf.dense_crf(probs, images, **OTHER.to_dict()).numpy()
    for params, overrides in [(OTHER, {}), (OTHER.to_dict(), {}), (dataclasses.replace(OTHER, iterations=9),
                                                                     {"iterations": 3})]:
        np.testing.assert_array_equal(dk.crf.dense_crf(probs, images, params, **overrides).numpy(), explicit)
        np.testing.assert_array_equal(dk.crf.DenseCRF(params, **overrides)([probs, images]).numpy(), explicit)
    np.testing.assert_array_equal(dk.crf.dense_crf_portable(probs, images, OTHER).numpy(),
                                  dk.crf.dense_crf_portable(probs, images, **OTHER.to_dict()).numpy())
    # A tensor override reaches the kernel as it is (the kernel checks it); a bad Python value is CRFParams' error.
    np.testing.assert_array_equal(
        dk.crf.dense_crf(probs, images, OTHER, gaussian_weight=tf.constant(OTHER.gaussian_weight)).numpy(), explicit)
    with pytest.raises(tf.errors.InvalidArgumentError, match="DenseCrf: iterations must be in"):
        dk.crf.dense_crf(probs, images, iterations=tf.constant(-1))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dense_crf: unknown crf key\(s\) \['sxy'\]; valid keys"):
        dk.crf.dense_crf(probs, images, sxy=tf.constant(3.0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="dense_crf: crf.bilateral_xy_std must be"):
        dk.crf.dense_crf(probs, images, OTHER, bilateral_xy_std=0)
    assert dk.crf.memory_estimate([1, 50, 60, 21], OTHER) == dk.crf.memory_estimate([1, 50, 60, 21],
                                                                                       **OTHER.to_dict())
    with pytest.raises(ValueError, match="iterations"):
        dk.crf.memory_estimate([1, 50, 60, 21], iterations=-2)
