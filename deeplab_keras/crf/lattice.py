"""The permutohedral lattice of the portable dense CRF (:mod:`deeplab_keras.crf.portable`) in stock TF ops,
and the two kernels its mean-field inference filters with (:class:`LatticeKernel`, :class:`SeparableKernel`).

Why a permutohedral lattice, and how it is made of stock ops:

* The filter is the permutohedral lattice of Adams et al. (2010) exactly as densecrf builds it (elevation,
  nearest remainder-0 point, rank with densecrf's tie rule, barycentric weights, the ``[1/2, 1, 1/2]`` blur
  along the d+1 lattice axes, the ``1 / (1 + 2^-d)`` slice scale), for the 5-D bilateral kernel and, by
  default, the 2-D Gaussian one. So it reproduces pydensecrf up to float summation order (measured on the
  VOC samples at DeepLab's defaults: 100 % labels, max |diff| ~1e-5), instead of adding a second
  approximation on top of the lattice's (a downsampled bilateral grid, or an exact brute-force Gaussian,
  would differ from the reference by its own error, or cost O((HW)^2)).
* densecrf's hash table becomes integer keys: a vertex's d coordinates (plus the image index, so one graph
  filters a whole batch) are packed into one int64 with a per-call mixed radix. The (point, corner) keys
  are sorted (one int64 TopK for TF / LiteRT; for ONNX a stable LSD argsort over three 21-bit digits, as
  tf2onnx casts TopK inputs to float32: each digit is a float32-exact multiple of a power of two); runs of
  equal keys are the vertices. Blur
  neighbours (key +- the lattice axis offsets) are found by a branch-free binary search over the sorted
  vertex keys (28 unrolled gather/compare steps); a missing neighbour reads a zero row. Blur and slice are
  ``tf.gather``. Splat has three forms (``splat=``, picked by ``runtime=``), all exact up to float rounding:
  "cumsum" (default; segment sums of the sorted entries through an int64 fixed-point ``tf.cumsum``, correct
  in every runtime), "scatter" (``tf.tensor_scatter_nd_add``: fastest in TF; onnxruntime's
  ScatterND(reduction="add") loses updates on duplicate indices with more than one thread,
  microsoft/onnxruntime#18048), "segment_sum" (``tf.math.unsorted_segment_sum``: fastest in LiteRT;
  tf2onnx lowers it to a [vertices x largest run] table that exhausts memory on real images).
* Rejected: ``tf.unique`` (exact everywhere, but onnxruntime's Unique takes ~2 s per million keys, 5x its
  TopK), ``tf.searchsorted`` (no LiteRT builtin, no ONNX conversion), ``tf.scatter_nd`` with duplicate
  indices (ONNX ScatterND without reduction keeps one of them).

Example:
    >>> import tensorflow as tf
    >>> features = tf.random.uniform([100, 2]) * 10
    >>> lattice = Lattice(features, tf.zeros([100], tf.int32))
    >>> grid = lattice.splat_blur(tf.ones([100, 1]), lattice.prepare_splat_weights(lattice.weights))
"""
import math

import numpy as np
import tensorflow as tf


