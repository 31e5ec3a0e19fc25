"""Map the layers of a released DeepLab v2 ``.caffemodel`` (or deeplab-pytorch ``.pth``) onto a :class:`DeepLabV2`.

The layers (read by :mod:`~deeplab_keras.weights.caffe_reader`, or :mod:`~deeplab_keras.weights.pth` with Caffe
names) map onto the model by name:

=====================================  =====================================================================
Caffe                                  Keras (``model.network``)
=====================================  =====================================================================
conv1 / bn_conv1 / scale_conv1         conv1_conv (bias zeroed: Caffe's has none) / conv1_bn
res{s}{b}_branch{1,2a,2b,2c}           conv{s}_block{i}_{0,1,2,3}_conv (a=1, b=2, ...; b1=2 ... b22=23)
bn{s}{b}_branch* / scale{s}{b}_branch* conv{s}_block{i}_{0,1,2,3}_bn (mean, var / s; gamma, beta)
fc1_{exp}_c{k}                         ASPP branch of the same dilation: aspp_r{rate}_conv
conv{b}_{i}                            block{b}_conv{i} (VGG-16)
fc6[_k] / fc7[_k] / fc8_{exp}[_k]      fc6_r{rate} / fc7_r{rate} / fc8_r{rate} (LargeFOV: rate 12)
=====================================  =====================================================================

Convolution blobs are OIHW (Keras: HWIO); BatchNorm blobs are (mean * s, var * s, [s]) and are divided by s as
Caffe does (s == 0 gives 0); Scale blobs are gamma and beta. Shared-weight copies of the MSC branches
(``<layer>_res075``, ``<layer>_res05``) are checked to equal their shared layer and skipped.

The weights file comes in as a :class:`~deeplab_keras.weights.caffe_reader.Scan` (from
:func:`deeplab_keras.weights.convert.scan_weights`); the model is passed in, never built here.
"""
import re

import numpy as np

from deeplab_keras.architecture import ASPP_RATES, RESNET_BLOCKS
from deeplab_keras.weights.caffe_reader import CaffeModelError, bn_statistics

# ----------------------------------------------------------------------------------------------------------
# What the file holds (names -> roles), checked against the model before anything is assigned
# ----------------------------------------------------------------------------------------------------------
_RESNET = re.compile(r"^(res|bn|scale)(\d)([a-z])(\d*)_branch(1|2a|2b|2c)$")
_STEM = {"conv1": "conv", "bn_conv1": "bn", "scale_conv1": "scale"}
_VGG_CONV = re.compile(r"^conv(\d)_(\d)$")
_ASPP = re.compile(r"^fc1_(.+)_c(\d+)$")
_FC = re.compile(r"^fc([678])(?:_(.+?))?(?:_(\d+))?$")
_MSC_COPY = re.compile(r"^(.+)_res\d+$")
_BRANCHES = {"1": 0, "2a": 1, "2b": 2, "2c": 3}
_KINDS = {"res": "conv", "bn": "bn", "scale": "scale"}


def _block_index(letter, number):
    """Caffe's ResNet block names -> Keras block numbers: a, b, c, ... = 1, 2, 3, ...; b1, b2, ... = 2, 3, ..."""
    return int(number) + 1 if number else ord(letter) - ord("a") + 1


def _role(layer):
    """(kind, keras name or head key) for a layer with blobs, or None when the name is not known.

    kind: "conv" | "bn" | "scale" (backbone), "head" (key = (branch, position)), "classifier" (a head that
    is no DeepLab v2 head: ImageNet fc1000, the COCO init's 1x1 classifier).
    """
    name = layer.name
    if name in _STEM:
        return _STEM[name], "conv1_" + ("conv" if name == "conv1" else "bn")
    m = _RESNET.match(name)
    if m:
        kind, stage, letter, number, branch = m.groups()
        suffix = "conv" if kind == "res" else "bn"
        return _KINDS[kind], f"conv{stage}_block{_block_index(letter, number)}_{_BRANCHES[branch]}_{suffix}"
    m = _VGG_CONV.match(name)
    if m and layer.type == "Convolution":
        return "conv", f"block{m.group(1)}_conv{m.group(2)}"
    if layer.type == "Convolution":
        m = _ASPP.match(name)
        if m:
            return "head", (int(m.group(2)), 0)
        m = _FC.match(name)
        if m and (m.group(1) != "8" or m.group(2)):  # fc8 needs its experiment name (fc8_voc12)
            position = int(m.group(1)) - 6
            branch = m.group(3) if m.group(3) else (m.group(2) if m.group(1) != "8" else None)
            if branch is None or branch.isdigit():
                return "head", (int(branch) if branch else 0, position)
        if name.startswith("fc"):
            return "classifier", name
    if layer.type == "InnerProduct":
        return "classifier", name
    return None


