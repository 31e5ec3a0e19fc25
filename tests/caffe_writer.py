"""Test helper: write small ``.caffemodel`` files (protobuf wire format encoded by hand) from a tiny Keras
DeepLabV2, with the layer names of the released Caffe models: the tiny files of the import and preset tests (so
they run in a clone without ``../shared``) and the variants that ``../shared/tools/make_caffemodel.py`` does not
write (ResNet-50 letters, VGG-ASPP, COCO / ImageNet heads, V1 files, unpacked floats, BatchNorm s = 0, bad files).
The full-size reference comparisons (the PyTorch-port logits) use the shared tool.
"""
import struct

import numpy as np

from deeplab_keras._keras_compat import flatten_layers
from deeplab_keras.backbones.resnet import RESNET_BLOCKS


def _varint(value):
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, wire, payload=b""):
    return _varint(number << 3 | wire) + payload


def varint_field(number, value):
    return _field(number, 0, _varint(int(value)))


def bytes_field(number, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return _field(number, 2, _varint(len(payload)) + payload)


def float_field(number, value):
    return _field(number, 5, struct.pack("<f", value))


def blob(array, style="shape"):
    """BlobProto: style "shape" (packed data + BlobShape), "legacy" (num/channels/height/width), "unpacked"
    (one fixed32 field per value) or "double" (double_data)."""
    array = np.asarray(array, np.float32)
    if style == "legacy":
        dims = (1,) * (4 - array.ndim) + array.shape
        head = b"".join(varint_field(i + 1, d) for i, d in enumerate(dims))
        return head + bytes_field(5, array.astype("<f4").tobytes())
    shape = bytes_field(7, bytes_field(1, b"".join(_varint(d) for d in array.shape)))
    if style == "unpacked":
        return b"".join(float_field(5, v) for v in array.ravel()) + shape
    if style == "double":
        return bytes_field(8, array.astype("<f8").tobytes()) + shape
    return bytes_field(5, array.astype("<f4").tobytes()) + shape


def layer(name, type_, blobs=(), conv=None, pool=None, bn_eps=None, style="shape", v1=False):
    """LayerParameter (or V1LayerParameter with ``v1``; ``type_`` is then the V1 enum number) bytes.

    conv: dict(num_output, kernel, dilation, bias); pool: dict(method 0 MAX / 1 AVE, kernel, stride, pad).
    """
    if v1:  # V1LayerParameter: type is an enum (no BatchNorm / Scale in V1)
        out = bytes_field(4, name) + varint_field(5, type_)
        out += b"".join(bytes_field(6, blob(b, style)) for b in blobs)
    else:
        out = bytes_field(1, name) + bytes_field(2, type_)
        out += b"".join(bytes_field(7, blob(b, style)) for b in blobs)
    if conv:
        body = varint_field(1, conv["num_output"]) + (b"" if conv.get("bias", True) else varint_field(2, 0))
        body += varint_field(4, conv["kernel"]) + (varint_field(18, conv["dilation"]) if conv.get("dilation", 1) > 1
                                                   else b"")
        out += bytes_field(10 if v1 else 106, body)
    if pool:
        body = b"".join(varint_field(n, pool[k]) for n, k in ((1, "method"), (2, "kernel"), (3, "stride"), (4, "pad")))
        out += bytes_field(19 if v1 else 121, body)
    if bn_eps is not None:
        out += bytes_field(139, float_field(3, bn_eps))
    return out


def net(layers, v1=False):
    """NetParameter bytes from encoded layers."""
    return bytes_field(1, "test-net") + b"".join(bytes_field(2 if v1 else 100, x) for x in layers)


def _oihw(kernel):
    return np.transpose(np.asarray(kernel), (3, 2, 0, 1))


def keras_to_caffe(model, head="aspp", numbered_stages=(), bn_scale=2.5, exp="voc12", style="shape",
                   with_pool5a=None, bn_eps=None, v1=False, record=None):
    """Encoded layers of a Caffe net holding the weights of ``model.network`` under Caffe's names.

    Args:
        head: "aspp" (the model's head: fc1_{exp}_c{k} / fc6_k.. / LargeFOV fc6, fc7, fc8_{exp}), "coco" (a 1x1
            91-class conv "fc1_coco"), "imagenet" (an InnerProduct "fc1000") or None.
        numbered_stages: ResNet stages whose blocks are named a, b1, b2, ... (ResNet-101) instead of a, b, c.
        bn_scale: Caffe's BatchNorm scale factor s written as the third blob (statistics multiplied by it).
        with_pool5a: VGG: write the pool5a AVE pooling layer (default: when the model has one).
        record: a dict that receives {Caffe layer name: [its blobs as written (Caffe layout, e.g. OIHW kernels)]},
            to check an importer against the file's own arrays.
    """
    net_ = model.network
    get = net_.get_layer
    out = []
    types = {"Convolution": 4, "Pooling": 17, "InnerProduct": 14} if v1 else {}

    def emit(name, type_, blobs=(), **kw):
        if record is not None:
            record[name] = [np.asarray(b, np.float32) for b in blobs]
        out.append(layer(name, types.get(type_, type_) if v1 else type_, blobs, style=style, v1=v1, **kw))

    def conv(caffe, keras_layer, bias=True, dilation=1):
        weights = [_oihw(keras_layer.kernel)] + ([np.asarray(keras_layer.bias)] if bias else [])
        emit(caffe, "Convolution", weights, conv=dict(num_output=weights[0].shape[0], kernel=weights[0].shape[2],
                                                      dilation=dilation, bias=bias))

    def bn(body, keras_layer):
        emit("bn" + body, "BatchNorm", [np.asarray(keras_layer.moving_mean) * bn_scale,
                                        np.asarray(keras_layer.moving_variance) * bn_scale,
                                        np.array([bn_scale], np.float32)], bn_eps=bn_eps)
        emit("scale" + body, "Scale", [np.asarray(keras_layer.gamma), np.asarray(keras_layer.beta)])

    if model.backbone == "vgg16":
        for b, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
            for i in range(1, n + 1):
                conv(f"conv{b}_{i}", get(f"block{b}_conv{i}"))
            emit(f"pool{b}", "Pooling", pool=dict(method=0, kernel=3, stride=2 if b <= 3 else 1, pad=1))
        pool5a = any(x.name == "pool5a" for x in net_.layers) if with_pool5a is None else with_pool5a
        if pool5a:
            emit("pool5a", "Pooling", pool=dict(method=1, kernel=3, stride=1, pad=1))
    else:
        conv("conv1", get("conv1_conv"), bias=False)
        bn("_conv1", get("conv1_bn"))
        emit("pool1", "Pooling", pool=dict(method=0, kernel=3, stride=2, pad=1))
        for stage, count in zip((2, 3, 4, 5), model.stage_blocks or RESNET_BLOCKS[model.backbone]):
            for i in range(1, count + 1):
                tag = "a" if i == 1 else (f"b{i - 1}" if stage in numbered_stages else chr(ord("a") + i - 1))
                for j, branch in enumerate(("1", "2a", "2b", "2c")):
                    name = f"conv{stage}_block{i}_{j}"
                    if j == 0 and i != 1:
                        continue
                    conv(f"res{stage}{tag}_branch{branch}", get(name + "_conv"), bias=False)
                    bn(f"{stage}{tag}_branch{branch}", get(name + "_bn"))
    if head == "aspp":
        branches = [[x for x in branch if x.weights] for branch in get("aspp").branches]
        largefov = model.backbone == "vgg16" and len(branches) == 1
        for k, branch in enumerate(branches):
            rate = int(branch[0].dilation_rate[0])
            if model.backbone != "vgg16":
                conv(f"fc1_{exp}_c{k}", branch[0], dilation=rate)
                continue
            suffix = "" if largefov else f"_{k + 1}"
            conv("fc6" + suffix, branch[0], dilation=rate)
            conv("fc7" + suffix, branch[1])
            conv(f"fc8_{exp}" + suffix, branch[2])
    elif head == "coco":
        channels = int(get("aspp").input.shape[-1])
        rng = np.random.default_rng(1)
        emit("fc1_coco", "Convolution", [rng.normal(size=(91, channels, 1, 1)).astype(np.float32),
                                         np.zeros(91, np.float32)], conv=dict(num_output=91, kernel=1))
    elif head == "imagenet":
        channels = int(get("aspp").input.shape[-1])
        rng = np.random.default_rng(2)
        emit("fc1000", "InnerProduct", [rng.normal(size=(1000, channels)).astype(np.float32),
                                        np.zeros(1000, np.float32)])
    return out


def randomize(model, seed=0, zero_resnet_bias=True):
    """Random weights everywhere (BatchNorm statistics too, variances > 0); ResNet backbone conv biases 0,
    as Caffe's ResNet convolutions have none."""
    rng = np.random.default_rng(seed)
    for layer in flatten_layers(model.network):
        for w in layer.weights:
            value = rng.uniform(-0.5, 0.5, size=tuple(w.shape)).astype(np.float32)
            if "variance" in w.path:
                value = np.abs(value) + 0.5
            w.assign(value)
        if zero_resnet_bias and model.backbone != "vgg16" and getattr(layer, "bias", None) is not None \
                and not layer.name.startswith("aspp"):
            layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    return model


_KAZUTO_BRANCH = {"1": "shortcut", "2a": "reduce", "2b": "conv3x3", "2c": "increase"}


def kazuto_name(caffe_name):
    """kazuto1011/deeplab-pytorch's module name for a Caffe layer (his convert.py ``translate_layer_name``):
    conv1 -> layer1.conv1.conv, bn_conv1 -> layer1.conv1.bn, res4b22_branch2a -> layer4.block23.reduce.conv,
    fc1_voc12_c0 -> aspp.c0; the COCO init's 1x1 head -> fc."""
    import re

    if caffe_name in ("conv1", "bn_conv1", "scale_conv1"):
        return "layer1.conv1." + ("conv" if caffe_name == "conv1" else "bn")
    m = re.match(r"^(res|bn|scale)(\d)([a-z])(\d*)_branch(\w+)$", caffe_name)
    if m:
        kind, stage, letter, number, branch = m.groups()
        block = int(number) + 1 if number else "abcdefghijklmnopqrstuvwxyz".index(letter) + 1
        return f"layer{stage}.block{block}.{_KAZUTO_BRANCH[branch]}." + ("conv" if kind == "res" else "bn")
    m = re.match(r"^fc1_.+_c(\d+)$", caffe_name)
    if m:
        return f"aspp.c{m.group(1)}"
    return "fc"


def kazuto_state_dict(caffe_layers, prefix="base."):
    """A deeplab-pytorch state dict (numpy values, his names and his BatchNorm conversion: Caffe's blobs / s in
    float64, num_batches_tracked) from Caffe layers with their blobs."""
    state = {}
    for layer in caffe_layers:
        if not layer.blobs:
            continue
        name = prefix + kazuto_name(layer.name)
        if layer.type == "BatchNorm":
            s = float(layer.blobs[2].reshape(-1)[0])
            state[name + ".running_mean"] = (layer.blobs[0].reshape(-1).astype(np.float64) / s).astype(np.float32)
            state[name + ".running_var"] = (layer.blobs[1].reshape(-1).astype(np.float64) / s).astype(np.float32)
            state[name + ".num_batches_tracked"] = np.array(0, np.int64)
        elif layer.type == "Scale":
            state[name + ".weight"], state[name + ".bias"] = (b.reshape(-1).copy() for b in layer.blobs)
        else:
            state[name + ".weight"] = np.array(layer.blobs[0])
            if len(layer.blobs) > 1:
                state[name + ".bias"] = np.array(layer.blobs[1].reshape(-1))
    return state
