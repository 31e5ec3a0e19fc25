"""An independent PyTorch DeepLab v2 (ResNet-50/101 + ASPP, the released Caffe models' geometry): the peer that
``benchmarks/network.py`` and ``benchmarks/precision.py`` time the package against. Benchmarks only; torch comes
from the optional ``benchmarks/requirements.txt`` and is never a dependency of the package or its tests.

The network, written here from the paper and the Caffe prototxt's geometry (not ported from another code base):
RGB 0..255 -> BGR minus DeepLab's mean; conv1 7x7/2 pad 3, batch norm, ReLU; pool1 MAX 3x3/2 pad 1 with Caffe's
ceil rounding (``ceil_mode=True`` drops the last window when it would start in the padding, Caffe's rule too);
bottleneck v1 blocks (stride on the first 1x1 conv and the shortcut); output stride 8: conv4 dilation 2, conv5
dilation 4; ASPP: one 3x3 convolution per rate (L: 6, 12, 18, 24) straight to the classes, summed. Batch norm
is frozen (``eval`` mode, no gradients for its parameters): the DeepLab v2 recipe; inference folds it into the
convolutions (:func:`fused_for_inference`). Tensors stay NCHW: channels-last
measured 3x slower here (torch 2.13, ResNet-101 at 321, batch 1: 12.0 s vs 3.9 s on a loaded 2-core machine).

The layer names follow the Keras model's (``conv4_block7_2_conv``, ``aspp_r12_conv``), so
:func:`load_keras_weights` copies a ``deeplab_keras`` model's weights by name and the two give the same logits
(``tests/test_benchmarks.py`` checks it on a tiny model): the peer is the same network, not a look-alike.

Example:
    >>> import torch
    >>> net = DeepLabV2Torch(21, "resnet101").eval()
    >>> logits = net(torch.zeros(1, 3, 513, 513))          # doctest: +SKIP
    >>> tuple(logits.shape)                                 # doctest: +SKIP
    (1, 21, 65, 65)
"""
import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

MEAN_BGR = (104.008, 116.669, 122.675)
BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
ASPP_RATES = {"L": (6, 12, 18, 24), "S": (2, 4, 8, 12)}
# (filters, stride, dilation) of conv2..conv5 at output stride 8
STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))