def analyse(scan):
    """What network the file holds: backbone, blocks, width, head, classes, rates, pool5a, eps, MSC copies."""
    path = scan.path
    weighted = [layer for layer in scan.layers if layer.blobs]
    if not weighted:
        raise CaffeModelError(f"{path} holds no layers with weights (a deploy net without weights?); "
                              "pass the trained .caffemodel")
    names = {layer.name for layer in weighted}
    roles, msc_copies, unknown = {}, [], []
    for layer in weighted:
        role = _role(layer)
        copy = _MSC_COPY.match(layer.name)
        if copy and copy.group(1) in names:
            msc_copies.append(layer)
        elif role is None:
            unknown.append(layer.name)
        else:
            roles[layer.name] = role
    if unknown:
        raise CaffeModelError(f"{path} has {len(unknown)} layers with weights that are not part of a DeepLab v2 "
                              f"ResNet/VGG-16 network: {', '.join(scan.display(n) for n in unknown[:12])}"
                              + (" ..." if len(unknown) > 12 else ""))
    differing = [c.name for c in msc_copies if scan.digests[c.name] != scan.digests[_MSC_COPY.match(c.name).group(1)]]
    if differing:
        raise CaffeModelError(f"{path}: the MSC branch layers {', '.join(differing[:6])} hold weights that differ "
                              "from their shared layers; a shared-weight DeepLabV2 cannot represent them")
    by_name = {layer.name: layer for layer in weighted}
    out = {"msc_copies": [c.name for c in msc_copies], "roles": roles, "layers": by_name}
    if "conv1_1" in roles:
        out["backbone"] = "vgg16"
    elif "conv1" in roles or any(_RESNET.match(n) for n in roles):
        blocks = {}
        for name in roles:
            m = _RESNET.match(name)
            if m and m.group(1) == "res" and m.group(5) == "2a":
                s = int(m.group(2))
                blocks[s] = max(blocks.get(s, 0), _block_index(m.group(3), m.group(4)))
        stage_blocks = tuple(blocks.get(s, 0) for s in (2, 3, 4, 5))
        if not all(stage_blocks):
            raise CaffeModelError(f"{path} holds a ResNet without blocks in some stage (blocks per stage conv2..conv5: "
                                  f"{stage_blocks}); the file may be truncated")
        known = {blocks: name for name, blocks in RESNET_BLOCKS.items()}
        out["backbone"] = known.get(stage_blocks, "resnet101")
        out["stage_blocks"] = None if stage_blocks in known else stage_blocks  # e.g. ResNet-152 (3, 8, 36, 3)
        eps = {round(float(layer.batch_norm["eps"]), 12) for layer in weighted
               if layer.type == "BatchNorm" and layer.batch_norm}
        out["bn_epsilon"] = eps.pop() if len(eps) == 1 else (1e-5 if not eps else sorted(eps))
    else:
        raise CaffeModelError(f"{path} holds neither a ResNet (conv1, res2a_branch1, ...) nor a VGG-16 "
                              "(conv1_1, ...) backbone")
    stem = by_name.get("conv1_1" if out["backbone"] == "vgg16" else "conv1")
    out["width_multiplier"] = stem.blobs[0][0] / 64 if stem is not None and stem.blobs[0] else 1.0
    pools = [layer for layer in scan.layers if layer.type == "Pooling"]
    if out["backbone"] == "vgg16":
        out["pool5a"] = any(p.name == "pool5a" or (p.pooling and p.pooling["pool"] == "AVE") for p in pools)
    out["display"] = scan.display
    return _analyse_head(path, roles, by_name, out)


