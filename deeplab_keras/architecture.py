"""The architecture constants and checks that the backbones, layers and :class:`~deeplab_keras.ModelConfig`
share: backbone names, ResNet block counts, output strides, Caffe's BatchNorm epsilon, ASPP rates, Caffe
``Interp`` factors and the smallest input. Standard library only (no Keras, no TensorFlow): the lowest module
of the package, imported by ``backbones/``, ``layers/`` and ``models/config.py``."""
import fractions

BACKBONES = ("resnet50", "resnet101", "vgg16")
OUTPUT_STRIDES = (8, 16, 32)
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
CAFFE_BN_EPSILON = 1e-5
ASPP_RATES = {"S": (2, 4, 8, 12), "L": (6, 12, 18, 24), "LARGEFOV": (12,)}
MIN_INPUT_SIZE = 33


def check_output_stride(output_stride):
    """Raise ValueError unless ``output_stride`` is 8, 16 or 32."""
    if output_stride not in OUTPUT_STRIDES or isinstance(output_stride, bool):
        raise ValueError(f"output_stride={output_stride!r} is not supported; use one of {OUTPUT_STRIDES} "
                         "(8 = the paper's dense setting, 32 = the plain ImageNet network)")


def resolve_rates(aspp):
    """Turn ``"L"``, ``"S"``, ``"largefov"`` or a tuple of positive ints into a tuple of rates.

    Raises:
        ValueError: naming ``aspp`` and the allowed values.

    Example:
        >>> resolve_rates("S")
        (2, 4, 8, 12)
    """
    if isinstance(aspp, str):
        key = aspp.upper()
        if key not in ASPP_RATES:
            raise ValueError(f"aspp={aspp!r} is not known; use 'L' {ASPP_RATES['L']}, 'S' {ASPP_RATES['S']}, "
                             f"'largefov' (VGG-16 only) or a tuple of positive dilation rates")
        return ASPP_RATES[key]
    try:
        rates = tuple(int(r) for r in aspp)
    except (TypeError, ValueError):
        raise ValueError(f"aspp={aspp!r} must be 'L', 'S', 'largefov' or a tuple of positive ints") from None
    if not rates or any(r < 1 for r in rates) or any(isinstance(a, bool) or r != float(a) for r, a in zip(rates, aspp)):
        raise ValueError(f"aspp={aspp!r}: give a non-empty tuple of positive integer dilation rates, "
                         "e.g. (6, 12, 18, 24)")
    return rates


def interp_factors(scale):
    """Caffe ``Interp`` (zoom_factor, shrink_factor) of a scale: 0.75 -> (3, 4), 0.5 -> (1, 2), 1.5 -> (3, 2).

    Raises:
        ValueError: ``scale`` is not positive or not a ratio of small integers (denominator <= 16).

    Example:
        >>> interp_factors(0.75)
        (3, 4)
    """
    frac = fractions.Fraction(float(scale)).limit_denominator(16)
    if scale <= 0 or abs(float(frac) - float(scale)) > 1e-9:
        raise ValueError(f"scale={scale!r}: use a positive ratio of small integers such as 0.75 or 0.5 "
                         "(Caffe's Interp resizes by zoom/shrink factors)")
    return frac.numerator, frac.denominator
