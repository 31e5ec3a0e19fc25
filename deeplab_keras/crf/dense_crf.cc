// Mean-field dense CRF on top of the permutohedral lattice (see dense_crf.h for the semantics).
//
// Layout: every per-pixel / per-point row holds the C labels padded to a multiple of 8 floats (32-byte
// aligned), so all inner loops run on whole 8-float vectors (GCC vector extensions). The hot kernels are
// compiled twice: for plain x86-64 (SSE2) and, through __attribute__((target("avx2,fma"))), for AVX2+FMA;
// the CPU picks one at run time, so the library needs no -march flag and runs on any x86-64 machine.
#include "dense_crf.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <sstream>
#include <utility>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define DKCRF_X86 1
#endif

#define DKCRF_INLINE inline __attribute__((always_inline))

namespace dkcrf {
namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int kMaxBlocks = kMaxLabels / 8;

// Flush denormals to zero while a kernel runs (restores the caller's mode).
class ScopedFlushDenormal {
 public:
#ifdef DKCRF_X86
  ScopedFlushDenormal() : csr_(_mm_getcsr()) { _mm_setcsr(csr_ | 0x8040); }  // FTZ | DAZ
  ~ScopedFlushDenormal() { _mm_setcsr(csr_); }

 private:
  unsigned int csr_;
#endif
};

DKCRF_INLINE f8 Broadcast(float v) { return f8{} + v; }

// Aligned array of f8, uninitialised (std::vector does not honour the vector type's alignment); large ones on
// huge pages (see internal::AllocateAligned).
class AlignedVector {
 public:
  explicit AlignedVector(int64_t n)
      : bytes_(sizeof(f8) * std::max<int64_t>(n, 1)), data_(static_cast<f8*>(internal::AllocateAligned(bytes_))) {}
  ~AlignedVector() { internal::FreeAligned(data_, bytes_); }
  AlignedVector(const AlignedVector&) = delete;
  AlignedVector& operator=(const AlignedVector&) = delete;
  f8* data() { return data_; }

 private:
  size_t bytes_;
  f8* data_;
};

// How far ahead (in rows) the scattered row accesses of splat, blur and slice are prefetched.
constexpr int kPrefetchAhead = 16;

// Prefetches a value row of nb 32-byte blocks: its first and last cache line, and the middle one when a row
// can span three (nb >= 4; the hardware prefetcher follows longer rows).
DKCRF_INLINE void PrefetchRow(const f8* row, int nb) {
  __builtin_prefetch(row, 1, 3);
  __builtin_prefetch(reinterpret_cast<const char*>(row + nb) - 1, 1, 3);
  if (nb >= 4) __builtin_prefetch(reinterpret_cast<const char*>(row) + 64, 1, 3);
}

// Horizontal reductions by lane swaps (three shuffles instead of seven scalar steps); the result is in every
// lane. The sum is ((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7)).
DKCRF_INLINE f8 Swap(f8 v, i8 lanes) { return __builtin_shuffle(v, lanes); }

DKCRF_INLINE f8 HorizontalMaxV(f8 v) {
  v = v > Swap(v, i8{4, 5, 6, 7, 0, 1, 2, 3}) ? v : Swap(v, i8{4, 5, 6, 7, 0, 1, 2, 3});
  v = v > Swap(v, i8{1, 0, 3, 2, 5, 4, 7, 6}) ? v : Swap(v, i8{1, 0, 3, 2, 5, 4, 7, 6});
  return v > Swap(v, i8{2, 3, 0, 1, 6, 7, 4, 5}) ? v : Swap(v, i8{2, 3, 0, 1, 6, 7, 4, 5});
}

DKCRF_INLINE f8 HorizontalSumV(f8 v) {
  v = v + Swap(v, i8{4, 5, 6, 7, 0, 1, 2, 3});
  v = v + Swap(v, i8{1, 0, 3, 2, 5, 4, 7, 6});
  return v + Swap(v, i8{2, 3, 0, 1, 6, 7, 4, 5});
}

DKCRF_INLINE float HorizontalSum(f8 v) { return HorizontalSumV(v)[0]; }

// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp); exactly 0 below -87.
DKCRF_INLINE f8 ExpNonPositive(f8 x) {
  const i8 tiny = x < -87.0f;
  x = tiny ? Broadcast(-87.0f) : x;
  const f8 t = x * 1.44269504088896341f;
  const i8 n = __builtin_convertvector(t - 0.5f, i8);  // round to nearest for t <= 0
  const f8 fn = __builtin_convertvector(n, f8);
  f8 r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  f8 y = Broadcast(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const i8 bits = (n + 127) << 23;
  const f8 result = y * reinterpret_cast<const f8&>(bits);
  return tiny ? f8{} : result;
}

// log(x) for normal positive finite x (Cephes polynomial, ~1 ulp).
DKCRF_INLINE f8 LogPositive(f8 x) {
  i8 bits = reinterpret_cast<const i8&>(x);
  i8 e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;
  f8 m = reinterpret_cast<const f8&>(bits);  // x = m * 2^e, m in [0.5, 1)
  const i8 small = m < 0.707106781186547524f;  // -1 where true
  e = e + small;
  m = (small ? m + m : m) - 1.0f;
  const f8 z = m * m;
  f8 y = Broadcast(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const f8 fe = __builtin_convertvector(e, f8);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  f8 r = m + y;
  r += fe * 0.693359375f;
  return r;
}

// ------------------------------------------------------------------------------------------------------
// Kernel bodies. NB = 8-float blocks per row as a compile-time constant (0: use the runtime `nb`).

DKCRF_INLINE i8 LaneIndex() { return i8{0, 1, 2, 3, 4, 5, 6, 7}; }

// Block b of a row of C floats: its n = min(8, C - 8b) labels, `pad` in the other lanes. When the 8 floats
// from row + 8b end before `limit` (readable memory), a partial block is one vector load and a blend: copying
// its elements one by one and reading them back as a vector would stall (no store-to-load forwarding), about
// 20 cycles per row.
DKCRF_INLINE f8 LoadBlock(const float* row, int C, int b, const float* limit, float pad) {
  const float* src = row + 8 * b;
  const int n = std::min(8, C - 8 * b);
  f8 v;
  if (n == 8 || src + 8 <= limit) {
    std::memcpy(&v, src, sizeof(v));
    if (n < 8) v = LaneIndex() < n ? v : Broadcast(pad);
  } else {
    v = Broadcast(pad);
    for (int k = 0; k < n; ++k) v[k] = src[k];
  }
  return v;
}

// Reads a row of C floats as nb padded blocks; the pad labels get -1e30 (probability 0 after a softmax).
// limit: end of the readable memory after the row.
template <int NB>
DKCRF_INLINE void LoadRowT(const float* row, int C, int nb_rt, const float* limit, f8* o) {
  const int nb = NB > 0 ? NB : nb_rt;
  for (int b = 0; b < nb; ++b) o[b] = LoadBlock(row, C, b, limit, -1e30f);
}

// -U of one pixel's row of C inputs as nb padded blocks (pad labels get -1e30, i.e. probability 0).
template <int NB>
DKCRF_INLINE void NegUnaryRowT(const float* row, InputType type, int C, int nb_rt, const float* limit, f8* o) {
  const int nb = NB > 0 ? NB : nb_rt;
  const bool probs = type == InputType::kProbs;
  const float sign = type == InputType::kLogits ? 1.f : -1.f;
  for (int b = 0; b < nb; ++b) {
    const int n = std::min(8, C - 8 * b);  // real labels in this block (the rest is padding)
    f8 v = LoadBlock(row, C, b, limit, 1.f);
    if (probs) {
      v = v < kProbClip ? Broadcast(kProbClip) : v;
      v = v > 1.f ? Broadcast(1.f) : v;
      v = LogPositive(v);
    } else {
      v = v * sign;
    }
    if (n < 8) v = LaneIndex() < n ? v : Broadcast(-1e30f);  // padding labels: probability 0
    o[b] = v;
  }
}

// q = softmax(x) over the nb blocks of x (x is overwritten).
template <int NB>
DKCRF_INLINE void SoftmaxRowT(f8* x, int nb_rt, f8* q) {
  const int nb = NB > 0 ? NB : nb_rt;
  f8 mx = x[0];
  for (int b = 1; b < nb; ++b) mx = x[b] > mx ? x[b] : mx;
  const f8 m = HorizontalMaxV(mx);
  f8 s = f8{};
  for (int b = 0; b < nb; ++b) {
    x[b] = ExpNonPositive(x[b] - m);
    s += x[b];
  }
  const f8 inv = 1.0f / HorizontalSumV(s);
  for (int b = 0; b < nb; ++b) q[b] = x[b] * inv;
}

// Writes -U for pixels [begin, end) as unpadded rows of C floats into neg_u.
template <int NB>
DKCRF_INLINE void NegUnaryT(const float* in, InputType type, int C, int nb_rt, int64_t begin, int64_t end,
                            float* neg_u) {
  const int nb = NB > 0 ? NB : nb_rt;
  f8 x[NB > 0 ? NB : kMaxBlocks];
  for (int64_t p = begin; p < end; ++p) {
    NegUnaryRowT<NB>(in + p * C, type, C, nb, in + end * C, x);
    std::memcpy(neg_u + p * C, x, sizeof(float) * C);
  }
}

// q = softmax(-U) for pixels [begin, end) (neg_u: unpadded rows).
template <int NB>
DKCRF_INLINE void SoftmaxT(const float* neg_u, int C, int nb_rt, int64_t begin, int64_t end, f8* q) {
  const int nb = NB > 0 ? NB : nb_rt;
  f8 x[NB > 0 ? NB : kMaxBlocks];
  for (int64_t p = begin; p < end; ++p) {
    LoadRowT<NB>(neg_u + p * C, C, nb, neg_u + end * C, x);
    SoftmaxRowT<NB>(x, nb, q + p * nb);
  }
}

// Splat of points [m0, m1) of a lattice: V[m] = sum over the point's vertices e (pixel order) of
// w[e] * q[pixel(e)].
template <int NB>
DKCRF_INLINE void SplatT(const Lattice& L, const f8* q, int nb_rt, int64_t m0, int64_t m1, f8* V) {
  const int nb = NB > 0 ? NB : nb_rt;
  const int32_t* pixel = L.point_pixel.data();
  const int32_t* start = L.point_start.data();
  const float* weight = L.point_weight.data();
  f8 acc[NB > 0 ? NB : kMaxBlocks];
  const int64_t k_last = start[m1];
  for (int64_t m = m0; m < m1; ++m) {
    for (int b = 0; b < nb; ++b) acc[b] = f8{};
    for (int64_t k = start[m], k_end = start[m + 1]; k < k_end; ++k) {
      if (k + kPrefetchAhead < k_last) PrefetchRow(q + static_cast<int64_t>(pixel[k + kPrefetchAhead]) * nb, nb);
      const f8* src = q + static_cast<int64_t>(pixel[k]) * nb;
      const float w = weight[k];
      for (int b = 0; b < nb; ++b) acc[b] += w * src[b];
    }
    for (int b = 0; b < nb; ++b) V[m * nb + b] = acc[b];
  }
}

// In-place blur of chains [c0, c1) of one direction: along each chain p_0, ..., p_k,
// V[p_i] <- V[p_i] + (V[p_{i-1}] + V[p_{i+1}]) / 2 with the old values (0 beyond the ends); the same float
// operations as the reference's pass over all points (which leaves a point without neighbours unchanged).
template <int NB>
DKCRF_INLINE void ChainBlurT(f8* V, const int32_t* point, const int64_t* start, int64_t c0, int64_t c1,
                             int nb_rt) {
  const int nb = NB > 0 ? NB : nb_rt;
  f8 prev[NB > 0 ? NB : kMaxBlocks];
  const int64_t last = start[c1];
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t i0 = start[c], i1 = start[c + 1];
    for (int b = 0; b < nb; ++b) prev[b] = f8{};
    f8* row = V + static_cast<int64_t>(point[i0]) * nb;
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kPrefetchAhead < last) PrefetchRow(V + static_cast<int64_t>(point[i + kPrefetchAhead]) * nb, nb);
      f8* next = i + 1 < i1 ? V + static_cast<int64_t>(point[i + 1]) * nb : nullptr;
      for (int b = 0; b < nb; ++b) {
        const f8 cur = row[b];
        row[b] = cur + 0.5f * (prev[b] + (next != nullptr ? next[b] : f8{}));
        prev[b] = cur;
      }
      row = next;
    }
  }
}