class _ConvBN(nn.Module):
    """Convolution (with bias, as the Keras layers) + frozen batch norm; ``relu`` after it when asked."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, relu=True, eps=1e-5):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class _Bottleneck(nn.Module):
    def __init__(self, cin, filters, stride, dilation, shortcut, eps):
        super().__init__()
        self.branch0 = _ConvBN(cin, 4 * filters, 1, stride, relu=False, eps=eps) if shortcut else None
        self.branch1 = _ConvBN(cin, filters, 1, stride, eps=eps)
        self.branch2 = _ConvBN(filters, filters, 3, 1, dilation, eps=eps)
        self.branch3 = _ConvBN(filters, 4 * filters, 1, relu=False, eps=eps)

    def forward(self, x):
        shortcut = x if self.branch0 is None else self.branch0(x)
        return F.relu(shortcut + self.branch3(self.branch2(self.branch1(x))))


class DeepLabV2Torch(nn.Module):
    """DeepLab v2 in PyTorch: float RGB 0..255 ``[N, 3, H, W]`` in, logits ``[N, C, h, w]`` at output stride 8.

    Args:
        num_classes: classes of the ASPP classifier.
        depth: "resnet50" or "resnet101".
        aspp: "L", "S" or a tuple of rates.
        width_multiplier: scales every backbone width (1.0: the paper; the tests use 0.125).
        stage_blocks: blocks per stage (default the depth's).
        eps: batch-norm epsilon (Caffe's 1e-5).

    Example:
        >>> net = DeepLabV2Torch(21, "resnet50", width_multiplier=0.125, stage_blocks=(1, 1, 1, 1))
        >>> tuple(net.eval()(torch.zeros(1, 3, 65, 65)).shape)
        (1, 21, 9, 9)
    """

    def __init__(self, num_classes=21, depth="resnet101", aspp="L", width_multiplier=1.0, stage_blocks=None,
                 eps=1e-5):
        super().__init__()
        width = lambda f: max(1, int(round(f * width_multiplier)))  # noqa: E731 (the Keras models' rounding)
        self.register_buffer("mean", torch.tensor(MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        self.conv1 = _ConvBN(3, width(64), 7, 2, eps=eps)
        self.blocks = nn.ModuleDict()
        cin = width(64)
        for stage, ((filters, stride, dilation), n) in enumerate(zip(STAGES, stage_blocks or BLOCKS[depth]), 2):
            for i in range(1, n + 1):
                self.blocks[f"conv{stage}_block{i}"] = _Bottleneck(cin, width(filters), stride if i == 1 else 1,
                                                                   dilation, i == 1, eps)
                cin = 4 * width(filters)
        rates = ASPP_RATES[aspp] if isinstance(aspp, str) else tuple(aspp)
        self.aspp = nn.ModuleDict({f"aspp_r{r}_conv": nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r)
                                   for r in rates})

    def forward(self, images):
        x = images.flip(1) - self.mean  # RGB -> BGR minus the mean
        x = F.max_pool2d(self.conv1(x), 3, 2, padding=1, ceil_mode=True)
        for block in self.blocks.values():
            x = block(x)
        return sum(conv(x) for conv in self.aspp.values())

    def train(self, mode=True):
        """Training mode with batch norm frozen (always ``eval``; its parameters get no gradients)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        return self


def _named_conv_bn(net):
    """``{keras layer name: torch module}`` for every convolution and batch norm of ``net``."""
    names = {"conv1_conv": net.conv1.conv, "conv1_bn": net.conv1.bn}
    for block_name, block in net.blocks.items():
        for k in range(4):
            unit = getattr(block, f"branch{k}")
            if unit is not None:
                names[f"{block_name}_{k}_conv"], names[f"{block_name}_{k}_bn"] = unit.conv, unit.bn
    names.update(net.aspp.items())
    return names


def load_keras_weights(net, weights_of):
    """Copies weights into ``net`` by the Keras layer names.

    Args:
        net: a :class:`DeepLabV2Torch` of the same architecture.
        weights_of: callable ``name -> list of numpy arrays`` (Keras order: conv kernel HWIO + bias; batch norm
            gamma, beta, moving mean, moving variance), e.g. ``lambda n: keras_net.get_layer(n).get_weights()``.
    Returns:
        ``net``.

    Example:
        >>> load_keras_weights(net, lambda n: model.network.get_layer(n).get_weights())   # doctest: +SKIP
    """
    with torch.no_grad():
        for name, module in _named_conv_bn(net).items():
            arrays = [torch.from_numpy(a.copy()) for a in weights_of(name)]
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(arrays[0].permute(3, 2, 0, 1))
                module.bias.copy_(arrays[1])
            else:
                for target, value in zip((module.weight, module.bias, module.running_mean, module.running_var), arrays):
                    target.copy_(value)
    return net


def fused_for_inference(net):
    """A copy of ``net`` (eval mode) with every batch norm folded into its convolution: the same logits to float32
    rounding, ~12 % faster here (ResNet-101 at 321 px), as TF's graph optimiser does for the Keras model."""
    fused = copy.deepcopy(net).eval()
    for unit in fused.modules():
        if isinstance(unit, _ConvBN):
            unit.conv, unit.bn = fuse_conv_bn_eval(unit.conv, unit.bn), nn.Identity()
    return fused


def inference_fn(net, dtype=torch.float32):
    """``run(images uint8/float [N, H, W, 3] numpy) -> labels int64 [N, H, W] numpy``: the exported computation of
    ``deeplab-export`` (logits -> corner-aligned resize -> softmax -> argmax) under ``torch.inference_mode``, on
    :func:`fused_for_inference` of ``net``; ``dtype=torch.bfloat16`` runs the network under CPU autocast."""
    net = fused_for_inference(net)

    def run(images):
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = net(x)
            full = F.interpolate(logits.float(), size=x.shape[2:], mode="bilinear", align_corners=True)
            return full.softmax(1).argmax(1).numpy()
    return run


def train_step_fn(net, lr=2.5e-4, momentum=0.9, weight_decay=5e-4, classifier_lr_mult=10.0):
    """``step(images float [N, H, W, 3], labels uint8 [N, H, W]) -> loss``: one SGD step of the DeepLab v2 recipe as
    the package's trainer runs it: logits resized (corner-aligned) to the labels, mean cross-entropy over the pixels
    that are not 255, L2 ``weight_decay / 2 * sum(w^2)`` on the convolution kernels, momentum SGD with the ASPP
    classifier at ``classifier_lr_mult`` x the learning rate, batch norm frozen."""
    net = net.train()
    head = [p for p in net.aspp.parameters()]
    body = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("aspp.")]
    optimizer = torch.optim.SGD([{"params": body}, {"params": head, "lr": lr * classifier_lr_mult}], lr=lr,
                                momentum=momentum)
    kernels = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]

    def step(images, labels):
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(labels).long()
        optimizer.zero_grad(set_to_none=True)
        logits = F.interpolate(net(x), size=y.shape[1:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        loss = loss + 0.5 * weight_decay * sum(k.square().sum() for k in kernels)
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    return step