def _lattice_coordinates(features):
    """Vertices and barycentric weights of the enclosing simplex of each feature vector.

    Args:
        features: float32 [P, d] feature vectors (already divided by their standard deviations).

    Returns:
        keys: int32 [P, d+1, d], the d stored coordinates of the d+1 vertices of each point's simplex.
        weights: float32 [P, d+1], barycentric weights (sum to 1 per point).
    """
    d = int(features.shape[-1])
    inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    # Elevate onto the hyperplane sum(x) = 0 in d+1 dimensions (Adams et al. 2010, p. 5).
    elevated = [None] * (d + 1)
    sm = tf.zeros_like(features[:, 0])
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        elevated[j] = sm - np.float32(j) * cf
        sm = sm + cf
    elevated[0] = sm
    elevated = tf.stack(elevated, axis=1)  # [P, d+1]
    # Closest remainder-0 lattice point (coordinates are multiples of d+1).
    down = np.float32(1.0 / (d + 1))
    rem0_q = tf.round(elevated * down)  # [P, d+1] float, integral
    rem0 = rem0_q * np.float32(d + 1)
    coord_sum = tf.cast(tf.reduce_sum(rem0_q, axis=1, keepdims=True), tf.int32)  # [P, 1]
    # Rank of each coordinate of the residual in decreasing order (ties: lower index first).
    diff = elevated - rem0
    greater = tf.cast(diff[:, None, :] > diff[:, :, None], tf.int32)  # [p, i, j] = diff_j > diff_i
    greater_eq = tf.cast(diff[:, None, :] >= diff[:, :, None], tf.int32)
    upper = np.triu(np.ones((d + 1, d + 1), np.int32), 1)  # j > i
    lower = np.tril(np.ones((d + 1, d + 1), np.int32), -1)  # j < i
    rank = tf.reduce_sum(greater * upper + greater_eq * lower, axis=2) + coord_sum  # [P, d+1]
    # Bring points whose remainder-0 point is off the plane back onto it.
    wrap = tf.cast(rank < 0, tf.int32) - tf.cast(rank > d, tf.int32)
    rank = rank + wrap * (d + 1)
    rem0 = rem0 + tf.cast(wrap * (d + 1), tf.float32)
    # Barycentric coordinates (Adams et al. 2010, p. 10).
    v = (elevated - rem0) * down  # [P, d+1]
    pos = (d - rank)[:, :, None]  # [P, d+1, 1]
    slots = np.arange(d + 2, dtype=np.int32)[None, None, :]
    bary = tf.reduce_sum(v[:, :, None] * (tf.cast(tf.equal(pos, slots), tf.float32)
                                          - tf.cast(tf.equal(pos + 1, slots), tf.float32)), axis=1)
    first = bary[:, :1] + 1.0 + bary[:, d + 1:]
    weights = tf.concat([first, bary[:, 1:d + 1]], axis=1)  # [P, d+1]
    # Vertex r of the simplex: rem0 + canonical[r][rank], canonical[r][k] = r if k <= d - r else r - (d+1).
    rem0_i = tf.cast(rem0[:, :d], tf.int32)
    rank_d = rank[:, None, :d]  # [P, 1, d]
    r = np.arange(d + 1, dtype=np.int32)[None, :, None]  # [1, d+1, 1]
    keys = rem0_i[:, None, :] + r - (d + 1) * tf.cast(rank_d > d - r, tf.int32)  # [P, d+1, d]
    return keys, weights


def _argsort_int64(keys, native):
    """Stable ascending argsort of non-negative int64 keys < 2^63.

    Args:
        keys: int64 [E].
        native: one int64 TopK (exact in TF and LiteRT). Otherwise (for ONNX: tf2onnx casts TopK inputs to
            float32, which would merge keys above 2^24) sort LSD-first by three 21-bit digits, each kept as
            a float32-exact multiple of a power of two; TopK is stable in all three runtimes.
    """
    if native:
        return tf.argsort(keys, stable=True)
    low = tf.math.floormod(keys, np.int64(1 << 21))
    mid = tf.math.floormod(keys, np.int64(1 << 42)) - low
    digits = [low, mid, keys - mid - low]
    order = None
    for digit in digits:
        values = tf.cast(digit if order is None else tf.gather(digit, order), tf.float32)
        step = tf.argsort(values, stable=True)
        order = step if order is None else tf.gather(order, step)
    return order


def _sorted_lookup(sorted_keys, queries, steps=28):
    """Index of each query in ``sorted_keys`` (ascending, unique) by a branch-free binary search.

    Args:
        sorted_keys: int64 [M], M < 2^steps.
        queries: int64 [Q].

    Returns:
        (index int32 [Q], exists bool [Q]); index is meaningless where exists is False.
    """
    size = tf.shape(sorted_keys)[0]
    pos = tf.zeros_like(queries, dtype=tf.int32)  # number of keys <= query found so far
    for s in reversed(range(steps)):
        candidate = pos + (1 << s)
        probe = tf.gather(sorted_keys, tf.minimum(candidate, size) - 1)
        pos = tf.where(tf.logical_and(candidate <= size, probe <= queries), candidate, pos)
    index = tf.maximum(pos - 1, 0)
    return index, tf.logical_and(pos > 0, tf.equal(tf.gather(sorted_keys, index), queries))