struct UpdateArgs {
  const float* neg_u;        // [N, C] -U, unpadded rows
  int C;
  int nb;
  const Lattice* lb;         // bilateral lattice or null
  const f8* vb;
  float wb;
  const Lattice* lg;         // Gaussian kernel as a lattice, or null
  const f8* vg;
  const GaussianKernel* gs;  // Gaussian kernel as a stencil over q_in, or null
  float wg;
  const f8* q_in;
  f8* q;
  const f8* compat_t = nullptr;  // label compatibility mu transposed, [C][nb] blocks (row l' = column l' of mu),
                                 // or null (Potts)
};

// Update of pixel p: x = -U + wb * slice_b + wg * (slice_g or `stencil`, the stencil's sum over q_in for p),
// q = softmax(x). end: the pixels' end (prefetch bound and readable -U).
template <int NB>
DKCRF_INLINE void UpdatePixelT(const UpdateArgs& a, int64_t p, int64_t end, const f8* stencil) {
  const int nb = NB > 0 ? NB : a.nb;
  f8 x[NB > 0 ? NB : kMaxBlocks], acc[NB > 0 ? NB : kMaxBlocks], acc2[NB > 0 ? NB : kMaxBlocks];
  // Potts: the kernel terms add to x directly; with a compatibility matrix they add up to the message m first
  // and x = -U - mu m.
  f8 msg[NB > 0 ? NB : kMaxBlocks];
  f8* dst = a.compat_t != nullptr ? msg : x;
  if (a.lb != nullptr && p + kPrefetchAhead < end) {
    const int32_t* off = &a.lb->offset[(p + kPrefetchAhead) * 6];
    for (int r = 0; r < 6; ++r) PrefetchRow(a.vb + static_cast<int64_t>(off[r]) * nb, nb);
  }
  LoadRowT<NB>(a.neg_u + p * a.C, a.C, nb, a.neg_u + end * a.C, x);
  if (a.compat_t != nullptr)
    for (int b = 0; b < nb; ++b) msg[b] = f8{};
  if (a.lb != nullptr) {  // two partial sums: the multiply-adds are not one long dependency chain
    for (int b = 0; b < nb; ++b) acc[b] = acc2[b] = f8{};
    const int32_t* off = &a.lb->offset[p * 6];
    const float* w = &a.lb->weight[p * 6];
    for (int r = 0; r < 6; r += 2) {
      const f8* v0 = a.vb + static_cast<int64_t>(off[r]) * nb;
      const f8* v1 = a.vb + static_cast<int64_t>(off[r + 1]) * nb;
      for (int b = 0; b < nb; ++b) {
        acc[b] += w[r] * v0[b];
        acc2[b] += w[r + 1] * v1[b];
      }
    }
    for (int b = 0; b < nb; ++b) dst[b] += a.wb * (acc[b] + acc2[b]);
  }
  if (a.lg != nullptr) {
    for (int b = 0; b < nb; ++b) acc[b] = f8{};
    const int32_t* off = &a.lg->offset[p * 3];
    const float* w = &a.lg->weight[p * 3];
    for (int r = 0; r < 3; ++r) {
      const f8* v = a.vg + static_cast<int64_t>(off[r]) * nb;
      for (int b = 0; b < nb; ++b) acc[b] += w[r] * v[b];
    }
    for (int b = 0; b < nb; ++b) dst[b] += a.wg * acc[b];
  }
  if (stencil != nullptr)
    for (int b = 0; b < nb; ++b) dst[b] += a.wg * stencil[b];
  if (a.compat_t != nullptr) {
    for (int l = 0; l < a.C; ++l) {
      const float m = msg[l / 8][l % 8];
      const f8* column = a.compat_t + static_cast<int64_t>(l) * nb;
      for (int b = 0; b < nb; ++b) x[b] -= m * column[b];
    }
  }
  SoftmaxRowT<NB>(x, nb, a.q + p * nb);
}

