// Permutohedral lattice (Adams, Baek, Davis, Eurographics 2010) as used by Kraehenbuehl & Koltun's dense CRF.
//
// The lattice is built once per image and then filters value rows of any width. Compared to the reference
// implementation the data are arranged for many repeated filterings:
//   * the splat is a gather: every lattice point keeps the list of its pixel vertices (ascending, with their
//     weights), so points are splatted in parallel without write conflicts and each sums its contributions in
//     pixel order, exactly like the reference's sequential splat (the result does not depend on the thread
//     count);
//   * blur neighbours are resolved once into chains along each lattice direction, blurred in place (no second
//     buffer, nothing to do for points without neighbours in that direction); one hash look-up per point and
//     direction (k + v_j) finds them;
//   * construction is parallel: ranges of pixels are elevated and inserted into hash tables in parallel (no
//     array of keys in between) and the tables merged in range order.
// The elevation / rounding / rank arithmetic follows the reference float computation step by step so both
// produce the same lattice points for the same features.
#ifndef DEEPLAB_KERAS_CRF_PERMUTOHEDRAL_H_
#define DEEPLAB_KERAS_CRF_PERMUTOHEDRAL_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include <sys/mman.h>

// Compile with -DDKCRF_PROFILE to print the time of each stage (development only).
#ifdef DKCRF_PROFILE
#include <time.h>

#include <chrono>
#include <cstdio>
inline double DkcrfCpuMs() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
#define DKCRF_TIC(name) \
  auto _t_##name = std::chrono::steady_clock::now(); double _c_##name = DkcrfCpuMs()
