"""ONNX export through tf2onnx, verified with onnxruntime.

The graph takes ``image`` float32 ``[N, H, W, 3]`` RGB 0..255 (NHWC like the Keras model; tf2onnx moves the layout
transposes to the graph edges) with a dynamic batch, and gives ``labels`` int32 ``[N, H, W]`` + ``probabilities``
float32 ``[N, H, W, C]`` (or ``logits``). ``input_size=(H, W)`` fixes H and W: TensorFlow then traces each atrous
convolution as one ``Conv2D`` with dilations, which becomes a single ONNX ``Conv`` with ``dilations``; with dynamic
H, W it is traced as SpaceToBatchND/Conv2D/BatchToSpaceND and tf2onnx emits a much larger graph (pads,
SpaceToDepth, DepthToSpace and shape arithmetic); the serving graph (``graph_rewrite.GraphRewrite``) traces native
dilated convolutions instead, so every atrous convolution is one dilated ``Conv`` at any size, with batch norm folded
in. ``node_stats`` reports the counts.

``quantize="int8"``: static QDQ quantization with ``onnxruntime.quantization`` (per-channel int8 weights, uint8
activations, MinMax calibration on ``representative`` images or a synthetic set) of the ``Conv`` and ``MatMul``
nodes; the resize, softmax and argmax stay float32. onnxruntime runs the QDQ pairs as integer convolutions (VNNI
where the CPU has it).

Example:
    >>> report = export_onnx(model, "deeplab.onnx", input_size=(513, 513))  # doctest: +SKIP
"""
import collections
import os

import numpy as np
import tensorflow as tf

from deeplab_keras import _keras_compat
from deeplab_keras.export import driver, serving
from deeplab_keras.export.errors import ExportError

DEFAULT_OPSET = 17
MIN_OPSET = 13
QUANTIZE_MODES = ("none", "int8")


def convert(model, input_size=None, outputs="full", opset=DEFAULT_OPSET, crf=None, rewrite=None):
    """Converts ``model`` to an ``onnx.ModelProto``.

    Args:
        model: float32 Keras model.
        input_size: ``(H, W)`` static spatial size, or None for dynamic.
        outputs: ``"full"`` or ``"logits"``.
        opset: ONNX opset (>= 13).
        crf: optional stock-TF-op refinement.
        rewrite: optional ``graph_rewrite.GraphRewrite`` of ``model`` (native dilated ``Conv`` also at a dynamic size).
    """
    import tf2onnx

    if int(opset) < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET}, got {opset}")
    _keras_compat.patch_tf2onnx()  # tf2onnx 1.17 still uses np.object / np.cast (removed in numpy 2)
    height, width = input_size if input_size else (None, None)
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="image")
    _, functions = serving.serving_archive(model, {"serve": (spec, None)}, outputs, crf, rewrite)
    proto, _ = tf2onnx.convert.from_function(functions["serve"], input_signature=[spec], opset=int(opset))
    softmax_on_last_axis(proto)
    return proto


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over float32 images, one per ``get_next``; ``set_range``
    lets ``quantize_static`` collect the ranges one image at a time (``CalibStridedMinMax``: the intermediate
    tensors of one image in memory, not of all)."""

    def __init__(self, images):
        self.images = np.asarray(images, np.float32)
        self.set_range(0, len(self.images))

    def __len__(self):
        return len(self.images)

    def set_range(self, start_index, end_index):
        self.pending = iter(self.images[start_index:end_index])

    def get_next(self):
        image = next(self.pending, None)
        return None if image is None else {"image": image[None]}


def quantize_int8(proto, representative, workdir):
    """Static QDQ int8 quantization of an ONNX DeepLab export (``Conv``/``MatMul`` nodes) calibrated on
    ``representative`` (float32 ``[N, H, W, 3]``, 0..255); returns the quantized ``onnx.ModelProto``.

    Example:
        >>> quantized = quantize_int8(convert(model, (513, 513)), images, "/tmp/work")   # doctest: +SKIP
    """
    import onnx
    from onnxruntime import quantization

    if representative is None or not len(representative):
        raise ExportError("int8 quantization needs representative images")
    source, target = os.path.join(workdir, "float.onnx"), os.path.join(workdir, "int8.onnx")
    onnx.save(proto, source)
    try:
        quantization.quantize_static(
            source, target, _Calibration(representative), quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul"], per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax, extra_options={"CalibStridedMinMax": 1})
        return onnx.load(target)
    finally:
        for path in (source, target, source + ".data"):
            if os.path.exists(path):
                os.remove(path)


def _attr(node, name, default=None):
    for attr in node.attribute:
        if attr.name == name:
            import onnx
            return onnx.helper.get_attribute_value(attr)
    return default


def _toposort(graph):
    """Reorders ``graph.node`` so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RuntimeError("ONNX graph has a cycle or a dangling input after the softmax rewrite")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def softmax_on_last_axis(proto):
    """Moves the NCHW -> NHWC ``Transpose`` that follows ``Softmax(axis=1)`` in front of it (in place).

    tf2onnx's transpose optimizer pushes the layout transpose past the softmax, so onnxruntime computes the
    softmax over axis 1 of an NCHW tensor, about 10x slower than over the last axis (measured: 306 ms vs 27 ms
    for 513x513x21). Rewritten: ``Transpose(0,2,3,1) -> Softmax(axis=-1)``; an ``ArgMax(axis=1)`` of the same
    tensor reads the transposed one with ``axis=3``. Same values; the export's verification checks them.

    Returns:
        the number of softmax nodes rewritten.
    """
    import onnx

    graph = proto.graph
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    rewritten = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        users = consumers[softmax.output[0]]
        if _attr(softmax, "axis") != 1 or len(users) != 1 or users[0].op_type != "Transpose" or \
                list(_attr(users[0], "perm", [])) != [0, 2, 3, 1]:
            continue
        transpose, source = users[0], softmax.input[0]
        nhwc = source + "__nhwc"
        new_nodes = [onnx.helper.make_node("Transpose", [source], [nhwc], perm=[0, 2, 3, 1],
                                           name=transpose.name + "__before_softmax"),
                     onnx.helper.make_node("Softmax", [nhwc], [transpose.output[0]], axis=-1,
                                           name=softmax.name)]
        for argmax in consumers[source]:
            if argmax.op_type == "ArgMax" and _attr(argmax, "axis") == 1 and _attr(argmax, "keepdims", 1) == 0:
                argmax.input[0] = nhwc
                for attr in argmax.attribute:
                    if attr.name == "axis":
                        attr.i = 3
        graph.node.remove(softmax)
        graph.node.remove(transpose)
        graph.node.extend(new_nodes)
        rewritten += 1
    if rewritten:
        _toposort(graph)
    return rewritten