// For pixels [begin, end): UpdatePixelT without a stencil (the Gaussian kernel is a lattice, or absent).
template <int NB>
DKCRF_INLINE void UpdateT(const UpdateArgs& a, int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) UpdatePixelT<NB>(a, p, end, nullptr);
}

// The Gaussian stencil runs on tiles of kStencilRows rows x StencilCols(nb) columns: first the stencil sums of
// the tile (into a buffer of at most 64 KiB, which stays in the cache), then the tile's pixel updates.
constexpr int kStencilRows = 4;
DKCRF_INLINE int64_t StencilCols(int nb) {
  return std::max<int64_t>(1, (64 << 10) / (kStencilRows * nb * static_cast<int64_t>(sizeof(f8))));
}

// Stencil sums over q_in for the R vertically adjacent pixels p, p + width, ... of one column, which share
// stencil k (rows away from the top and bottom borders): each tap's offset and weight are read once for the R
// pixels, and the R pixels' sums are independent chains of multiply-adds. out[r * out_step]: pixel r's sum.
template <int NB, int R>
DKCRF_INLINE void StencilT(const UpdateArgs& a, int64_t p, int64_t k, f8* out, int64_t out_step) {
  const int nb = NB > 0 ? NB : a.nb;
  const int64_t row_step = a.gs->width * nb;
  const int32_t* off = a.gs->offset.data();
  const float* w = a.gs->weight.data();
  f8 sum[R][NB > 0 ? NB : kMaxBlocks];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < nb; ++b) sum[r][b] = f8{};
  for (int32_t t = a.gs->start[k], t_end = a.gs->start[k + 1]; t < t_end; ++t) {
    const f8* v = a.q_in + (p + off[t]) * nb;
    const f8 wt = Broadcast(w[t]);
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b) sum[r][b] += wt * v[r * row_step + b];
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < nb; ++b) out[r * out_step + b] = sum[r][b];
}

// For rows [kStencilRows * begin, kStencilRows * end) (work units: bands of kStencilRows rows) with the
// Gaussian kernel as a stencil, tile by tile (see kStencilRows).
template <int NB>
DKCRF_INLINE void UpdateBandsT(const UpdateArgs& a, int64_t begin, int64_t end) {
  const int nb = NB > 0 ? NB : a.nb;
  const GaussianKernel& g = *a.gs;
  const int64_t W = g.width, cols = StencilCols(nb);
  const int64_t tile_step = cols * nb;  // the sums of the tile's row r, column c: sums[r * tile_step + c * nb]
  AlignedVector sums(kStencilRows * tile_step);
  for (int64_t y0 = kStencilRows * begin; y0 < std::min(kStencilRows * end, g.height); y0 += kStencilRows) {
    const int64_t y1 = std::min<int64_t>(y0 + kStencilRows, g.height);
    const bool shared = y1 - y0 == kStencilRows && g.ProbeRow(y0) == g.ProbeRow(y1 - 1);  // one stencil row
    for (int64_t x0 = 0; x0 < W; x0 += cols) {
      const int64_t x1 = std::min(x0 + cols, W);
      for (int64_t x = x0; x < x1; ++x) {
        f8* out = sums.data() + (x - x0) * nb;
        if (shared) {
          StencilT<NB, kStencilRows>(a, y0 * W + x, g.ProbeRow(y0) * W + x, out, tile_step);
        } else {
          for (int64_t y = y0; y < y1; ++y)
            StencilT<NB, 1>(a, y * W + x, g.ProbeRow(y) * W + x, out + (y - y0) * tile_step, 0);
        }
      }
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t x = x0; x < x1; ++x)
          UpdatePixelT<NB>(a, y * W + x, y1 * W, sums.data() + (y - y0) * tile_step + (x - x0) * nb);
    }
  }
}

// Runtime dispatch on the row width (common label counts get a fixed-width instantiation).
#define DKCRF_DISPATCH_NB(nb, CALL) \
  switch (nb) {                     \
    case 1: { constexpr int NB = 1; CALL; break; } \
    case 2: { constexpr int NB = 2; CALL; break; } \
    case 3: { constexpr int NB = 3; CALL; break; } \
    case 4: { constexpr int NB = 4; CALL; break; } \
    default: { constexpr int NB = 0; CALL; break; } \
  }

#define DKCRF_KERNELS(SUFFIX, ATTR)                                                                        \
  ATTR void NegUnary##SUFFIX(const float* in, InputType type, int C, int nb, int64_t b, int64_t e,         \
                             float* neg_u) {                                                               \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(nb, (NegUnaryT<NB>(in, type, C, nb, b, e, neg_u)))                                   \
  }                                                                                                        \
  ATTR void Softmax##SUFFIX(const float* neg_u, int C, int nb, int64_t b, int64_t e, f8* q) {              \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(nb, (SoftmaxT<NB>(neg_u, C, nb, b, e, q)))                                           \
  }                                                                                                        \
  ATTR void Splat##SUFFIX(const Lattice& L, const f8* q, int nb, int64_t m0, int64_t m1, f8* V) {         \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(nb, (SplatT<NB>(L, q, nb, m0, m1, V)))                                               \
  }                                                                                                        \
  ATTR void Blur##SUFFIX(f8* V, const int32_t* point, const int64_t* start, int64_t c0, int64_t c1, int nb) { \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(nb, (ChainBlurT<NB>(V, point, start, c0, c1, nb)))                                   \
  }                                                                                                        \
  ATTR void Update##SUFFIX(const UpdateArgs& a, int64_t b, int64_t e) {                                    \
    ScopedFlushDenormal ftz;                                                                               \
    if (a.gs != nullptr) {                                                                                 \
      DKCRF_DISPATCH_NB(a.nb, (UpdateBandsT<NB>(a, b, e)))                                                 \
    } else {                                                                                               \
      DKCRF_DISPATCH_NB(a.nb, (UpdateT<NB>(a, b, e)))                                                      \
    }                                                                                                      \
  }

DKCRF_KERNELS(Generic, )
#if defined(DKCRF_X86) && defined(__GNUC__)
DKCRF_KERNELS(Avx2, __attribute__((target("avx2,fma"))))
#endif

struct KernelTable {
  void (*neg_unary)(const float*, InputType, int, int, int64_t, int64_t, float*);
  void (*softmax)(const float*, int, int, int64_t, int64_t, f8*);
  void (*splat)(const Lattice&, const f8*, int, int64_t, int64_t, f8*);
  void (*blur)(f8*, const int32_t*, const int64_t*, int64_t, int64_t, int);
  void (*update)(const UpdateArgs&, int64_t, int64_t);
};

// Whether the AVX2+FMA kernels run: the CPU has them and DEEPLAB_KERAS_CRF_GENERIC=1 (which forces the plain
// x86-64 kernels, for tests of the portable path) is not set.
bool UseAvx2Kernels() {
#if defined(DKCRF_X86) && defined(__GNUC__)
  __builtin_cpu_init();
  const char* generic = std::getenv("DEEPLAB_KERAS_CRF_GENERIC");
  return (generic == nullptr || generic[0] == '\0' || generic[0] == '0') && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const KernelTable& Kernels() {
  static const KernelTable table = [] {
#if defined(DKCRF_X86) && defined(__GNUC__)
    if (UseAvx2Kernels()) return KernelTable{NegUnaryAvx2, SoftmaxAvx2, SplatAvx2, BlurAvx2, UpdateAvx2};
#endif
    return KernelTable{NegUnaryGeneric, SoftmaxGeneric, SplatGeneric, BlurGeneric, UpdateGeneric};
  }();
  return table;
}

// Folds the symmetric normalisation 1/sqrt(K 1) into the vertex weights (used by both splat and slice).
void Normalize(Lattice* L, const ParallelFor& pfor) {
  const int d1 = L->d + 1;
  const int64_t M = L->num_points, N = L->num_pixels;
  std::vector<float> va(M + 1, 0.f), norm(N);
  // Splat of ones: each point sums its vertices' weights in pixel order (the reference's scatter order).
  pfor(M, 2 * d1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float s = 0.f;
      for (int32_t k = L->point_start[m]; k < L->point_start[m + 1]; ++k) s += L->point_weight[k];
      va[m] = s;
    }
  });
  for (int j = 0; j < d1; ++j) {  // in-place chain blur (see ChainBlurT), the chains of a direction in parallel
    const int64_t c0 = L->dir_chain[j];
    pfor(L->dir_chain[j + 1] - c0, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = c0 + begin; c < c0 + end; ++c) {
        float prev = 0.f;
        for (int64_t i = L->chain_start[c], i1 = L->chain_start[c + 1]; i < i1; ++i) {
          const float cur = va[L->chain_point[i]];
          va[L->chain_point[i]] = cur + 0.5f * (prev + (i + 1 < i1 ? va[L->chain_point[i + 1]] : 0.f));
          prev = cur;
        }
      }
    });
  }
  pfor(N, 8 * d1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float s = 0.f;
      for (int r = 0; r < d1; ++r) s += L->weight[p * d1 + r] * va[L->offset[p * d1 + r]];
      norm[p] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(s) + 1e-20));
      for (int r = 0; r < d1; ++r) L->weight[p * d1 + r] *= norm[p];
    }
  });
  pfor(static_cast<int64_t>(L->point_pixel.size()), 2, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) L->point_weight[k] *= norm[L->point_pixel[k]];
  });
}