class Lattice:
    """A permutohedral lattice over P feature vectors, numbered with int64 keys (built once per call)."""

    def __init__(self, features, group, splat="cumsum", native_sort=False, check_bits=True):
        """Args:
            features: float32 [P, d] scaled features.
            group: int32 [P] index of the image each point belongs to (points of different images never
                share a vertex).
            splat: "cumsum", "scatter" or "segment_sum" (see ``dense_crf_portable``).
            native_sort: sort int64 keys with one TopK (TF / LiteRT only, see ``_argsort_int64``).
            check_bits: when running eagerly, raise if the packed keys would overflow int64.
        """
        d = int(features.shape[-1])
        self.d = d
        keys, self.weights = _lattice_coordinates(features)
        # Shift every coordinate so that it and its +-d neighbours are >= 0, then pack with a mixed radix.
        shifted = keys - tf.reduce_min(keys, axis=[0, 1]) + (d + 1)  # [P, d+1, d], >= d+1
        radix = tf.cast(tf.reduce_max(shifted, axis=[0, 1]) + (d + 2), tf.int64)  # [d]
        strides = [tf.constant(1, tf.int64)]
        for i in range(d):
            strides.append(strides[-1] * radix[i])
        # log2 of the key space (computed in float so that it stays meaningful if int64 would overflow).
        self.key_bits = (tf.reduce_sum(tf.math.log(tf.cast(radix, tf.float32))) +
                         tf.math.log(tf.cast(tf.reduce_max(group) + 1, tf.float32))) / math.log(2.0)
        if check_bits and tf.executing_eagerly() and float(self.key_bits) > 62.5:
            raise ValueError(
                f"The {d}-D lattice keys of this input need {float(self.key_bits):.1f} bits (> 62.5): the "
                f"features span too many lattice cells. Use larger standard deviations (e.g. "
                f"bilateral_rgb_std >= 0.5) or smaller images / batches.")
        packed = tf.cast(group, tf.int64)[:, None] * strides[d]  # [P, 1]
        for i in range(d):
            packed = packed + tf.cast(shifted[:, :, i], tf.int64) * strides[i]  # [P, d+1]
        # Number the vertices in key order: sort the (point, corner) entries by key, then runs of equal keys.
        packed = tf.reshape(packed, [-1])  # [E], E = P*(d+1)
        num_entries = tf.shape(packed)[0]
        order = _argsort_int64(packed, native_sort)
        sorted_keys = tf.gather(packed, order)
        is_start = tf.concat([[True], tf.not_equal(sorted_keys[1:], sorted_keys[:-1])], axis=0)
        run = tf.cumsum(tf.cast(is_start, tf.int32)) - 1  # vertex id of each sorted entry
        starts = tf.cast(tf.where(is_start)[:, 0], tf.int32)  # [M] first sorted entry of each vertex
        self.num_vertices = num_vertices = tf.shape(starts)[0]
        vertex_keys = tf.gather(sorted_keys, starts)  # [M], ascending
        # Undo the sort (a permutation: no duplicate indices, so safe in every runtime's ScatterND).
        offsets = tf.scatter_nd(order[:, None], run, num_entries[None])
        self.offsets = tf.reshape(offsets, [-1, d + 1])  # [P, d+1] vertex id of each simplex corner
        # Blur neighbours along lattice axis j: n1 = key - 1 everywhere except key[j] + d; n2 = -(n1 - key).
        ones = strides[0]
        for i in range(1, d):
            ones = ones + strides[i]
        queries = []
        for j in range(d + 1):
            delta = -ones + (np.int64(d + 1) * strides[j] if j < d else tf.constant(0, tf.int64))
            queries += [vertex_keys + delta, vertex_keys - delta]
        queries = tf.concat(queries, axis=0)  # [2(d+1)M]
        found, exists = _sorted_lookup(vertex_keys, queries)
        # A missing neighbour reads row M of the grid, which stays zero (its own neighbours are itself).
        neighbours = tf.reshape(tf.where(exists, found, num_vertices), [2 * (d + 1), -1])
        self.neighbours = tf.concat([neighbours, tf.fill([2 * (d + 1), 1], num_vertices)], axis=1)
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** -d))
        self.splat = splat
        if splat == "cumsum":
            # The sorted (point, corner) entries: every vertex owns one contiguous run, ending at ends[m].
            self.order = order
            self.ends = tf.concat([starts[1:] - 1, num_entries[None] - 1], axis=0)  # [M]
            self.sorted_points = order // (d + 1)

    def prepare_splat_weights(self, weights):
        """Per-corner splat weights [P, d+1] in the layout ``splat_blur`` uses (sorted for "cumsum")."""
        if self.splat == "cumsum":
            max_weight_sum = tf.reduce_max(tf.reduce_sum(tf.abs(weights), axis=1))
            return tf.gather(tf.reshape(weights, [-1]), self.order), max_weight_sum
        return weights

    def _splat(self, values, weights):
        d, channels = self.d, tf.shape(values)[1]
        if self.splat == "scatter":
            grid = tf.zeros(tf.stack([self.num_vertices + 1, channels]))
            for r in range(d + 1):
                grid = tf.tensor_scatter_nd_add(grid, self.offsets[:, r:r + 1], weights[:, r:r + 1] * values)
            return grid
        if self.splat == "segment_sum":
            contributions = tf.reshape(weights[:, :, None] * values[:, None, :], tf.stack([-1, channels]))
            return tf.math.unsorted_segment_sum(contributions, tf.reshape(self.offsets, [-1]),
                                                self.num_vertices + 1)
        # "cumsum": exact segment sums of the sorted contributions through an int64 fixed-point prefix sum.
        # The scale keeps the largest prefix (<= max over channels of sum_p |value| * sum_r weight) < 2^61.
        sorted_weights, max_weight_sum = weights
        total = tf.reduce_max(tf.reduce_sum(tf.abs(values), axis=0)) * max_weight_sum + 1.0
        exponent = tf.minimum(tf.floor(61.0 - tf.math.log(total) / math.log(2.0)), 40.0)
        scale = tf.exp(exponent * math.log(2.0))
        contributions = tf.gather(values, self.sorted_points) * (sorted_weights * scale)[:, None]
        prefix = tf.cumsum(tf.cast(tf.round(contributions), tf.int64), axis=0)
        at_ends = tf.gather(prefix, self.ends)  # [M, C]
        sums = at_ends - tf.concat([tf.zeros(tf.stack([1, channels]), tf.int64), at_ends[:-1]], axis=0)
        return tf.concat([tf.cast(sums, tf.float32) / scale, tf.zeros(tf.stack([1, channels]))], axis=0)

    def splat_blur(self, values, weights):
        """Splat ``values`` with per-corner ``weights`` onto the lattice and blur along its d+1 axes.

        Args:
            values: float32 [P, C].
            weights: splat weights from ``prepare_splat_weights``.

        Returns:
            float32 [M+1, C] blurred lattice values (the last row is the zero row).
        """
        grid = self._splat(values, weights)
        for j in range(self.d + 1):
            grid = grid + 0.5 * (tf.gather(grid, self.neighbours[2 * j]) +
                                 tf.gather(grid, self.neighbours[2 * j + 1]))
        return grid

    def slice_terms(self, grid, weights):
        """Interpolate lattice values back at the points: a list of d+1 [P, C] terms to add up.

        Args:
            grid: float32 [M+1, C] from ``splat_blur``.
            weights: float32 [P, d+1] slice weight of each point at each simplex corner.
        """
        return [weights[:, r:r + 1] * tf.gather(grid, self.offsets[:, r]) for r in range(self.d + 1)]