def node_stats(proto):
    """Node counts of an ONNX graph: total, by op type, Conv nodes, and Conv nodes with dilation > 1.

    ``dilated_convs_single_node`` is True when atrous convolutions are single ``Conv`` nodes (no
    SpaceToDepth/DepthToSpace emulation).
    """
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    dilated = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            for attr in node.attribute:
                if attr.name == "dilations" and any(d > 1 for d in attr.ints):
                    dilated += 1
    emulated = counts.get("SpaceToDepth", 0) + counts.get("DepthToSpace", 0)
    return {"nodes": int(sum(counts.values())), "by_op": dict(sorted(counts.items())),
            "conv_nodes": int(counts.get("Conv", 0)), "dilated_conv_nodes": dilated,
            "space_to_depth_nodes": int(emulated), "dilated_convs_single_node": dilated > 0 and emulated == 0}


def make_session(path, num_threads=None, allow_spinning=False):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (a file or serialized bytes).

    ``allow_spinning=False`` lets idle worker threads sleep instead of busy-waiting between operators: on a machine
    whose cores are shared (measured on 2 shared cores, ResNet-101 513x513: 2.16 s vs 2.73 s best of 7, CPU time
    2.26 vs 2.71 s) it is faster; on dedicated cores spinning can save a little latency.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, images, batch_size=None):
    """Runs an ONNX DeepLab export on ``images`` (``[N, H, W, 3]`` 0..255); dict of numpy outputs."""
    images = np.asarray(images, np.float32)
    batch_size = batch_size or len(images)
    names = [o.name for o in session.get_outputs()]
    parts = []
    for start in range(0, len(images), batch_size):
        values = session.run(names, {"image": images[start:start + batch_size]})
        parts.append(dict(zip(names, values)))
    return {k: np.concatenate([p[k] for p in parts]) for k in names}