// mu transposed into padded blocks: row l' holds column l' of mu (zeros in the padding labels).
std::unique_ptr<AlignedVector> TransposedCompat(const float* compat, int C, int nb) {
  auto t = std::make_unique<AlignedVector>(static_cast<int64_t>(C) * nb);
  for (int lp = 0; lp < C; ++lp) {
    float* row = reinterpret_cast<float*>(t->data() + static_cast<int64_t>(lp) * nb);
    for (int l = 0; l < 8 * nb; ++l) row[l] = l < C ? compat[l * C + lp] : 0.f;
  }
  return t;
}

// The bilateral kernel's lattice (not normalised) on (x, y) / bilateral_xy_std and RGB / bilateral_rgb_std.
void BuildBilateralLattice(const uint8_t* image, int64_t height, int64_t width, const CrfParams& params,
                           int num_threads, const ParallelFor& pfor, Lattice* lattice) {
  const float sxy = params.bilateral_xy_std, srgb = params.bilateral_rgb_std;
  BuildLattice<5>(height * width, [&](int64_t p, float* f) {
    f[0] = static_cast<float>(p % width) / sxy;
    f[1] = static_cast<float>(p / width) / sxy;
    f[2] = static_cast<float>(image[p * 3 + 0]) / srgb;
    f[3] = static_cast<float>(image[p * 3 + 1]) / srgb;
    f[4] = static_cast<float>(image[p * 3 + 2]) / srgb;
  }, num_threads, pfor, lattice);
}

}  // namespace

std::string ValidateParams(const CrfParams& p, int64_t height, int64_t width) {
  std::ostringstream msg;
  auto finite = [](float v) { return std::isfinite(v); };
  if (p.iterations < 0 || p.iterations > kMaxIterations) {
    msg << "iterations must be in [0, " << kMaxIterations << "], got " << p.iterations;
  } else if (!finite(p.bilateral_weight) || p.bilateral_weight < 0.f || p.bilateral_weight > kMaxWeight) {
    msg << "bilateral_weight must be finite and in [0, 1e6], got " << p.bilateral_weight;
  } else if (!finite(p.gaussian_weight) || p.gaussian_weight < 0.f || p.gaussian_weight > kMaxWeight) {
    msg << "gaussian_weight must be finite and in [0, 1e6], got " << p.gaussian_weight;
  } else if (!finite(p.bilateral_xy_std) || !(p.bilateral_xy_std > 0.f)) {
    msg << "bilateral_xy_std must be finite and > 0, got " << p.bilateral_xy_std;
  } else if (!finite(p.bilateral_rgb_std) || !(p.bilateral_rgb_std > 0.f)) {
    msg << "bilateral_rgb_std must be finite and > 0, got " << p.bilateral_rgb_std;
  } else if (!finite(p.gaussian_xy_std) || !(p.gaussian_xy_std > 0.f)) {
    msg << "gaussian_xy_std must be finite and > 0, got " << p.gaussian_xy_std;
  } else {
    const float extent = static_cast<float>(std::max<int64_t>(height, width) - 1);
    if (p.bilateral_weight > 0.f && extent / p.bilateral_xy_std > kMaxFeature) {
      msg << "bilateral_xy_std=" << p.bilateral_xy_std << " is too small for a " << height << "x" << width
          << " image: (max(H, W) - 1) / bilateral_xy_std must be <= " << kMaxFeature;
    } else if (p.bilateral_weight > 0.f && 255.f / p.bilateral_rgb_std > kMaxFeature) {
      msg << "bilateral_rgb_std=" << p.bilateral_rgb_std
          << " is too small: 255 / bilateral_rgb_std must be <= " << kMaxFeature;
    } else if (p.gaussian_weight > 0.f && extent / p.gaussian_xy_std > kMaxFeature) {
      msg << "gaussian_xy_std=" << p.gaussian_xy_std << " is too small for a " << height << "x" << width
          << " image: (max(H, W) - 1) / gaussian_xy_std must be <= " << kMaxFeature;
    }
  }
  return msg.str();
}

namespace {

// Bytes of a built lattice over N pixels with d features and M points: offsets, weights and the vertex lists
// pixels and weights (E = (d+1) N entries each), the point index and the blur chains (at most d+1 chain
// entries per point).
int64_t LatticeBytes(int d, int64_t N, int64_t M) {
  const int64_t E = (d + 1) * N;
  return 16 * E + 4 * (M + 1) + 12 * (d + 1) * M;
}

// Peak bytes while a lattice is built (BuildLattice): offsets and weights, the hash tables (slots of 8 + 4 d
// bytes, load 1/4 .. 1/2, initial size E / 4) and the neighbour table, plus 4 (d + 1) E bytes that once held
// every entry's key and hash: the build no longer stores them, the term stays as the room of the last step
// (the vertex lists' pixels and weights, 8 E, and the chains being concatenated).
int64_t LatticeBuildBytes(int d, int64_t N, int64_t M) {
  const int64_t E = (d + 1) * N;
  return 8 * E + 4 * (d + 1) * E + (8 + 4 * d) * (4 * M + E / 2) + 8 * (d + 1) * M;
}

bool StencilApplies(float xy_std);

// Reads one "Name: <n> kB" line of /proc/meminfo, or one integer file of the cgroup (bytes); -1 if absent.
int64_t ReadMeminfo(const char* name) {
  FILE* f = std::fopen("/proc/meminfo", "r");
  if (f == nullptr) return -1;
  char line[256];
  int64_t value = -1;
  const size_t len = std::strlen(name);
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, name, len) == 0 && line[len] == ':') {
      value = std::strtoll(line + len + 1, nullptr, 10) * 1024;
      break;
    }
  }
  std::fclose(f);
  return value;
}

int64_t ReadCgroup(const char* path) {
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return -1;
  char text[64] = {0};
  const bool ok = std::fgets(text, sizeof(text), f) != nullptr;
  std::fclose(f);
  if (!ok || text[0] < '0' || text[0] > '9') return -1;  // "max": no limit
  return std::strtoll(text, nullptr, 10);
}

std::string Size(int64_t bytes) {
  std::ostringstream s;
  s.precision(1);
  if (bytes < (int64_t{1} << 30)) {
    s << std::fixed << static_cast<double>(bytes) / (1 << 20) << " MiB";
  } else {
    s << std::fixed << static_cast<double>(bytes) / (1 << 30) << " GiB";
  }
  return s.str();
}

}  // namespace

int64_t EstimateBytes(int64_t batch, int64_t height, int64_t width, int64_t num_labels, const CrfParams& params,
                      int64_t bilateral_points) {
  const int64_t N = height * width, row = (num_labels + 7) / 8 * 32;
  const int64_t output = batch * N * num_labels * 4;
  const bool filter = params.iterations > 0 && (params.bilateral_weight > 0.f || params.gaussian_weight > 0.f);
  if (!filter) return output + N * row / 20 * 21 + (int64_t{8} << 20);
  int64_t built = 0, build_peak = 0, values = 0;
  if (params.bilateral_weight > 0.f) {
    const int64_t M = bilateral_points >= 0 ? bilateral_points : kAssumedPointsPerPixel * N;
    build_peak = LatticeBuildBytes(5, N, M);
    built = LatticeBytes(5, N, M);
    values += (M + 1) * row;
  }
  bool stencil = false;
  if (params.gaussian_weight > 0.f) {
    stencil = StencilApplies(params.gaussian_xy_std);
    if (!stencil) {  // a 2-D lattice has about 1.2 N / xy_std^2 points (at most 3 N)
      const double s = params.gaussian_xy_std;
      const int64_t M =
          std::min<int64_t>(3 * N, static_cast<int64_t>(1.5 * N / (s * s) + 2.0 * (height + width) / s) + 64);
      build_peak = std::max(build_peak, built + LatticeBuildBytes(2, N, M));
      built += LatticeBytes(2, N, M);
      values += (M + 1) * row;
    }
  }
  const int64_t mean_field = built + (stencil ? 2 : 1) * N * row + values;
  // + 5 % and 8 MiB for the allocator's overhead and the threads' scratch.
  return output + std::max(build_peak, mean_field) / 20 * 21 + (int64_t{8} << 20);
}