def _analyse_head(path, roles, by_name, out):
    """The head part of :func:`analyse`: ASPP / LargeFOV branches, their rates and class count, or a classifier."""
    head = {}
    for name, (kind, key) in roles.items():
        if kind == "head":
            head.setdefault(key[0], {})[key[1]] = by_name[name]
    classifiers = [name for name, (kind, _) in roles.items() if kind == "classifier"]
    out["head_layers"] = [n for n, (kind, _) in roles.items() if kind in ("head", "classifier")]
    out["classifiers"] = classifiers
    if head:
        positions = (0,) if out["backbone"] != "vgg16" else (0, 1, 2)
        for k, branch in sorted(head.items()):
            if tuple(sorted(branch)) != positions:
                have = ", ".join(layer.name for layer in branch.values())
                raise CaffeModelError(f"{path}: head branch {k} is incomplete ({have}); expected "
                                      + ("fc1_<exp>_c<k>" if positions == (0,) else "fc6, fc7 and fc8 layers"))
        branches = [head[k] for k in sorted(head)]
        dilations = [(b[0].convolution or {}).get("dilation", 1) for b in branches]
        out["head"] = branches
        out["rates"] = tuple(dilations) if all(d > 1 for d in dilations) else None
        out["num_classes"] = _out_channels(path, branches[0][max(positions)], 0)
        largefov = out["backbone"] == "vgg16" and len(branches) == 1 and branches[0][0].name == "fc6"
        out["largefov"] = largefov
    elif classifiers:
        last = by_name[classifiers[-1]]
        out["num_classes"] = _out_channels(path, last, -2 if last.type == "InnerProduct" else 0)
    return out


def _out_channels(path, layer, axis):
    """The output channels of a classifier / head layer (its first blob's dimension ``axis``), checked to exist."""
    shape = tuple(layer.blobs[0]) if layer.blobs else ()
    if len(shape) < (2 if axis < 0 else 1):
        raise CaffeModelError(f"{path}: layer {layer.name} has weights of shape {shape}; a classifier's are "
                              "(classes, channels, ...)")
    return shape[axis]


def _aspp_kwarg(info):
    if info.get("largefov"):
        return "largefov"
    rates = info["rates"] or ASPP_RATES["L"][:len(info["head"])]
    for key in ("L", "S"):
        if tuple(rates) == ASPP_RATES[key]:
            return key
    return tuple(rates)


def config_of(info):
    cfg = {"backbone": info["backbone"]}
    if info.get("head"):
        cfg["num_classes"] = int(info["num_classes"])
        cfg["aspp"] = _aspp_kwarg(info)
    elif info["classifiers"] and not any(info["layers"][n].type == "InnerProduct" for n in info["classifiers"]):
        cfg["num_classes"] = int(info["num_classes"])
    for key, default in (("pool5a", None), ("bn_epsilon", None), ("stage_blocks", None), ("width_multiplier", 1.0)):
        if info.get(key, default) != default:
            cfg[key] = info[key]
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Loading into a DeepLabV2
# ----------------------------------------------------------------------------------------------------------
def _weighted_layers(model, with_head):
    """{keras name: layer} of ``model.network``'s weighted layers, ASPP branch layers included when asked."""
    network = model.network
    targets = {layer.name: layer for layer in network.layers if layer.weights and layer.name != "aspp"}
    heads = {}
    if with_head:
        for branch in network.get_layer("aspp").branches:
            weighted = [layer for layer in branch if layer.weights]
            rate = int(weighted[0].dilation_rate[0])
            heads[rate] = weighted
            targets.update({layer.name: layer for layer in weighted})
    return targets, heads


