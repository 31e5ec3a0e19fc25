"""deeplab_keras._keras_compat: every private Keras API use works with the installed (pinned) Keras."""
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab_keras import _keras_compat as compat
from tests.conftest import REPO


def _tiny(cls=keras.Model):
    class Block(keras.layers.Layer):  # a layer holding a layer as an attribute (like ASPP)
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(3, name="inner")

        def call(self, x):
            return self.inner(x)

    class Net(cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.block = Block(name="block")
            self.head = keras.Sequential([keras.layers.Dense(2, name="head_dense")], name="head")
            self.batch_sizes = []

        def call(self, x):
            self.batch_sizes.append(x.shape[0])
            return self.head(self.block(x))

    return Net(name="net")


def test_pinned_version_and_nothing_missing():
    pinned = re.search(r"^keras==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert compat.TESTED_KERAS_VERSION == pinned == keras.__version__
    assert compat.check() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_version() is True
    with pytest.warns(compat.KerasVersionWarning, match=r"Keras 3\.99\.0 is installed.*keras==3\.15\.1"):
        assert compat.check_version("3.99.0") is False


def test_missing_private_api_is_one_line_naming_it(monkeypatch):
    with pytest.raises(compat.KerasCompatError) as info:
        compat.flatten_layers(object())
    message = str(info.value)
    assert "\n" not in message and "Layer._flatten_layers" in message and "keras==3.15.1" in message
    monkeypatch.delattr(keras.layers.Layer, "_flatten_layers")
    assert compat.check() == ["Layer._flatten_layers"]


def test_flatten_layers_finds_nested_and_attribute_layers():
    net = _tiny()
    net(np.zeros((1, 4), "float32"))
    names = [layer.name for layer in compat.flatten_layers(net)]
    assert "net" not in names and {"block", "inner", "head", "head_dense"} <= set(names)


def test_set_initial_epoch_starts_fit_there():
    net = _tiny()
    net.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((4, 4), "float32"), np.zeros((4, 2), "float32")
    compat.set_initial_epoch(net, 2)
    history = net.fit(x, y, epochs=3, verbose=0)
    assert history.epoch == [2]
    compat.set_initial_epoch(net, None)
    assert net.fit(x, y, epochs=2, verbose=0).epoch == [0, 1]


def test_optimizer_variables_are_the_built_ones():
    variables = [keras.Variable(np.ones(3, "float32")), keras.Variable(np.ones(2, "float32"))]
    optimizer = keras.optimizers.SGD()
    optimizer.build(variables)
    assert [v.path for v in compat.optimizer_variables(optimizer)] == [v.path for v in variables]


def test_backup_and_restore_saves_through_save_state(tmp_path):
    class Recorder(compat.BackupAndRestore):
        epochs = []

        def save_state(self, epoch):
            self.epochs.append(epoch)

    net = _tiny()
    net(np.zeros((1, 4), "float32"))  # BackupAndRestore needs a built model
    net.compile(optimizer="sgd", loss="mse")
    recorder = Recorder(str(tmp_path / "backup"))
    net.fit(np.zeros((4, 4), "float32"), np.zeros((4, 2), "float32"), epochs=2, verbose=0, callbacks=[recorder])
    assert recorder.epochs == [1, 2]


def test_sample_batch_build_builds_from_the_local_batch():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")  # a strategy: Keras builds before the first step
    with strategy.scope():
        net = _tiny(cls=type("Built", (compat.SampleBatchBuild, keras.Model), {}))
        net.compile(optimizer="sgd", loss="mse")
    compat.set_build_batch(net, (np.zeros((1, 4), "float32"), np.zeros((1, 2), "float32"), None))
    data = tf.data.Dataset.from_tensors((tf.zeros((8, 4)), tf.zeros((8, 2))))
    net.fit(data, epochs=1, verbose=0, shuffle=False)
    assert net.built and net.batch_sizes[0] == 1  # built from the local batch (size 1), not the data (size 8)
    assert 8 in net.batch_sizes


def test_patch_tf2onnx_makes_numpy2_names_available():
    compat.patch_tf2onnx()
    compat.patch_tf2onnx()  # idempotent
    assert np.object is object  # what tf2onnx 1.17 reads