int64_t DefaultMemoryLimit() {
  int64_t available = ReadMeminfo("MemAvailable");
  if (available < 0) {
    const long pages = sysconf(_SC_AVPHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && size > 0) available = static_cast<int64_t>(pages) * size;
  }
  const int64_t cg_max = ReadCgroup("/sys/fs/cgroup/memory.max");
  const int64_t cg_used = ReadCgroup("/sys/fs/cgroup/memory.current");
  if (cg_max > 0 && cg_used >= 0) {
    const int64_t left = std::max<int64_t>(cg_max - cg_used, 0);
    available = available < 0 ? left : std::min(available, left);
  }
  return available < 0 ? -1 : available / 5 * 4;
}

std::string MemoryProblem(int64_t needed, int64_t limit, int64_t height, int64_t width, int64_t num_labels,
                          const char* when) {
  if (limit <= 0 || needed <= limit) return "";
  std::ostringstream msg;
  msg << "a " << height << "x" << width << " image with " << num_labels << " labels needs about " << Size(needed)
      << " (estimated " << when << "), more than the limit of " << Size(limit)
      << ". Run the CRF on tiles or a downscaled image, or on fewer labels; or raise the limit with "
         "max_memory= (bytes, e.g. \"32G\") or the environment variable DEEPLAB_KERAS_CRF_MAX_MEMORY (default: "
         "80 % of the memory available)";
  return msg.str();
}

int64_t GaussianKernel::Bytes() const {
  return static_cast<int64_t>(lattice.offset.size() * 4 + lattice.weight.size() * 4 + lattice.chain_point.size() * 4 +
                              lattice.chain_start.size() * 8 + lattice.point_pixel.size() * 8 +
                              lattice.point_start.size() * 4 + start.size() * 4 +
                              offset.size() * 4 + weight.size() * 4);
}

namespace {

bool StencilApplies(float xy_std) {
  int exponent = 0;
  return xy_std > 0.f && xy_std <= 1.f && std::frexp(xy_std, &exponent) == 0.5f;
}

// Reads the stencil off the lattice of a probe image (see GaussianKernel).
void BuildStencil(int64_t height, int64_t width, float xy_std, const ParallelFor& pfor, GaussianKernel* g) {
  constexpr int64_t kBand = 12;  // rows the top / bottom border influences (blur reach, twice for the norms)
  g->width = width;
  g->height = height;
  g->band = kBand;
  g->probe_rows = std::min<int64_t>(height, 2 * kBand + 1);
  const int64_t np = g->probe_rows * width;
  Lattice L;
  BuildLattice<2>(np, [&](int64_t p, float* f) {
    f[0] = static_cast<float>(p % width) / xy_std;
    f[1] = static_cast<float>(p / width) / xy_std;
  }, 1, pfor, &L);
  Normalize(&L, pfor);
  const int64_t M = L.num_points;
  // Blur neighbours from the chains: n1 (previous) and n2 (next) of each point per direction; M when absent.
  std::vector<int32_t> n1(3 * (M + 1), static_cast<int32_t>(M)), n2(3 * (M + 1), static_cast<int32_t>(M));
  for (int j = 0; j < 3; ++j) {
    for (int64_t c = L.dir_chain[j]; c < L.dir_chain[j + 1]; ++c) {
      for (int64_t i = L.chain_start[c]; i + 1 < L.chain_start[c + 1]; ++i) {
        n2[j * (M + 1) + L.chain_point[i]] = L.chain_point[i + 1];
        n1[j * (M + 1) + L.chain_point[i + 1]] = L.chain_point[i];
      }
    }
  }
  // Row i of the filter: u = S e_i pushed through the blur passes in reverse order (each pass is a symmetric
  // matrix, so this is B^T u), then sliced: K[i, j] = sum_m (B^T u)[m] * w[j at m].
  std::vector<float> u(M + 1, 0.f), v(M + 1, 0.f), row(np, 0.f);
  std::vector<int32_t> touched, next, cols;
  std::vector<char> in_next(M + 1, 0), in_row(np, 0);
  g->start.assign(np + 1, 0);
  for (int64_t i = 0; i < np; ++i) {
    touched.clear();
    for (int r = 0; r < 3; ++r) {
      const int32_t o = L.offset[i * 3 + r];
      touched.push_back(o);
      u[o] += L.weight[i * 3 + r];
    }
    for (int j = 2; j >= 0; --j) {
      next.clear();
      auto add = [&](int32_t m, float value) {
        if (m == M) return;
        if (!in_next[m]) {
          in_next[m] = 1;
          next.push_back(m);
        }
        v[m] += value;
      };
      for (int32_t m : touched) {
        add(m, u[m]);
        add(n1[j * (M + 1) + m], 0.5f * u[m]);
        add(n2[j * (M + 1) + m], 0.5f * u[m]);
      }
      for (int32_t m : touched) u[m] = 0.f;
      for (int32_t m : next) {
        u[m] = v[m];
        v[m] = 0.f;
        in_next[m] = 0;
      }
      touched.swap(next);
    }
    cols.clear();
    for (int32_t m : touched) {
      for (int32_t k = L.point_start[m]; k < L.point_start[m + 1]; ++k) {  // the point's vertices
        const int32_t j = L.point_pixel[k];
        if (!in_row[j]) {
          in_row[j] = 1;
          cols.push_back(j);
        }
        row[j] += u[m] * L.point_weight[k];
      }
      u[m] = 0.f;
    }
    std::sort(cols.begin(), cols.end());
    for (int32_t j : cols) {
      g->offset.push_back(static_cast<int32_t>(j - i));
      g->weight.push_back(row[j]);
      row[j] = 0.f;
      in_row[j] = 0;
    }
    g->start[i + 1] = static_cast<int32_t>(g->offset.size());
  }
  g->stencil = true;
}

}  // namespace

std::shared_ptr<const GaussianKernel> BuildGaussianKernel(int64_t height, int64_t width, float xy_std,
                                                          int num_threads, const ParallelFor& pfor) {
  auto kernel = std::make_shared<GaussianKernel>();
  if (StencilApplies(xy_std)) {
    BuildStencil(height, width, xy_std, pfor, kernel.get());
  } else {
    BuildLattice<2>(height * width, [&](int64_t p, float* f) {
      f[0] = static_cast<float>(p % width) / xy_std;
      f[1] = static_cast<float>(p / width) / xy_std;
    }, num_threads, pfor, &kernel->lattice);
    Normalize(&kernel->lattice, pfor);
  }
  return kernel;
}

