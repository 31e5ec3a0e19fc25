"""Shared test settings and helpers: tiny model configurations, the VOC samples packaged with deeplab_keras, and
:func:`shared_path` for the fixtures that only ``../shared`` holds (tests that need them skip without it)."""
import os
import pathlib
import signal

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# A suite started in the background by a non-interactive shell inherits SIGINT ignored (and passes that on to the
# commands it runs), which would make the Ctrl-C tests meaningless: give this process (and so its children) the
# normal Ctrl-C behaviour back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# The 7 real VOC 2012 pairs ship inside the package (byte-identical to ../shared/data/voc2012-samples).
VOC_SAMPLES = REPO / "deeplab_keras" / "data" / "samples"

# Tiny DeepLab configs: channels / 8 (VGG / 16), one block per ResNet stage. Build in ~1 s, run on 65 px inputs.
TINY = {
    "resnet50": dict(backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1)),
    "resnet101": dict(backbone="resnet101", width_multiplier=0.125, stage_blocks=(1, 1, 2, 1)),
    "vgg16": dict(backbone="vgg16", width_multiplier=0.0625, aspp="largefov"),
}


def tiny_model(num_classes=3, backbone="resnet50", seed=None, **overrides):
    """A tiny DeepLabV2 for tests (see TINY); with ``seed``, the same initial weights whatever ran before in this
    process (pytest-xdist hands tests to workers in a different order each run)."""
    import keras

    import deeplab_keras as dk
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return dk.DeepLabV2(num_classes=num_classes, **{**TINY[backbone], **overrides})


def saved_tiny_model(tmp_path_factory, num_classes, folder="ckpt", seed=0):
    """(model, path of it saved as ``tiny.keras``) for a tiny ResNet-50 DeepLabV2 (weights from ``seed``) in a fresh
    temporary folder."""
    model = tiny_model(num_classes, "resnet50", seed=seed)
    path = tmp_path_factory.mktemp(folder) / "tiny.keras"
    model.save(path)
    return model, str(path)


def shared_path(*parts):
    """``../shared/<parts>`` (the caffemodel generator, the PyTorch-port reference logits); skips the calling test
    with one reason naming the folder when the repository was cloned without ``../shared`` beside it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared folder beside the repository; CI has it)")
    return path


@pytest.fixture(scope="session")
def voc_samples_dir():
    """Folder holding VOC2012/ with the 7 real VOC 2012 image/label pairs (``data.sample_data_dir()``)."""
    from deeplab_keras.data import sample_data_dir
    folder = pathlib.Path(sample_data_dir())
    assert (folder / "VOC2012").is_dir(), f"the packaged VOC samples are missing under {folder}"
    return folder
