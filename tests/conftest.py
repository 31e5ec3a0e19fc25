"""Shared test settings and helpers: tiny model configurations and the shared VOC samples."""
import os
import pathlib

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
VOC_SAMPLES = REPO.parent / "shared" / "data" / "voc2012-samples"

# Tiny DeepLab configs: channels / 8 (VGG / 16), one block per ResNet stage. Build in ~1 s, run on 65 px inputs.
TINY = {
    "resnet50": dict(backbone="resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1)),
    "resnet101": dict(backbone="resnet101", width_multiplier=0.125, stage_blocks=(1, 1, 2, 1)),
    "vgg16": dict(backbone="vgg16", width_multiplier=0.0625, aspp="largefov"),
}


def tiny_model(num_classes=3, backbone="resnet50", **overrides):
    """A tiny DeepLabV2 for tests (see TINY)."""
    import deeplab_keras as dk
    return dk.DeepLabV2(num_classes=num_classes, **{**TINY[backbone], **overrides})


@pytest.fixture(scope="session")
def voc_samples_dir():
    """Folder holding VOC2012/ with the 7 real VOC 2012 image/label pairs."""
    if not (VOC_SAMPLES / "VOC2012").is_dir():
        pytest.fail(f"the shared VOC samples are missing: expected {VOC_SAMPLES}/VOC2012 (../shared beside the repo)")
    return VOC_SAMPLES
