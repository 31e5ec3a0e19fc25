"""Inference precision: float32, or bfloat16 through oneDNN on CPUs that compute it natively.

``precision="bf16"`` (``--precision bf16`` of ``deeplab eval`` / ``deeplab predict``, ``precision=`` of
:class:`deeplab_keras.inference.Predictor`, :func:`~deeplab_keras.inference.predict_probabilities`,
:func:`deeplab_keras.evaluate.evaluate` and :func:`deeplab_keras.predict.predict_files`) runs a copy of the model
built under Keras's ``"bfloat16"`` dtype policy: weights stored and every layer computed in bfloat16, which
TensorFlow's oneDNN kernels run with the CPU's ``avx512_bf16`` (``VDPBF16PS``) or AMX instructions. The logits are
cast back to float32 before the resize and softmax, so probabilities and labels come out as with float32 (in
:class:`~deeplab_keras.inference.Predictor`'s rewritten graph the copy's convolutions read the float32 model's
current weights, batch norm folded in float32 and rounded to bfloat16 once: the copy's own weights are not used). A CPU
without those instructions would emulate bfloat16 slower than float32, so ``bf16`` is refused there with one line
(:func:`check_precision` reads the flags of ``/proc/cpuinfo``).

Measured here (2-core AMD EPYC with ``avx512_bf16``, ResNet-101 ASPP-L; ``benchmarks/precision.py`` has the
method and ``README.md`` the numbers): 0.4-0.6x the float32 time at 321-513 px; the labels of a trained model agree
with float32's on 99.96 % of the pixels, those of a network with synthetic weights (near-tied logits) much less
(77 % on the converted test file; torch's bfloat16 autocast alike): check a model's agreement before relying on it.

Training under ``runtime.precision: mixed_bfloat16`` (float32 weights, bfloat16 compute) uses the same kernels; it
is accepted on every machine (TPUs are its first home) and measured by ``benchmarks/network.py``'s ``train_bf16``
rows.

Example:
    >>> check_precision("float32")
    'float32'
    >>> fast = with_precision(model, "bf16")             # doctest: +SKIP
"""
import numpy as np

__all__ = ["PRECISIONS", "BF16_CPU_FLAGS", "cpu_flags", "bf16_supported", "check_precision", "with_precision"]

PRECISIONS = ("float32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the native bfloat16 instructions
CPUINFO = "/proc/cpuinfo"


def cpu_flags(path=CPUINFO):
    """The CPU's feature flags (``flags`` lines of ``/proc/cpuinfo``); empty where the file cannot be read."""
    try:
        with open(path) as f:
            return frozenset(word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def bf16_supported(flags=None):
    """True when the CPU computes bfloat16 natively (``avx512_bf16`` or AMX), from ``flags`` or :func:`cpu_flags`."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def check_precision(precision, flags=None):
    """``precision`` checked: ``"float32"`` (also for None) or ``"bf16"`` on a CPU that has it.

    Args:
        precision: None, "float32" or "bf16".
        flags: the CPU flags to check (default :func:`cpu_flags`).

    Raises:
        ValueError: an unknown precision, or "bf16" on a CPU without ``avx512_bf16`` / AMX (one line that says so).

    Example:
        >>> check_precision("bf16", flags={"avx2"})
        Traceback (most recent call last):
        ...
        ValueError: bf16 needs a CPU with avx512_bf16 or amx_bf16 (neither is in /proc/cpuinfo); use float32
    """
    precision = "float32" if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(flags):
        raise ValueError(f"bf16 needs a CPU with {' or '.join(BF16_CPU_FLAGS)} (neither is in {CPUINFO}); use float32")
    return precision


def with_precision(model, precision="float32"):
    """``model`` for inference at ``precision``: the model itself for float32, else a bfloat16 copy.

    The copy is rebuilt from ``model.get_config()`` under the ``"bfloat16"`` dtype policy, with the weights cast
    to bfloat16 (a model trained under ``mixed_bfloat16`` or ``mixed_float16`` works too). Its logits are
    bfloat16: :class:`deeplab_keras.inference.Predictor` casts them to float32.

    Args:
        model: a Keras DeepLab model.
        precision: None, "float32" or "bf16" (checked by :func:`check_precision`).

    Returns:
        a Keras model.

    Example:
        >>> fast = with_precision(dk.DeepLabV2(21, "resnet101"), "bf16")    # doctest: +SKIP
        >>> fast.dtype_policy.name                                           # doctest: +SKIP
        'bfloat16'
    """
    import keras

    if check_precision(precision) == "float32":
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("bfloat16")
    try:
        copy = model.__class__.from_config(model.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights([np.asarray(w) for w in model.get_weights()])  # Keras casts each to its variable's dtype
    return copy