def describe_head(info):
    names = [info["display"](n) for n in info["head_layers"]]
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def _check_fits(path, caffe, shapes, role, layer):
    """Raise when the file's blob shapes do not fit the Keras layer."""
    if role == "conv":
        kh, kw, cin, cout = (int(d) for d in layer.kernel.shape)
        if tuple(shapes[0]) != (cout, cin, kh, kw):
            raise CaffeModelError(f"{path}: layer {caffe} has weights of shape {tuple(shapes[0])} (OIHW); the model's "
                                  f"{layer.name} needs {(cout, cin, kh, kw)} (kernel {(kh, kw, cin, cout)} HWIO); "
                                  "build the model the file was made for (see caffemodel_config)")
        if len(shapes) > 2 or (len(shapes) == 2 and (layer.bias is None or int(np.prod(shapes[1])) != cout)):
            raise CaffeModelError(f"{path}: layer {caffe} has blobs {[tuple(b) for b in shapes]}; the model's "
                                  f"{layer.name} has a kernel {(kh, kw, cin, cout)} and "
                                  f"{'a bias' if layer.bias is not None else 'no bias'}")
        return
    channels = int(layer.moving_mean.shape[0])
    counts = (3,) if role == "bn" else (1, 2)
    used = shapes[:2] if role == "bn" else shapes
    if len(shapes) not in counts or any(int(np.prod(b)) != channels for b in used):
        raise CaffeModelError(f"{path}: {'BatchNorm' if role == 'bn' else 'Scale'} layer {caffe} has blobs "
                              f"{[tuple(b) for b in shapes]}; the model's {layer.name} has {channels} channels")


def _check_finite(scan, plan):
    """Raise when a layer to be loaded holds NaN or infinite values (named, never printed)."""
    bad = [name for name in plan if (scan.nonfinite or {}).get(name)]
    if bad:
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise CaffeModelError(f"{scan.path}: layer {scan.display(bad[0])} holds {scan.nonfinite[bad[0]]:,} NaN or "
                              f"infinite values{more}; the file is damaged or its training diverged: use another file")


def _check_eps(path, info, targets):
    eps = info["bn_epsilon"]
    if isinstance(eps, list):
        raise CaffeModelError(f"{path}: its BatchNorm layers use several eps values {eps}; not supported")
    model_eps = sorted({float(layer.epsilon) for layer in targets.values() if hasattr(layer, "moving_mean")})
    wrong = [e for e in model_eps if abs(e - eps) > 1e-4 * eps]
    if wrong:
        raise CaffeModelError(f"{path}: its BatchNorm eps is {eps:g}, the model's {wrong[0]:g}: build the model "
                              f"with bn_epsilon={eps:g}")


def _head_targets(path, info, model, heads):
    """{caffe name: keras layer} of the file's head, after checking it against the model's (classes, rates,
    pool5a)."""
    head_targets = {}
    if not info.get("head"):
        classifiers = ", ".join(map(info["display"], info["classifiers"]))
        what = (f"its classifier {classifiers} is not a DeepLab v2 ASPP/LargeFOV head" if classifiers
                else "it has no classifier head (a backbone-only init, or a truncated file?)")
        raise CaffeModelError(f"{path}: {what}; load its backbone only (backbone_only=True, --backbone-only) "
                              "and train a fresh head")
    if int(info["num_classes"]) != model.num_classes:
        raise CaffeModelError(f"{path} holds a {info['num_classes']}-class head ({describe_head(info)}); the "
                              f"model has {model.num_classes} classes: use num_classes={info['num_classes']}, or "
                              "backbone_only=True for a fresh head")
    rates = info["rates"] or tuple(sorted(heads))[:len(info["head"])]
    if sorted(rates) != sorted(heads):
        raise CaffeModelError(f"{path} has ASPP branches with rates {tuple(rates)}; the model's are "
                              f"{tuple(sorted(heads))}: build it with aspp={_aspp_kwarg(info)!r}")
    for rate, branch in zip(rates, info["head"]):
        head_targets.update({layer.name: heads[rate][position] for position, layer in branch.items()})
    if info["backbone"] == "vgg16":
        model_pool5a = any(layer.name.endswith("pool5a") for layer in model.network.layers)
        if model_pool5a != info["pool5a"]:
            raise CaffeModelError(f"{path} {'has' if info['pool5a'] else 'has no'} pool5a (AVE 3x3 pooling "
                                  f"after pool5); build the model with pool5a={info['pool5a']}")
    return head_targets


