"""Helpers shared by the backbones."""

OUTPUT_STRIDES = (8, 16, 32)


def check_output_stride(output_stride):
    """Raise ValueError unless ``output_stride`` is 8, 16 or 32."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride!r} is not supported; use one of {OUTPUT_STRIDES} "
                         "(8 = the paper's dense setting, 32 = the plain ImageNet network)")


def strides_and_dilations(output_stride, num_stages):
    """Per-stage (stride, dilation) for the last ``num_stages`` downsampling stages, as in DeepLab / timm.

    A stage that would push the stride past ``output_stride`` keeps stride 1 and multiplies the dilation by 2
    instead, so every later stage sees the field of view it had in the ImageNet network.

    Args:
        output_stride: 8, 16 or 32.
        num_stages: number of stride-2 stages that follow the stride-4 stem (3 for ResNet: conv3..conv5).

    Returns:
        list of ``(stride, dilation)`` tuples, one per stage.

    Example:
        >>> strides_and_dilations(8, 3)
        [(2, 1), (1, 2), (1, 4)]
    """
    check_output_stride(output_stride)
    stride_so_far, dilation, out = 4, 1, []
    for _ in range(num_stages):
        if stride_so_far * 2 > output_stride:
            dilation *= 2
            out.append((1, dilation))
        else:
            stride_so_far *= 2
            out.append((2, dilation))
    return out


def scaled(filters, width_multiplier):
    """Channel count scaled by ``width_multiplier`` (at least 1)."""
    return max(1, int(round(filters * width_multiplier)))