#define DKCRF_TOC(name)                                                                              \
  std::fprintf(stderr, "  %-10s %6.1f ms wall %6.1f ms cpu\n", #name,                             \
               std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - _t_##name) \
                   .count(),                                                                         \
               DkcrfCpuMs() - _c_##name)
#else
#define DKCRF_TIC(name)
#define DKCRF_TOC(name)
#endif

namespace dkcrf {

// ParallelFor(total, cost_per_unit, fn(begin, end)): runs fn over a partition of [0, total).
using ParallelFor =
    std::function<void(int64_t, int64_t, const std::function<void(int64_t, int64_t)>&)>;

namespace internal {

// Arrays of 8 MiB or more are 2 MiB aligned and marked for transparent huge pages, where the system grants
// them on request: one page fault per 2 MiB instead of 512 (the arrays are allocated per call and first
// touched by the kernels). Others are 64-byte (cache line) aligned.
constexpr size_t kHugePage = size_t{2} << 20;
inline std::align_val_t AlignmentFor(size_t bytes) {
  return std::align_val_t(bytes >= 4 * kHugePage ? kHugePage : 64);
}
inline void* AllocateAligned(size_t bytes) {
  const std::align_val_t align = AlignmentFor(bytes);
  void* p = ::operator new(bytes, align);
#ifdef MADV_HUGEPAGE
  if (align == std::align_val_t(kHugePage)) madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
  return p;
}
inline void FreeAligned(void* p, size_t bytes) { ::operator delete(p, AlignmentFor(bytes)); }

}  // namespace internal

// std::vector whose resize() leaves new elements uninitialised (for large arrays that are written anyway),
// allocated by internal::AllocateAligned.
template <typename T>
struct DefaultInitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <typename U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}  // NOLINT
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(PTRDIFF_MAX) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(internal::AllocateAligned(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept { internal::FreeAligned(p, n * sizeof(T)); }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using RawVector = std::vector<T, DefaultInitAllocator<T>>;

// A built lattice: what repeated filtering needs.
struct Lattice {
  int d = 0;                     // feature dimension
  int64_t num_pixels = 0;        // N
  int64_t num_points = 0;        // M; row M of a value buffer is the all-zero row
  RawVector<int32_t> offset;     // [N * (d+1)] lattice point of each pixel vertex
  RawVector<float> weight;       // [N * (d+1)] barycentric weight (times the pixel's norm after Normalize)
  // Blur chains: along direction j the points form chains p0 -> p1 -> ... (p_{i+1} = p_i + v_j). The blur
  // out[p_i] = in[p_i] + (in[p_{i-1}] + in[p_{i+1}]) / 2 then runs in place along each chain; points with no
  // neighbour in that direction are left alone.
  RawVector<int32_t> chain_point;   // points of all chains (of >= 2 points), direction by direction
  std::vector<int64_t> chain_start;  // chain c is chain_point[chain_start[c] .. chain_start[c + 1])
  std::vector<int64_t> dir_chain;    // [d + 2] chains of direction j: [dir_chain[j], dir_chain[j + 1])
  // Splat as a gather: the vertices of point m are k in [point_start[m], point_start[m + 1]), in ascending
  // pixel order, so each point sums its contributions in the reference's order and points can be splatted in
  // parallel without write conflicts. The pixel and the weight of each vertex are stored in that order (two
  // sequential streams per splat instead of an entry index to divide by d+1 and a scattered weight read).
  RawVector<int32_t> point_start;     // [M + 1]
  RawVector<int32_t> point_pixel;     // [N * (d+1)] pixel of vertex k
  RawVector<float> point_weight;      // [N * (d+1)] its weight (= weight[entry], kept equal by Normalize)
};

namespace internal {

// Linear key hash k -> sum_i k_i * c_i (mod 2^32) with R_d ("generalised golden ratio") multipliers: lattice
// points spread evenly over the table, and since the hash is linear the blur neighbour k +- v has hash
// h +- H(v). The table is indexed by the top hash bits, so nearby keys land in nearby slots: insertion in pixel
// order, the neighbour search in slot order and (after renumbering points in slot order) the blur all walk the
// memory in a few streams instead of at random.
inline uint32_t Multiplier(int d, int i) {
  double x = 1.5;
  for (int it = 0; it < 100; ++it) x = std::pow(x + 1.0, 1.0 / (d + 1));  // root of x^(d+1) = x + 1
  return static_cast<uint32_t>(std::llround(std::pow(1.0 / x, i + 1) * 4294967296.0)) | 1u;
}

// Bijective mixer, used instead of the identity when the linear hash clusters (probe counts too high).
inline uint32_t Mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

// Open-addressing table (linear probing, load <= 1/2, doubling when full).
// A slot holds the key, its linear hash and the point id.
template <int D>
struct Table {
  struct Slot {
    uint32_t hash;  // linear hash of the key
    int32_t id;     // -1: empty
    int32_t key[D];
  };
  RawVector<Slot> slots;
  uint32_t mask = 0, size = 0;
  int shift = 0;
  bool mix = false;

  void Init(int64_t expected, bool mixing) {
    mix = mixing;
    int bits = 4;
    while ((int64_t{1} << bits) < 2 * expected && bits < 30) ++bits;
    Resize(bits);
    size = 0;
  }
  uint32_t SlotOf(uint32_t h) const {
    return (mix ? Mix(h) : h) >> shift;
  }
  static bool Equal(const int32_t* a, const int32_t* b) {
    bool eq = true;
    for (int i = 0; i < D; ++i) eq &= a[i] == b[i];
    return eq;
  }
  void Prefetch(uint32_t h) const { __builtin_prefetch(&slots[SlotOf(h)], 0, 3); }
  // Id of the key or -1; *probes counts the occupied slots passed over.
  int32_t Find(const int32_t* key, uint32_t h, int64_t* probes = nullptr) const {
    for (uint32_t s = SlotOf(h);; s = (s + 1) & mask) {
      const Slot& slot = slots[s];
      if (slot.id < 0) return -1;
      if (slot.hash == h && Equal(slot.key, key)) return slot.id;
      if (probes != nullptr) ++*probes;
    }
  }
  // Id of the key, inserted when absent (may allocate: throws std::bad_alloc).
  int32_t Insert(const int32_t* key, uint32_t h, int64_t* probes) {
    const int32_t found = Find(key, h, probes);
    if (found >= 0) return found;
    if (2 * (static_cast<uint64_t>(size) + 1) > slots.size()) Grow();
    uint32_t s = SlotOf(h);
    while (slots[s].id >= 0) s = (s + 1) & mask;
    Slot& slot = slots[s];
    slot.hash = h;
    slot.id = static_cast<int32_t>(size);
    for (int i = 0; i < D; ++i) slot.key[i] = key[i];
    return static_cast<int32_t>(size++);
  }

 private:
  void Resize(int bits) {
    slots.assign(size_t{1} << bits, Slot{0, -1, {}});
    mask = static_cast<uint32_t>(slots.size() - 1);
    shift = 32 - bits;
  }
  void Grow() {
    RawVector<Slot> old;
    old.swap(slots);
    Resize(32 - shift + 1);
    for (const Slot& slot : old) {
      if (slot.id < 0) continue;
      uint32_t s = SlotOf(slot.hash);
      while (slots[s].id >= 0) s = (s + 1) & mask;
      slots[s] = slot;
    }
  }
};

}  // namespace internal

// Elevation of one pixel onto the lattice: its D+1 enclosing simplex vertices (keys, linear hashes) and
// barycentric weights. Follows the reference float computation step by step (same points, same weights).
template <int D>
struct Elevator {
  static constexpr int D1 = D + 1;
  float scale[D];
  int canonical[D1 * D1];
  uint32_t mult[D];

  Elevator() {
    // Elevation matrix scale, computed like the reference (double, stored as float).
    const float inv_std_dev = static_cast<float>(std::sqrt(2.0 / 3.0) * D1);
    for (int i = 0; i < D; ++i)
      scale[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) * inv_std_dev);
    for (int i = 0; i <= D; ++i) {
      for (int j = 0; j <= D - i; ++j) canonical[i * D1 + j] = i;
      for (int j = D - i + 1; j <= D; ++j) canonical[i * D1 + j] = i - D1;
    }
    for (int i = 0; i < D; ++i) mult[i] = internal::Multiplier(D, i);
  }

  // Round half to even, like the reference's cvtps2dq, without a libm call (plain x86-64 has no roundps):
  // adding and subtracting 1.5 * 2^23 rounds in the default mode for |v| < 2^22 (always true here: features
  // are <= 2^18, checked by the caller). Needs IEEE semantics (no -ffast-math, which would fold it to v).
  static float RoundHalfEven(float v) {
    if (!(std::fabs(v) < 4194304.f)) return std::nearbyint(v);
    return (v + 12582912.f) - 12582912.f;
  }

  // f: the pixel's D features. Writes key[r * D + i], hash[r] and weight[r] for the vertices r = 0..D.
  void operator()(const float* f, int32_t* key, uint32_t* hash, float* weight) const {
    const float down = 1.0f / D1, up = static_cast<float>(D1);
    float elevated[D1], rem0[D1], rank[D1], bary[D1 + 1];
    float sm = 0.f;
    for (int j = D; j > 0; --j) {
      const float cf = f[j - 1] * scale[j - 1];
      elevated[j] = sm - static_cast<float>(j) * cf;
      sm += cf;
    }
    elevated[0] = sm;
    float sum = 0.f;
    for (int i = 0; i <= D; ++i) {
      const float v = RoundHalfEven(down * elevated[i]);
      rem0[i] = v * up;
      sum += v;
    }
    float diff[D1];
    for (int i = 0; i <= D; ++i) {
      diff[i] = elevated[i] - rem0[i];
      rank[i] = 0.f;
    }
    for (int i = 0; i < D; ++i) {  // branch-free: the comparisons are unpredictable
      for (int j = i + 1; j <= D; ++j) {
        const float smaller = diff[i] < diff[j] ? 1.f : 0.f;
        rank[i] += smaller;
        rank[j] += 1.f - smaller;
      }
    }
    for (int i = 0; i <= D; ++i) {
      rank[i] += sum;
      if (rank[i] < 0.f) { rank[i] += up; rem0[i] += up; }
      else if (rank[i] >= up) { rank[i] -= up; rem0[i] -= up; }
    }
    for (int i = 0; i <= D + 1; ++i) bary[i] = 0.f;
    for (int i = 0; i <= D; ++i) {
      const float v = (elevated[i] - rem0[i]) * down;
      const int r = D - static_cast<int>(rank[i]);
      bary[r] += v;
      bary[r + 1] -= v;
    }
    bary[0] += 1.f + bary[D + 1];
    for (int r = 0; r <= D; ++r) {
      uint32_t h = 0;
      for (int i = 0; i < D; ++i) {
        key[r * D + i] = static_cast<int32_t>(rem0[i]) + canonical[r * D1 + static_cast<int>(rank[i])];
        h += static_cast<uint32_t>(key[r * D + i]) * mult[i];
      }
      hash[r] = h;
      weight[r] = bary[r];
    }
  }
};

// Elevates pixels [p0, p1) and inserts their vertices into table t (sets lat->offset / weight of their
// entries). Pixels are elevated kAhead pixels before their insertion, their vertices' slots prefetched
// meanwhile. A vertex equal to the same vertex of the previous pixel (most of them: neighbouring pixels mostly
// share a simplex) takes its id without a table look-up.
template <int D, typename FeatureFn>
void InsertRange(const Elevator<D>& elevate, const FeatureFn& feature, int64_t p0, int64_t p1, bool mix,
                 Lattice* lat, internal::Table<D>* t, int64_t* probes) {
  constexpr int D1 = D + 1, kAhead = 8, kRing = 16;  // pixel p's vertices are in ring slot p % kRing
  int32_t keys[kRing * D1 * D];
  uint32_t hashes[kRing * D1];
  t->Init((p1 - p0) * D1 / 8 + 16, mix);
  auto elevate_pixel = [&](int64_t p) {
    float f[D];
    feature(p, f);
    const int64_t slot = p % kRing;
    elevate(f, &keys[slot * D1 * D], &hashes[slot * D1], &lat->weight[p * D1]);
    for (int r = 0; r < D1; ++r) t->Prefetch(hashes[slot * D1 + r]);
  };
  for (int64_t p = p0; p < std::min(p0 + kAhead, p1); ++p) elevate_pixel(p);
  for (int64_t p = p0; p < p1; ++p) {
    if (p + kAhead < p1) elevate_pixel(p + kAhead);
    const int64_t k0 = (p % kRing) * D1, prev0 = ((p + kRing - 1) % kRing) * D1;
    for (int r = 0; r < D1; ++r) {
      const int64_t k = k0 + r, prev = prev0 + r;
      if (p > p0 && hashes[k] == hashes[prev] && internal::Table<D>::Equal(&keys[k * D], &keys[prev * D])) {
        lat->offset[p * D1 + r] = lat->offset[(p - 1) * D1 + r];
      } else {
        lat->offset[p * D1 + r] = t->Insert(&keys[k * D], hashes[k], probes);
      }
    }
  }
}

// Builds the lattice for N pixels whose D features come from feature(i, float* out).
// Requires |feature| <= 2^18 (checked by the caller) so that lattice coordinates are exact in float.
// num_threads: parallelism to prepare for (pixel ranges inserted in parallel); the result does not depend on it.
template <int D, typename FeatureFn>
void BuildLattice(int64_t N, const FeatureFn& feature, int num_threads, const ParallelFor& pfor, Lattice* lat) {
  constexpr int D1 = D + 1;
  const int64_t E = N * D1;  // pixel vertices ("entries")
  lat->d = D;
  lat->num_pixels = N;
  lat->offset.resize(E);
  lat->weight.resize(E);
  const Elevator<D> elevate;
  const uint32_t* mult = elevate.mult;

  DKCRF_TIC(insert);
  // 1. Elevate the pixels and insert their vertices into hash tables, in pixel order. With P > 1 threads,
  // table p takes the p-th range of pixels; the tables are then merged into table 0 in range order. A point's
  // id is thus its order of first use by the pixels (raster order) for any P: the vertices of nearby pixels
  // get nearby ids, which keeps the per-iteration splat and slice cache-friendly.
  const int P = num_threads > 1 && E > 4 * 65536 ? std::min(num_threads, 16) : 1;
  std::vector<int64_t> first(P + 1);  // pixels of range p: [first[p], first[p + 1])
  for (int p = 0; p <= P; ++p) first[p] = N * p / P;
  std::vector<internal::Table<D>> tables(P);
  bool mix = false;
  for (int attempt = 0; attempt < 2; ++attempt, mix = true) {
    std::vector<int64_t> probes(P, 0);
    std::atomic<bool> out_of_memory(false);
    pfor(P, 60 * E / P, [&](int64_t pb, int64_t pe) {
      try {
        for (int64_t p = pb; p < pe; ++p) InsertRange(elevate, feature, first[p], first[p + 1], mix, lat,
                                                      &tables[p], &probes[p]);
      } catch (const std::bad_alloc&) {  // never let an exception escape a worker thread
        out_of_memory = true;
      }
    });
    if (out_of_memory) throw std::bad_alloc();
    int64_t total_probes = 0;
    for (int64_t v : probes) total_probes += v;
    if (total_probes <= 4 * E + 1024) break;  // else the linear hash clusters on this input: mix it
  }
  DKCRF_TOC(insert);
  DKCRF_TIC(merge);
  internal::Table<D>& table = tables[0];
  if (P > 1) {
    std::vector<std::vector<int32_t>> to_global(P);
    for (int p = 1; p < P; ++p) {
      const internal::Table<D>& t = tables[p];
      std::vector<uint32_t> slot_of(t.size);  // local id -> slot
      for (size_t s = 0; s < t.slots.size(); ++s) {
        if (t.slots[s].id >= 0) slot_of[t.slots[s].id] = static_cast<uint32_t>(s);
      }
      to_global[p].resize(t.size);
      for (uint32_t id = 0; id < t.size; ++id) {
        const auto& slot = t.slots[slot_of[id]];
        to_global[p][id] = table.Insert(slot.key, slot.hash, nullptr);
      }
    }
    tables.resize(1);
    pfor(P - 1, 2 * E / P, [&](int64_t pb, int64_t pe) {
      for (int64_t p = pb + 1; p < pe + 1; ++p) {
        for (int64_t e = first[p] * D1; e < first[p + 1] * D1; ++e) lat->offset[e] = to_global[p][lat->offset[e]];
      }
    });
  }
  const int64_t M = table.size;
  lat->num_points = M;
  DKCRF_TOC(merge);

  DKCRF_TIC(neighbours);
  // 3. Blur neighbours k + v_j of every point along the D+1 lattice directions (v_j = 1 except -D at j); the
  // neighbour k - v_j is the point whose k + v_j is k, so one look-up per point and direction suffices.
  uint32_t delta[D1];
  for (int j = 0; j <= D; ++j) {
    uint32_t h = 0;
    for (int i = 0; i < D; ++i) h += static_cast<uint32_t>(i == j ? -D : 1) * mult[i];
    delta[j] = h;
  }
  // Found in slot order (the look-ups then walk the table in D1 streams), written direction-major (each
  // direction's chains are then linked within one array of M ids).
  RawVector<int32_t> next(static_cast<size_t>(D1) * M);
  const int64_t num_slots = static_cast<int64_t>(table.slots.size());
  pfor(num_slots, 10 * D1, [&](int64_t lo, int64_t hi) {
    int32_t nk[D];
    constexpr int64_t kAhead = 4;  // prefetch the neighbour slots of the point this many slots ahead
    for (int64_t s = lo; s < hi; ++s) {
      if (s + kAhead < hi) {
        const auto& ahead = table.slots[s + kAhead];
        if (ahead.id >= 0)
          for (int j = 0; j <= D; ++j) table.Prefetch(ahead.hash + delta[j]);
      }
      const auto& slot = table.slots[s];
      if (slot.id < 0) continue;
      for (int j = 0; j <= D; ++j) {
        for (int i = 0; i < D; ++i) nk[i] = slot.key[i] + (i == j ? -D : 1);
        const int32_t id = table.Find(nk, slot.hash + delta[j]);
        next[j * M + slot.id] = id < 0 ? static_cast<int32_t>(M) : id;
      }
    }
  });
  tables.clear();
  tables.shrink_to_fit();
  DKCRF_TOC(neighbours);
  DKCRF_TIC(chains);
  // Chains along each direction, started at points without a predecessor, in ascending start order
  // (directions in parallel, then concatenated).
  std::vector<std::vector<int32_t>> dir_points(D1);
  std::vector<std::vector<int64_t>> dir_starts(D1);
  pfor(D1, 8 * M, [&](int64_t jb, int64_t je) {
    std::vector<char> has_previous(M);
    for (int64_t j = jb; j < je; ++j) {
      const int32_t* nj = &next[j * M];
      std::fill(has_previous.begin(), has_previous.end(), 0);
      for (int64_t m = 0; m < M; ++m)
        if (nj[m] != M) has_previous[nj[m]] = 1;
      std::vector<int32_t>& points = dir_points[j];
      std::vector<int64_t>& starts = dir_starts[j];
      for (int64_t m = 0; m < M; ++m) {
        if (has_previous[m] || nj[m] == M) continue;  // not a chain start, or an isolated point
        starts.push_back(static_cast<int64_t>(points.size()));
        for (int64_t x = m; x != M; x = nj[x]) points.push_back(static_cast<int32_t>(x));
      }
    }
  });
  next.clear();
  next.shrink_to_fit();
  int64_t total_points = 0, total_chains = 0;
  for (int j = 0; j < D1; ++j) {
    total_points += static_cast<int64_t>(dir_points[j].size());
    total_chains += static_cast<int64_t>(dir_starts[j].size());
  }
  lat->chain_point.resize(total_points);
  lat->chain_start.resize(total_chains + 1);
  lat->dir_chain.assign(D1 + 1, 0);
  int64_t c = 0, i = 0;
  for (int j = 0; j < D1; ++j) {
    lat->dir_chain[j] = c;
    for (int64_t start : dir_starts[j]) lat->chain_start[c++] = i + start;
    std::copy(dir_points[j].begin(), dir_points[j].end(), lat->chain_point.begin() + i);
    i += static_cast<int64_t>(dir_points[j].size());
    if (j == D) {
      lat->dir_chain[D1] = c;
      lat->chain_start[c] = i;
    }
  }
  DKCRF_TOC(chains);

  DKCRF_TIC(groups);
  // 4. Vertices grouped by point (counting sort on the point id, stable in e).
  lat->point_start.assign(M + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++lat->point_start[lat->offset[e] + 1];
  for (int64_t m = 0; m < M; ++m) lat->point_start[m + 1] += lat->point_start[m];
  lat->point_pixel.resize(E);
  lat->point_weight.resize(E);
  {
    RawVector<int32_t> fill(lat->point_start.begin(), lat->point_start.end() - 1);
    for (int64_t e = 0; e < E; ++e) {
      const int32_t k = fill[lat->offset[e]]++;
      lat->point_pixel[k] = static_cast<int32_t>(e / D1);
      lat->point_weight[k] = lat->weight[e];
    }
  }
  DKCRF_TOC(groups);
}

}  // namespace dkcrf

#endif  // DEEPLAB_KERAS_CRF_PERMUTOHEDRAL_H_