# ----------------------------------------------------------------------------------------------------
# Kernels: each returns the list of [P, C] terms of ``weight * n * K(n * Q)``
# ----------------------------------------------------------------------------------------------------
class LatticeKernel:
    """Symmetrically normalised lattice Gaussian on the given features, times its Potts weight."""

    def __init__(self, features, group, weight, splat, native_sort):
        self.lattice = lat = Lattice(features, group, splat, native_sort)
        ones = tf.ones_like(features[:, :1])
        grid = lat.splat_blur(ones, lat.prepare_splat_weights(lat.weights))
        response = tf.add_n(lat.slice_terms(grid, lat.weights)) * lat.alpha
        norm = tf.math.rsqrt(response + 1e-20)  # [P, 1], densecrf's NORMALIZE_SYMMETRIC
        self.splat_weights = lat.prepare_splat_weights(lat.weights * norm)
        self.slice_weights = lat.weights * (norm * (lat.alpha * weight))

    def __call__(self, q_flat, q_image):
        del q_image
        lat = self.lattice
        return lat.slice_terms(lat.splat_blur(q_flat, self.splat_weights), self.slice_weights)


class SeparableKernel:
    """Symmetrically normalised exact (x, y) Gaussian as two depthwise convolutions, times its weight."""

    def __init__(self, std, num_channels, image_shape, weight):
        radius = max(1, int(math.ceil(3.0 * std)))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / std) ** 2).astype(np.float32)
        self.kernel_y = tf.constant(np.tile(taps[:, None, None, None], (1, 1, num_channels, 1)))
        self.kernel_x = tf.constant(np.tile(taps[None, :, None, None], (1, 1, num_channels, 1)))
        ones = tf.ones(tf.concat([image_shape[:3], [1]], axis=0))
        response = tf.nn.depthwise_conv2d(
            tf.nn.depthwise_conv2d(ones, tf.constant(taps[:, None, None, None]), [1] * 4, "SAME"),
            tf.constant(taps[None, :, None, None]), [1] * 4, "SAME")
        # (A [1, 1, 1, 1] epsilon: tf2onnx's transpose optimiser trips over 0-d constants after a Conv.)
        self.norm = tf.math.rsqrt(response + np.full((1, 1, 1, 1), 1e-20, np.float32))  # [N, H, W, 1]
        self.weight = weight if tf.is_tensor(weight) else np.float32(weight)
        self.flat_shape = tf.stack([-1, num_channels])

    def __call__(self, q_flat, q_image):
        del q_flat
        x = tf.nn.depthwise_conv2d(self.norm * q_image, self.kernel_y, [1] * 4, "SAME")
        x = tf.nn.depthwise_conv2d(x, self.kernel_x, [1] * 4, "SAME")
        return [tf.reshape((self.weight * self.norm) * x, self.flat_shape)]