def _plan(model, scan, backbone_only):
    """Check the whole file against ``model``; return ({caffe name: (role, keras layer)}, report)."""
    path = scan.path
    info = analyse(scan)
    vgg = info["backbone"] == "vgg16"
    if vgg != (model.backbone == "vgg16"):
        raise CaffeModelError(f"{path} holds a {info['backbone']} backbone; the model is a {model.backbone}: "
                              f"build it with backbone={info['backbone']!r}")
    if not vgg:
        blocks = info["stage_blocks"] or RESNET_BLOCKS[info["backbone"]]
        model_blocks = tuple(model.stage_blocks or RESNET_BLOCKS[model.backbone])
        if model_blocks != blocks:
            raise CaffeModelError(f"{path} holds a ResNet with {blocks} blocks per stage (conv2..conv5), the model "
                                  f"{model_blocks}: build it with "
                                  + (f"backbone={info['backbone']!r}" if not info["stage_blocks"]
                                     else f"stage_blocks={blocks}"))
    has_head = bool(info.get("head"))
    targets, heads = _weighted_layers(model, with_head=not backbone_only)
    head_targets = {} if backbone_only else _head_targets(path, info, model, heads)
    plan, ignored = {}, []
    for name, (kind, key) in info["roles"].items():  # file order
        if kind in ("head", "classifier"):
            if name in head_targets:
                plan[name] = ("conv", head_targets[name])
            else:
                ignored.append(name)
            continue
        if key not in targets:
            raise CaffeModelError(f"{path}: layer {scan.display(name)} has no counterpart {key} in the model; build "
                                  "the model the file was made for (see caffemodel_config)")
        plan[name] = (kind, targets[key])
    for caffe in scan.layers:  # every copy of a name the file repeats is checked, not only the last
        if caffe.blobs and caffe.name in plan:
            role, layer = plan[caffe.name]
            _check_fits(path, scan.display(caffe.name), caffe.blobs, role, layer)
    _check_finite(scan, plan)
    if info["backbone"] != "vgg16":
        _check_eps(path, info, targets)
    filled = {(layer.name, role) for role, layer in plan.values()}
    missing = [name for name, layer in targets.items()
               if (name, "conv" if hasattr(layer, "kernel") else "bn") not in filled]
    if missing:
        raise CaffeModelError(f"{path} has no weights for {len(missing)} of the model's layers "
                              f"({', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}); the file may be "
                              "truncated or made for another network")
    report = {"source": path, "backbone": info["backbone"], "num_classes": info.get("num_classes"),
              "aspp": _aspp_kwarg(info) if has_head else None, "head": "fresh" if backbone_only else "loaded",
              "loaded": list(plan), "keras_layers": len({layer.name for _, layer in plan.values()}),
              "msc_copies": info["msc_copies"], "ignored": ignored,
              "zero_bias": sorted(layer.name for name, (role, layer) in plan.items() if role == "conv"
                                  and layer.bias is not None and len(info["layers"][name].blobs) == 1),
              "bn_without_scale": sorted(n for n, layer in targets.items()
                                         if hasattr(layer, "moving_mean") and (n, "scale") not in filled)}
    for key in ("pool5a", "bn_epsilon"):
        if key in info:
            report[key] = info[key]
    return plan, report


def _assign(role, layer, blobs):
    """Write one Caffe layer's blobs into its Keras layer (conversions as in the module docstring)."""
    if role == "conv":
        layer.kernel.assign(np.transpose(blobs[0], (2, 3, 1, 0)))
        if layer.bias is not None:
            layer.bias.assign(blobs[1].reshape(-1) if len(blobs) > 1 else np.zeros(layer.bias.shape, np.float32))
    elif role == "bn":  # Caffe: statistics * (0 if s == 0 else 1 / s)
        mean, var = bn_statistics(blobs)
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(var)
    else:
        layer.gamma.assign(blobs[0].reshape(-1))
        layer.beta.assign(blobs[1].reshape(-1) if len(blobs) > 1 else np.zeros(layer.beta.shape, np.float32))


def load_scan(model, scan, backbone_only=False):
    """Check ``scan`` (see :func:`scan_weights`) against ``model``, then load its weights; see
    :func:`load_caffemodel`."""
    plan, report = _plan(model, scan, backbone_only)
    for layer in scan.source():
        if layer.name in plan:
            role, target = plan[layer.name]
            _assign(role, target, layer.blobs)
    for name in report["bn_without_scale"]:  # Caffe BatchNorm without a Scale layer: identity affine
        layer = model.network.get_layer(name)
        layer.gamma.assign(np.ones(layer.gamma.shape, np.float32))
        layer.beta.assign(np.zeros(layer.beta.shape, np.float32))
    return report