std::string DenseCrfImage(const float* in, InputType input_type, const uint8_t* image, int64_t height,
                          int64_t width, int num_labels, const CrfParams& params, int num_threads,
                          const ParallelFor& pfor, float* q_out, const GaussianKernel* gaussian,
                          int64_t memory_limit, const float* compat, float* saved) {
  const KernelTable& K = Kernels();
  const int64_t N = height * width;
  const int C = num_labels, nb = (num_labels + 7) / 8;
  const bool use_b = params.bilateral_weight > 0.f, use_g = params.gaussian_weight > 0.f;
  const bool filter = params.iterations > 0 && (use_b || use_g);

  // The lattices first, then the mean-field buffers: their construction's temporaries are gone by then.
  DKCRF_TIC(build);
  Lattice lb;
  std::shared_ptr<const GaussianKernel> own_g;
  if (filter && use_b) {
    BuildBilateralLattice(image, height, width, params, num_threads, pfor, &lb);
    // Now the lattice's real size is known: re-check before the big allocations (noise-like images have up to
    // 6 points per pixel instead of the assumed kAssumedPointsPerPixel).
    const std::string problem = MemoryProblem(EstimateBytes(1, height, width, C, params, lb.num_points),
                                              memory_limit, height, width, C, "once its lattice was built");
    if (!problem.empty()) return problem;
    DKCRF_TIC(normalize);
    Normalize(&lb, pfor);
    DKCRF_TOC(normalize);
  }
  if (filter && use_g && gaussian == nullptr) {
    own_g = BuildGaussianKernel(height, width, params.gaussian_xy_std, num_threads, pfor);
    gaussian = own_g.get();
  }
  DKCRF_TOC(build);

  DKCRF_TIC(unary);
  // -U lives in the output until the last iteration has read it (no buffer of its own).
  float* neg_u = q_out;
  pfor(N, 30 * nb, [&](int64_t b, int64_t e) { K.neg_unary(in, input_type, C, nb, b, e, neg_u); });
  AlignedVector q_buffer(N * nb);
  std::unique_ptr<AlignedVector> q_next_store;
  f8* q = q_buffer.data();
  pfor(N, 30 * nb, [&](int64_t b, int64_t e) { K.softmax(neg_u, C, nb, b, e, q); });
  DKCRF_TOC(unary);

  if (filter) {
    const bool stencil_g = use_g && gaussian->stencil, lattice_g = use_g && !gaussian->stencil;
    const Lattice& lg = lattice_g ? gaussian->lattice : lb;
    // The stencil reads the previous Q of neighbouring pixels while the new Q is written: a second buffer
    // (owned at function scope: after an odd number of iterations the result lives in it).
    if (stencil_g) q_next_store = std::make_unique<AlignedVector>(N * nb);
    f8* q_next = stencil_g ? q_next_store->data() : q;
#ifdef DKCRF_PROFILE
    std::fprintf(stderr, "  N=%lld Mb=%lld Mg=%lld threads=%d\n", (long long)N, (long long)lb.num_points,
                 (long long)lg.num_points, num_threads);
#endif
    const int64_t Mb = use_b ? lb.num_points : 0, Mg = lattice_g ? lg.num_points : 0;
    // One value buffer per lattice (the blur runs in place).
    AlignedVector vb(std::max<int64_t>(Mb, 1) * nb), vg(std::max<int64_t>(Mg, 1) * nb);
    std::unique_ptr<AlignedVector> compat_t;
    if (compat != nullptr) compat_t = TransposedCompat(compat, C, nb);
    for (int it = 0; it < params.iterations; ++it) {
      if (saved != nullptr) {
        float* dst = saved + static_cast<int64_t>(it) * N * C;
        pfor(N, 2 * C, [&](int64_t b, int64_t e) {
          for (int64_t p = b; p < e; ++p)
            std::memcpy(dst + p * C, reinterpret_cast<const float*>(q + p * nb), sizeof(float) * C);
        });
      }
      DKCRF_TIC(splat);
      // Points of both lattices are the work units (bilateral first).
      pfor(Mb + Mg, 8 * nb * (use_b ? 6 : 3), [&](int64_t b, int64_t e) {
        if (b < Mb) K.splat(lb, q, nb, b, std::min(e, Mb), vb.data());
        if (e > Mb) K.splat(lg, q, nb, std::max(b, Mb) - Mb, e - Mb, vg.data());
      });
      DKCRF_TOC(splat);
      DKCRF_TIC(blur);
      // The d+1 directions in order (6 for the bilateral lattice, 3 for the Gaussian one), chains in parallel.
      for (int j = 0; j < 6; ++j) {
        const int64_t cb0 = use_b ? lb.dir_chain[j] : 0, nb_chains = use_b ? lb.dir_chain[j + 1] - cb0 : 0;
        const int64_t cg0 = lattice_g && j < 3 ? lg.dir_chain[j] : 0;
        const int64_t ng_chains = lattice_g && j < 3 ? lg.dir_chain[j + 1] - cg0 : 0;
        if (nb_chains + ng_chains == 0) continue;
        pfor(nb_chains + ng_chains, 12 * nb, [&](int64_t b, int64_t e) {
          if (b < nb_chains)
            K.blur(vb.data(), lb.chain_point.data(), lb.chain_start.data(), cb0 + b, cb0 + std::min(e, nb_chains), nb);
          if (e > nb_chains)
            K.blur(vg.data(), lg.chain_point.data(), lg.chain_start.data(), cg0 + std::max(b, nb_chains) - nb_chains,
                   cg0 + e - nb_chains, nb);
        });
      }
      DKCRF_TOC(blur);
      DKCRF_TIC(update);
      UpdateArgs args{neg_u, C, nb, use_b ? &lb : nullptr, vb.data(), params.bilateral_weight,
                      lattice_g ? &lg : nullptr, vg.data(), stencil_g ? gaussian : nullptr,
                      params.gaussian_weight, q, q_next, compat_t ? compat_t->data() : nullptr};
      // Work units: pixels, or bands of kStencilRows rows with the stencil (see UpdateBandsT).
      const int64_t units = stencil_g ? (height + kStencilRows - 1) / kStencilRows : N;
      const int64_t unit_cost = (stencil_g ? kStencilRows * width : 1) * ((stencil_g ? 36 : 9) * 3 * nb + 40 * nb);
      pfor(units, unit_cost, [&](int64_t b, int64_t e) { K.update(args, b, e); });
      std::swap(q, q_next);
      DKCRF_TOC(update);
    }
  }
  // Unpad into the output (over -U, no longer needed).
  pfor(N, 2 * C, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      std::memcpy(q_out + p * C, reinterpret_cast<const float*>(q + p * nb), sizeof(float) * C);
  });
  return "";
}

