"""Write the ``.pth`` test fixtures in ``tests/data/pth/`` with real ``torch.save`` (run by hand; needs torch,
which the tests themselves do not).

    python tests/data/make_pth_fixtures.py        # from the repository root; ~10 s, a few files of <= 70 KB

Rerun it (and commit the files) when the tiny models of ``tests/conftest.py`` or ``tests/caffe_writer.py``'s
layouts change: the tests rebuild the same randomized models (same seeds) and compare them with what they load.

Files:
    tensors.pth / tensors_legacy.pth   zip and pre-1.6 formats: float32/float16/bfloat16/float64/int64, a
                                       transpose, a strided view of a shared storage, a 0-d tensor, an nn.Parameter
    evil.pth                           a tensor and an object whose pickle calls os.mkdir("pth_exploit_ran")
    kazuto_aspp.pth                    kazuto1011/deeplab-pytorch release names (base.layer1.conv1.conv.weight, ...):
                                       tiny ResNet-101 layout (stage_blocks 1,1,2,1, width 1/32, res4b1 names), ASPP
                                       L head, 3 classes, cw.randomize seed 20, Caffe BatchNorm s = 4
    kazuto_coco.pth                    his DeepLabV1 COCO init layout (no base. prefix, a 91-class 1x1 'fc'): tiny
                                       ResNet-50 (stage_blocks 1,1,1,1, width 1/32), seed 13
    kazuto_decoder.pth                 kazuto_coco.pth plus a foreign tensor decoder.conv.weight
"""
import collections
import os
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from deeplab_keras.weights.caffe_reader import CaffeLayer  # noqa: E402
from tests import caffe_writer as cw  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

OUT = ROOT / "tests" / "data" / "pth"
# (seed, tiny_model arguments, keras_to_caffe arguments, kazuto prefix) of the kazuto layouts
KAZUTO = {
    "kazuto_aspp": (20, dict(num_classes=3, backbone="resnet101", width_multiplier=1 / 32),
                    dict(numbered_stages=(4,), bn_scale=4.0), "base."),
    "kazuto_coco": (13, dict(num_classes=3, backbone="resnet50", width_multiplier=1 / 32),
                    dict(head="coco", bn_scale=4.0), ""),
}


class _Exploit:
    def __reduce__(self):
        return os.mkdir, ("pth_exploit_ran",)


def tensors():
    """The state of tensors.pth (torch tensors)."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return collections.OrderedDict([
        ("w", base), ("t", base.t()), ("view", base[1:, 2:4]), ("half", torch.linspace(-2, 2, 5).half()),
        ("bf16", torch.tensor([1.5, -3.25], dtype=torch.bfloat16)), ("n", torch.tensor(7)),
        ("p", torch.nn.Parameter(torch.ones(2, 3))), ("d", torch.zeros(3, dtype=torch.float64) + 0.1)])


def kazuto_state(name):
    """deeplab-pytorch state dict (numpy) of a KAZUTO layout, from its randomized tiny model."""
    seed, model_args, caffe_args, prefix = KAZUTO[name]
    model = cw.randomize(tiny_model(**model_args), seed=seed)
    layers = []
    for encoded in cw.keras_to_caffe(model, **caffe_args):
        layers.extend(_decode(encoded))
    return cw.kazuto_state_dict(layers, prefix=prefix)


def _decode(encoded_layer):
    from deeplab_keras.weights.caffe_reader import _decode_layer

    layer = _decode_layer(encoded_layer, v1=False)
    return [CaffeLayer(layer.name, layer.type, [np.array(b) for b in layer.blobs])]


def _save(state, name, legacy=False):
    tensors_ = collections.OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray)
                                        else v) for k, v in state.items())
    torch.save(tensors_, str(OUT / name), _use_new_zipfile_serialization=not legacy)
    print(f"wrote {OUT / name} ({(OUT / name).stat().st_size:,} bytes)")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    _save(tensors(), "tensors.pth")
    _save(tensors(), "tensors_legacy.pth", legacy=True)
    _save(collections.OrderedDict([("w", torch.ones(2)), ("x", _Exploit())]), "evil.pth")
    _save(kazuto_state("kazuto_aspp"), "kazuto_aspp.pth")
    coco = kazuto_state("kazuto_coco")
    _save(coco, "kazuto_coco.pth")
    _save({**coco, "decoder.conv.weight": np.ones((1, 1, 1, 1), np.float32)}, "kazuto_decoder.pth")


if __name__ == "__main__":
    main()