@driver.register
class ONNXFormat(driver.FileFormat):
    """``export_model`` hooks for an ``.onnx`` file (see ``export_onnx``)."""
    name = "onnx"
    options = {"opset": DEFAULT_OPSET, "input_size": None, "outputs": "full", "aspp_head": "plain",
               "fold_batch_norm": True, "quantize": "none", "representative": None, "num_calibration": 16}
    crf_runtime = "onnx"
    what, suffix = "ONNX file", ".onnx"
    verify_message = "verifying with onnxruntime"

    @property
    def precision(self):
        return "int8" if self.int8 else "float32"

    @property
    def convert_step(self):
        return "convert_s", (f"converting to ONNX with tf2onnx (opset {self.opts['opset']}, input size "
                             f"{self.input_size_text}{', int8 QDQ' if self.int8 else ''})")

    def check(self):
        super().check()
        if int(self.opts["opset"]) < MIN_OPSET:
            raise ExportError(f"--opset must be >= {MIN_OPSET}, got {self.opts['opset']}")
        if self.opts["quantize"] not in QUANTIZE_MODES:
            raise ExportError(f"--quantize for --format onnx must be one of {QUANTIZE_MODES}, got "
                                     f"{self.opts['quantize']!r} (float16 / dynamic: --format tflite)")

    def convert(self, model, stage_dir, final):
        o = self.opts
        proto = convert(model, o["input_size"], o["outputs"], o["opset"], self.crf, self.rewrite)
        if self.int8:
            proto = quantize_int8(proto, self.calibration, stage_dir)
        staged = os.path.join(stage_dir, os.path.basename(final))
        with open(staged, "wb") as f:
            f.write(proto.SerializeToString())
        self.stats = node_stats(proto)
        self.progress.info(f"ONNX graph: {self.stats['nodes']} nodes, {self.stats['conv_nodes']} Conv "
                           f"({self.stats['dilated_conv_nodes']} with dilations), "
                           f"{self.stats['space_to_depth_nodes']} SpaceToDepth/DepthToSpace")
        return staged

    def runners(self, artifact):
        self.session = make_session(artifact)
        return {"onnxruntime": lambda images: run_onnx(self.session, images)}

    def report_fields(self, artifact):
        import onnx
        import onnxruntime

        return {**super().report_fields(artifact), "opset": int(self.opts["opset"]),
                "quantize": self.opts["quantize"], **self.calibration_fields(),
                "inputs": {i.name: {"shape": i.shape, "type": i.type} for i in self.session.get_inputs()},
                "output_names": [o.name for o in self.session.get_outputs()], "graph": self.stats,
                "onnx_version": onnx.__version__, "onnxruntime_version": onnxruntime.__version__}

    def close(self):
        self.session = None


def export_onnx(model, out, opset=DEFAULT_OPSET, input_size=None, outputs="full", crf=None, overwrite=False,
                sample_dir=None, num_samples=4, verify_size=(97, 129), tolerance=None, report_path=None,
                progress=None, quantize="none", representative=None, num_calibration=16, **graph_options):
    """Exports ``model`` to a verified ``.onnx`` file (``driver.export_model``).

    Args:
        model: Keras model (RGB 0..255 in, logits out); mixed precision is exported as float32.
        out: ``.onnx`` file path.
        opset: ONNX opset, >= 13 (default 17).
        input_size: ``(H, W)`` static spatial size, or None for dynamic (both: single dilated Conv nodes).
        outputs: ``"full"`` or ``"logits"``.
        crf: optional stock-TF-op refinement ``crf(probabilities, images) -> probabilities``.
        overwrite: replace an existing file.
        sample_dir: folder of verification images (default synthetic).
        num_samples: number of verification images (run as one batch: checks the dynamic batch).
        verify_size: ``(H, W)`` of verification images when ``input_size`` is None.
        tolerance: ``verify.Tolerance`` (default ``verify.TOLERANCES["float32"]``: max |diff| 1e-4 or 4x the
            model's measured float32 sensitivity, times the CRF's measured amplification with ``crf``; 99.9 %
            labels).
        report_path: JSON report path (default ``<out>.report.json``).
        progress: ``report.Progress`` (default silent).
        quantize: ``"none"`` or ``"int8"`` (static QDQ, see ``quantize_int8``; verified by label agreement only).
        representative: folder of int8 calibration images (default synthetic, with a warning).
        num_calibration: number of calibration images.
        **graph_options: ``aspp_head`` (``"plain"`` or ``"fused"``), ``fold_batch_norm``
            (``graph_rewrite.GraphRewrite``).
    Returns:
        the report dict.
    Raises:
        ExportError: bad arguments or destination; verify.VerificationError: out of tolerance.
    """
    return driver.export_model(model, "onnx", out, opset=opset, input_size=input_size, outputs=outputs, crf=crf,
                               overwrite=overwrite, sample_dir=sample_dir, num_samples=num_samples,
                               verify_size=verify_size, tolerance=tolerance, report_path=report_path,
                               progress=progress, quantize=quantize, representative=representative,
                               num_calibration=num_calibration, **graph_options)