// ------------------------------------------------------------------------------------------------------
// Backward pass. With x_t = -U + M_t (Potts) or -U - mu M_t, M_t = w_b Kb(Q_t) + w_g Kg(Q_t) and
// Q_{t+1} = softmax(x_t), going back from g = dL/dQ_T:
//   dx_t = Q_{t+1} * (g - <g, Q_{t+1}>),  dL/d(-U) += dx_t,  A_k = K_k^T dx_t,  s = w_b A_b + w_g A_g,
//   Potts:  dL/dQ_t = s,        dL/dw_k += sum_i <A_k, Q_t>,
//   mu:     dL/dQ_t = -mu^T s,  dL/dw_k -= sum_i <A_k, mu Q_t>,  dL/dmu -= sum_i s Q_t^T
// (mu acts on labels and K on pixels, so they commute: one transposed filtering per kernel and iteration).
// K_k = S^T B_d .. B_0 S with the symmetric normalisation folded into S and each blur pass symmetric, so
// K_k^T = S^T B_0 .. B_d S: the same splat and slice, the blur directions in reverse order.
namespace {

// Loads rows of C floats into padded blocks with zeros in the padding labels.
template <int NB>
DKCRF_INLINE void LoadZeroPaddedT(const float* src, int C, int nb_rt, int64_t begin, int64_t end, f8* dst) {
  const int nb = NB > 0 ? NB : nb_rt;
  for (int64_t p = begin; p < end; ++p) {
    f8* row = dst + p * nb;
    row[nb - 1] = f8{};
    std::memcpy(row, src + p * C, sizeof(float) * C);
  }
}

// out[p] = sum_r w[p, r] * V[offset[p, r]] for pixels [begin, end).
template <int NB>
DKCRF_INLINE void SliceT(const Lattice& L, const f8* V, int nb_rt, int64_t begin, int64_t end, f8* out) {
  const int nb = NB > 0 ? NB : nb_rt;
  const int d1 = L.d + 1;
  f8 acc[NB > 0 ? NB : kMaxBlocks];
  for (int64_t p = begin; p < end; ++p) {
    if (p + kPrefetchAhead < end) {
      const int32_t* off = &L.offset[(p + kPrefetchAhead) * d1];
      for (int r = 0; r < d1; ++r) PrefetchRow(V + static_cast<int64_t>(off[r]) * nb, nb);
    }
    for (int b = 0; b < nb; ++b) acc[b] = f8{};
    const int32_t* off = &L.offset[p * d1];
    const float* w = &L.weight[p * d1];
    for (int r = 0; r < d1; ++r) {
      const f8* v = V + static_cast<int64_t>(off[r]) * nb;
      for (int b = 0; b < nb; ++b) acc[b] += w[r] * v[b];
    }
    for (int b = 0; b < nb; ++b) out[p * nb + b] = acc[b];
  }
}

// dx = qn * (g - <g, qn>) and dnu += dx for pixels [begin, end).
template <int NB>
DKCRF_INLINE void SoftmaxGradT(const f8* qn, const f8* g, int nb_rt, int64_t begin, int64_t end, f8* dx, f8* dnu) {
  const int nb = NB > 0 ? NB : nb_rt;
  for (int64_t p = begin; p < end; ++p) {
    const f8* q = qn + p * nb;
    const f8* gp = g + p * nb;
    f8 dot = f8{};
    for (int b = 0; b < nb; ++b) dot += q[b] * gp[b];
    const float d = HorizontalSum(dot);
    for (int b = 0; b < nb; ++b) {
      const f8 v = q[b] * (gp[b] - d);
      dx[p * nb + b] = v;
      dnu[p * nb + b] += v;
    }
  }
}

struct CombineArgs {
  int C, nb;
  const f8* ab;      // K_b^T dx or null
  const f8* ag;      // K_g^T dx or null
  float wb, wg;
  const f8* qt;      // Q_t
  const f8* mu;      // mu rows [C][nb] or null (Potts)
  const f8* mu_t;    // mu columns [C][nb]
  f8* g;             // out: dL/dQ_t
};

// For pixels [begin, end): g = s (Potts) or -mu^T s; adds sum <A_k, Q_t> (Potts) or -sum <A_k, mu Q_t> to
// sums[0..1] and sum s Q_t^T (as columns: dmu_t[l'] += Q_t[l'] s) to dmu_t.
template <int NB>
DKCRF_INLINE void CombineT(const CombineArgs& a, int64_t begin, int64_t end, double* sums, f8* dmu_t) {
  const int nb = NB > 0 ? NB : a.nb;
  f8 s[NB > 0 ? NB : kMaxBlocks], u[NB > 0 ? NB : kMaxBlocks];
  f8 sb = f8{}, sg = f8{};
  for (int64_t p = begin; p < end; ++p) {
    const f8* q = a.qt + p * nb;
    const f8* ab = a.ab != nullptr ? a.ab + p * nb : nullptr;
    const f8* ag = a.ag != nullptr ? a.ag + p * nb : nullptr;
    for (int b = 0; b < nb; ++b) s[b] = f8{};
    if (ab != nullptr)
      for (int b = 0; b < nb; ++b) s[b] += a.wb * ab[b];
    if (ag != nullptr)
      for (int b = 0; b < nb; ++b) s[b] += a.wg * ag[b];
    f8* g = a.g + p * nb;
    if (a.mu == nullptr) {
      for (int b = 0; b < nb; ++b) {
        if (ab != nullptr) sb += ab[b] * q[b];
        if (ag != nullptr) sg += ag[b] * q[b];
        g[b] = s[b];
      }
      continue;
    }
    for (int b = 0; b < nb; ++b) u[b] = g[b] = f8{};
    for (int l = 0; l < a.C; ++l) {
      const float ql = q[l / 8][l % 8], sl = s[l / 8][l % 8];
      const f8* column = a.mu_t + static_cast<int64_t>(l) * nb;  // mu[:, l]
      const f8* row = a.mu + static_cast<int64_t>(l) * nb;       // mu[l, :]
      f8* dcol = dmu_t + static_cast<int64_t>(l) * nb;
      for (int b = 0; b < nb; ++b) {
        u[b] += ql * column[b];   // (mu Q_t)
        g[b] -= sl * row[b];      // -mu^T s
        dcol[b] += ql * s[b];     // column l of s Q_t^T
      }
    }
    for (int b = 0; b < nb; ++b) {
      if (ab != nullptr) sb -= ab[b] * u[b];
      if (ag != nullptr) sg -= ag[b] * u[b];
    }
  }
  sums[0] += HorizontalSum(sb);
  sums[1] += HorizontalSum(sg);
}

// The gradient w.r.t. the op's input from dL/d(-U) (padded rows) for pixels [begin, end).
template <int NB>
DKCRF_INLINE void InputGradT(const float* in, InputType type, int C, int nb_rt, const f8* dnu, int64_t begin,
                             int64_t end, float* grad_in) {
  const int nb = NB > 0 ? NB : nb_rt;
  for (int64_t p = begin; p < end; ++p) {
    const float* d = reinterpret_cast<const float*>(dnu + p * nb);
    float* out = grad_in + p * C;
    const float* x = in + p * C;
    if (type == InputType::kLogits) {
      std::memcpy(out, d, sizeof(float) * C);
    } else if (type == InputType::kUnary) {
      for (int l = 0; l < C; ++l) out[l] = -d[l];
    } else {  // -U = log(clip(p, 1e-5, 1)): the clip passes the gradient on [1e-5, 1] (as tf.clip_by_value)
      for (int l = 0; l < C; ++l) out[l] = x[l] >= kProbClip && x[l] <= 1.f ? d[l] / x[l] : 0.f;
    }
  }
}

#define DKCRF_GRAD_KERNELS(SUFFIX, ATTR)                                                                   \
  ATTR void LoadZeroPadded##SUFFIX(const float* src, int C, int nb, int64_t b, int64_t e, f8* dst) {       \
    DKCRF_DISPATCH_NB(nb, (LoadZeroPaddedT<NB>(src, C, nb, b, e, dst)))                                   \
  }                                                                                                        \
  ATTR void Slice##SUFFIX(const Lattice& L, const f8* V, int nb, int64_t b, int64_t e, f8* out) {         \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(nb, (SliceT<NB>(L, V, nb, b, e, out)))                                               \
  }                                                                                                        \
  ATTR void SoftmaxGrad##SUFFIX(const f8* qn, const f8* g, int nb, int64_t b, int64_t e, f8* dx, f8* dnu) { \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(nb, (SoftmaxGradT<NB>(qn, g, nb, b, e, dx, dnu)))                                    \
  }                                                                                                        \
  ATTR void Combine##SUFFIX(const CombineArgs& a, int64_t b, int64_t e, double* sums, f8* dmu_t) {         \
    ScopedFlushDenormal ftz;                                                                               \
    DKCRF_DISPATCH_NB(a.nb, (CombineT<NB>(a, b, e, sums, dmu_t)))                                          \
  }                                                                                                        \
  ATTR void InputGrad##SUFFIX(const float* in, InputType type, int C, int nb, const f8* dnu, int64_t b,   \
                              int64_t e, float* grad_in) {                                                 \
    DKCRF_DISPATCH_NB(nb, (InputGradT<NB>(in, type, C, nb, dnu, b, e, grad_in)))                           \
  }

DKCRF_GRAD_KERNELS(Generic, )
#if defined(DKCRF_X86) && defined(__GNUC__)
DKCRF_GRAD_KERNELS(Avx2, __attribute__((target("avx2,fma"))))
#endif

struct GradKernelTable {
  void (*load)(const float*, int, int, int64_t, int64_t, f8*);
  void (*slice)(const Lattice&, const f8*, int, int64_t, int64_t, f8*);
  void (*softmax_grad)(const f8*, const f8*, int, int64_t, int64_t, f8*, f8*);
  void (*combine)(const CombineArgs&, int64_t, int64_t, double*, f8*);
  void (*input_grad)(const float*, InputType, int, int, const f8*, int64_t, int64_t, float*);
};

const GradKernelTable& GradKernels() {
  static const GradKernelTable table = [] {
#if defined(DKCRF_X86) && defined(__GNUC__)
    if (UseAvx2Kernels())
      return GradKernelTable{LoadZeroPaddedAvx2, SliceAvx2, SoftmaxGradAvx2, CombineAvx2, InputGradAvx2};
#endif
    return GradKernelTable{LoadZeroPaddedGeneric, SliceGeneric, SoftmaxGradGeneric, CombineGeneric,
                           InputGradGeneric};
  }();
  return table;
}

// out = K^T in for a normalised lattice: splat, blur with the directions in reverse order, slice.
void FilterTransposed(const Lattice& L, const f8* in, int nb, const ParallelFor& pfor, f8* V, f8* out) {
  const KernelTable& K = Kernels();
  const GradKernelTable& G = GradKernels();
  const int d1 = L.d + 1;
  pfor(L.num_points, 8 * nb * d1, [&](int64_t b, int64_t e) { K.splat(L, in, nb, b, e, V); });
  for (int j = L.d; j >= 0; --j) {
    const int64_t c0 = L.dir_chain[j], chains = L.dir_chain[j + 1] - c0;
    if (chains == 0) continue;
    pfor(chains, 12 * nb, [&](int64_t b, int64_t e) {
      K.blur(V, L.chain_point.data(), L.chain_start.data(), c0 + b, c0 + e, nb);
    });
  }
  pfor(L.num_pixels, 8 * nb * d1, [&](int64_t b, int64_t e) { G.slice(L, V, nb, b, e, out); });
}

}  // namespace

void BuildGaussianLattice(int64_t height, int64_t width, float xy_std, int num_threads, const ParallelFor& pfor,
                          Lattice* lattice) {
  BuildLattice<2>(height * width, [&](int64_t p, float* f) {
    f[0] = static_cast<float>(p % width) / xy_std;
    f[1] = static_cast<float>(p / width) / xy_std;
  }, num_threads, pfor, lattice);
  Normalize(lattice, pfor);
}

int64_t EstimateGradBytes(int64_t batch, int64_t height, int64_t width, int64_t num_labels,
                          const CrfParams& params, bool saved) {
  const int64_t N = height * width, row = (num_labels + 7) / 8 * 32;
  const int64_t outputs = batch * N * num_labels * 4 + 2 * num_labels * num_labels * 4;
  // Recomputing the marginals: the forward's own peak for one image plus its marginals.
  const int64_t recompute = saved ? 0 : (params.iterations + 1) * N * num_labels * 4 +
                                            EstimateBytes(1, height, width, num_labels, params);
  int64_t lattices = 0, values = 0;
  if (params.iterations > 0 && params.bilateral_weight > 0.f) {
    const int64_t M = kAssumedPointsPerPixel * N;
    lattices += std::max(LatticeBytes(5, N, M), LatticeBuildBytes(5, N, M));
    values += M * row;
  }
  if (params.iterations > 0 && params.gaussian_weight > 0.f) {
    const double s = params.gaussian_xy_std;
    const int64_t M =
        std::min<int64_t>(3 * N, static_cast<int64_t>(1.5 * N / (s * s) + 2.0 * (height + width) / s) + 64);
    lattices += std::max(LatticeBytes(2, N, M), LatticeBuildBytes(2, N, M));
    values += M * row;
  }
  // g, Q_{t+1}, Q_t, dx, dL/d(-U), A_b, A_g.
  const int64_t buffers = 7 * N * row;
  return outputs + recompute + (lattices + values + buffers) / 20 * 21 + (int64_t{8} << 20);
}

std::string DenseCrfGradImage(const float* in, InputType input_type, const uint8_t* image, int64_t height,
                              int64_t width, int num_labels, const CrfParams& params, const float* compat,
                              const float* saved, const float* q, const float* grad_q, int num_threads,
                              const ParallelFor& pfor, const Lattice* gaussian_lattice, int64_t memory_limit,
                              float* grad_in, double* grad_wb, double* grad_wg, double* grad_compat) {
  (void)memory_limit;
  const GradKernelTable& G = GradKernels();
  const int64_t N = height * width;
  const int C = num_labels, nb = (num_labels + 7) / 8;
  const int T = params.iterations;
  const bool use_b = T > 0 && params.bilateral_weight > 0.f, use_g = T > 0 && params.gaussian_weight > 0.f;
  Lattice lb, own_g;
  if (use_b) {
    BuildBilateralLattice(image, height, width, params, num_threads, pfor, &lb);
    Normalize(&lb, pfor);
  }
  const Lattice* lg = gaussian_lattice;
  if (use_g && lg == nullptr) {
    BuildGaussianLattice(height, width, params.gaussian_xy_std, num_threads, pfor, &own_g);
    lg = &own_g;
  }
  AlignedVector g(N * nb), qa(N * nb), qb(N * nb), dx(N * nb), dnu(N * nb);
  f8* qn = qa.data();  // Q_{t+1}
  f8* qt = qb.data();  // Q_t
  std::unique_ptr<AlignedVector> ab, ag, vb, vg, mu, mu_t, dmu_t;
  if (use_b) {
    ab = std::make_unique<AlignedVector>(N * nb);
    vb = std::make_unique<AlignedVector>(std::max<int64_t>(lb.num_points, 1) * nb);
  }
  if (use_g) {
    ag = std::make_unique<AlignedVector>(N * nb);
    vg = std::make_unique<AlignedVector>(std::max<int64_t>(lg->num_points, 1) * nb);
  }
  if (compat != nullptr) {
    mu = std::make_unique<AlignedVector>(static_cast<int64_t>(C) * nb);
    for (int l = 0; l < C; ++l) {
      float* row = reinterpret_cast<float*>(mu->data() + static_cast<int64_t>(l) * nb);
      for (int k = 0; k < 8 * nb; ++k) row[k] = k < C ? compat[l * C + k] : 0.f;
    }
    mu_t = TransposedCompat(compat, C, nb);
    dmu_t = std::make_unique<AlignedVector>(static_cast<int64_t>(C) * nb);
    std::memset(static_cast<void*>(dmu_t->data()), 0, sizeof(f8) * C * nb);
  }
  auto load = [&](const float* src, f8* dst) {
    pfor(N, 2 * C, [&](int64_t b, int64_t e) { G.load(src, C, nb, b, e, dst); });
  };
  pfor(N, 2 * C, [&](int64_t b, int64_t e) {
    std::memset(static_cast<void*>(dnu.data() + b * nb), 0, sizeof(f8) * (e - b) * nb);
  });
  load(grad_q, g.data());
  load(q, qn);  // Q_T
  std::mutex mu_lock;
  double sums[2] = {0.0, 0.0};
  for (int t = T - 1; t >= -1; --t) {
    pfor(N, 6 * nb, [&](int64_t b, int64_t e) { G.softmax_grad(qn, g.data(), nb, b, e, dx.data(), dnu.data()); });
    if (t < 0) break;
    load(saved + static_cast<int64_t>(t) * N * C, qt);
    if (use_b) FilterTransposed(lb, dx.data(), nb, pfor, vb->data(), ab->data());
    if (use_g) FilterTransposed(*lg, dx.data(), nb, pfor, vg->data(), ag->data());
    CombineArgs args{C, nb, use_b ? ab->data() : nullptr, use_g ? ag->data() : nullptr, params.bilateral_weight,
                     params.gaussian_weight, qt, mu ? mu->data() : nullptr, mu_t ? mu_t->data() : nullptr,
                     g.data()};
    pfor(N, (compat != nullptr ? 3 * C + 4 : 4) * nb, [&](int64_t b, int64_t e) {
      double local[2] = {0.0, 0.0};
      std::unique_ptr<AlignedVector> local_mu;
      if (compat != nullptr) {
        local_mu = std::make_unique<AlignedVector>(static_cast<int64_t>(C) * nb);
        std::memset(static_cast<void*>(local_mu->data()), 0, sizeof(f8) * C * nb);
      }
      G.combine(args, b, e, local, local_mu ? local_mu->data() : nullptr);
      std::lock_guard<std::mutex> lock(mu_lock);
      sums[0] += local[0];
      sums[1] += local[1];
      if (compat != nullptr)
        for (int64_t k = 0; k < static_cast<int64_t>(C) * nb; ++k) dmu_t->data()[k] += local_mu->data()[k];
    });
    std::swap(qn, qt);
  }
  *grad_wb += sums[0];
  *grad_wg += sums[1];
  if (compat != nullptr) {  // dL/dmu[l, l'] = -(column l' of s Q^T)[l]
    for (int lp = 0; lp < C; ++lp) {
      const float* col = reinterpret_cast<const float*>(dmu_t->data() + static_cast<int64_t>(lp) * nb);
      for (int l = 0; l < C; ++l) grad_compat[l * C + lp] -= col[l];
    }
  }
  pfor(N, 3 * C, [&](int64_t b, int64_t e) { G.input_grad(in, input_type, C, nb, dnu.data(), b, e, grad_in); });
  return "";
}

}  // namespace dkcrf
