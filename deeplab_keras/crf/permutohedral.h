// Permutohedral lattice (Adams, Baek, Davis, Eurographics 2010) as used by Kraehenbuehl & Koltun's dense CRF.
//
// The lattice is built once per image and then filters value rows of any width. Compared to the reference
// implementation the data are arranged for many repeated filterings:
//   * the splat is split into T ranges of lattice points; range t keeps the list of pixel vertices that land
//     in it (ascending), so T threads splat without write conflicts and every point sums its contributions in
//     pixel order, exactly like the reference's sequential splat (the result does not depend on T);
//   * blur neighbours are resolved to indices once; a missing neighbour points at a zero row (index M);
//   * construction is parallel: pixels are elevated and hashed in parallel, then lattice points are inserted
//     into hash tables partitioned by key hash.
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
#include <new>
#include <vector>

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

// A built lattice: what repeated filtering needs.
struct Lattice {
  int d = 0;                     // feature dimension
  int64_t num_pixels = 0;        // N
  int64_t num_points = 0;        // M; row M of a value buffer is the all-zero row
  std::vector<int32_t> offset;   // [N * (d+1)] lattice point of each pixel vertex
  std::vector<float> weight;     // [N * (d+1)] barycentric weight (times the pixel's norm after Normalize)
  std::vector<int32_t> nbr;      // [(d+1) * M * 2] blur neighbours per direction; M when absent
  std::vector<int64_t> range_point;   // [T + 1] splat range t covers points [range_point[t], range_point[t+1])
  std::vector<int64_t> range_start;   // [T + 1] its vertices are range_entry[range_start[t] .. range_start[t+1])
  std::vector<int32_t> range_entry;   // [N * (d+1)] pixel-vertex indices, ascending within a range
};

namespace internal {

inline uint32_t HashKey(const int32_t* key, int d) {
  uint64_t h = 0;
  for (int i = 0; i < d; ++i) h = (h + static_cast<uint32_t>(key[i])) * 0x9E3779B97F4A7C15ULL;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return static_cast<uint32_t>(h);
}

inline int PartOf(uint32_t h, int num_parts) {
  return static_cast<int>((static_cast<uint64_t>(h) * static_cast<uint64_t>(num_parts)) >> 32);
}

// Open-addressing table of one key partition (linear probing, load <= 1/2, doubling when full). A slot holds
// the key hash and the point id local to the partition, so probing rarely touches the keys.
template <int D>
struct PartTable {
  struct Slot {
    uint32_t hash;
    int32_t id;  // -1: empty
  };
  std::vector<Slot> slots;
  std::vector<int32_t> keys;  // [local id * D + i]
  int64_t size = 0;
  uint32_t mask = 0;

  void Init(int64_t expected_points) {
    uint64_t cap = 16;
    while (cap < static_cast<uint64_t>(2 * expected_points)) cap <<= 1;
    slots.assign(cap, Slot{0, -1});
    mask = static_cast<uint32_t>(cap - 1);
    keys.reserve(static_cast<size_t>(expected_points) * D);
    size = 0;
  }

  static bool Equal(const int32_t* a, const int32_t* b) {
    bool eq = true;
    for (int i = 0; i < D; ++i) eq &= a[i] == b[i];
    return eq;
  }

  // Local id of key, or -1 when absent.
  int32_t Find(const int32_t* key, uint32_t h) const {
    for (uint32_t s = h & mask;; s = (s + 1) & mask) {
      const Slot& slot = slots[s];
      if (slot.id < 0) return -1;
      if (slot.hash == h && Equal(&keys[static_cast<int64_t>(slot.id) * D], key)) return slot.id;
    }
  }

  // Local id of key, inserting it when absent (may allocate: throws std::bad_alloc).
  int32_t Insert(const int32_t* key, uint32_t h) {
    uint32_t s = h & mask;
    for (;; s = (s + 1) & mask) {
      const Slot& slot = slots[s];
      if (slot.id < 0) break;
      if (slot.hash == h && Equal(&keys[static_cast<int64_t>(slot.id) * D], key)) return slot.id;
    }
    if (2 * (size + 1) > static_cast<int64_t>(slots.size())) {
      Grow();
      for (s = h & mask; slots[s].id >= 0; s = (s + 1) & mask) {}
    }
    slots[s] = Slot{h, static_cast<int32_t>(size)};
    keys.insert(keys.end(), key, key + D);
    return static_cast<int32_t>(size++);
  }

 private:
  void Grow() {
    std::vector<Slot> old(2 * slots.size(), Slot{0, -1});
    old.swap(slots);
    mask = static_cast<uint32_t>(slots.size() - 1);
    for (const Slot& slot : old) {
      if (slot.id < 0) continue;
      uint32_t s = slot.hash & mask;
      while (slots[s].id >= 0) s = (s + 1) & mask;
      slots[s] = slot;
    }
  }
};

}  // namespace internal

// Builds the lattice for N pixels whose D features come from feature(i, float* out).
// Requires |feature| <= 2^18 (checked by the caller) so that lattice coordinates are exact in float.
// num_parts: number of hash partitions and of splat ranges (>= 1; the result does not depend on it).
template <int D, typename FeatureFn>
void BuildLattice(int64_t N, const FeatureFn& feature, int num_parts, const ParallelFor& pfor,
                  Lattice* lat) {
  constexpr int D1 = D + 1;
  const int64_t E = N * D1;  // pixel vertices ("entries")
  lat->d = D;
  lat->num_pixels = N;
  lat->offset.assign(E, 0);
  lat->weight.assign(E, 0.f);
  std::vector<int32_t> keys(E * D);
  std::vector<uint32_t> hashes(E);

  // Elevation matrix scale, computed like the reference (double, stored as float).
  const float inv_std_dev = static_cast<float>(std::sqrt(2.0 / 3.0) * D1);
  float scale[D];
  for (int i = 0; i < D; ++i)
    scale[i] = static_cast<float>(1.0 / std::sqrt(static_cast<double>((i + 2) * (i + 1))) * inv_std_dev);
  int canonical[D1 * D1];
  for (int i = 0; i <= D; ++i) {
    for (int j = 0; j <= D - i; ++j) canonical[i * D1 + j] = i;
    for (int j = D - i + 1; j <= D; ++j) canonical[i * D1 + j] = i - D1;
  }

  DKCRF_TIC(elevate);
  // 1. Elevate every pixel, find its simplex, its D+1 vertex keys and barycentric weights.
  pfor(N, 40 * D1 * D1, [&](int64_t begin, int64_t end) {
    const float down = 1.0f / D1, up = static_cast<float>(D1);
    float f[D], elevated[D1], rem0[D1], rank[D1], bary[D1 + 1];
    for (int64_t p = begin; p < end; ++p) {
      feature(p, f);
      float sm = 0.f;
      for (int j = D; j > 0; --j) {
        const float cf = f[j - 1] * scale[j - 1];
        elevated[j] = sm - static_cast<float>(j) * cf;
        sm += cf;
      }
      elevated[0] = sm;
      float sum = 0.f;
      for (int i = 0; i <= D; ++i) {
        const float v = std::nearbyint(down * elevated[i]);  // round half to even, like cvtps2dq
        rem0[i] = v * up;
        sum += v;
      }
      for (int i = 0; i <= D; ++i) rank[i] = 0.f;
      for (int i = 0; i < D; ++i) {
        const float di = elevated[i] - rem0[i];
        for (int j = i + 1; j <= D; ++j) {
          if (di < elevated[j] - rem0[j]) rank[i] += 1.f; else rank[j] += 1.f;
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
        const int64_t e = p * D1 + r;
        int32_t* key = &keys[e * D];
        for (int i = 0; i < D; ++i)
          key[i] = static_cast<int32_t>(rem0[i]) + canonical[r * D1 + static_cast<int>(rank[i])];
        hashes[e] = internal::HashKey(key, D);
        lat->weight[e] = bary[r];
      }
    }
  });

  DKCRF_TOC(elevate);
  DKCRF_TIC(insert);
  // 2. Insert the keys into per-partition tables (partition p gives its points ids base[p] + local id).
  std::vector<int64_t> part_entries(num_parts, 0);
  for (int64_t e = 0; e < E; ++e) ++part_entries[internal::PartOf(hashes[e], num_parts)];
  std::vector<internal::PartTable<D>> tables(num_parts);
  for (int p = 0; p < num_parts; ++p) tables[p].Init(part_entries[p] / 8 + 16);
  std::atomic<bool> out_of_memory(false);
  pfor(num_parts, 20 * E, [&](int64_t pb, int64_t pe) {
    try {
      for (int64_t p = pb; p < pe; ++p) {
        internal::PartTable<D>& t = tables[p];
        for (int64_t e = 0; e < E; ++e) {
          const uint32_t h = hashes[e];
          if (internal::PartOf(h, num_parts) == p) lat->offset[e] = t.Insert(&keys[e * D], h);
        }
      }
    } catch (const std::bad_alloc&) {  // never let an exception escape a worker thread
      out_of_memory = true;
    }
  });
  if (out_of_memory) throw std::bad_alloc();
  keys.clear();
  keys.shrink_to_fit();
  std::vector<int64_t> base(num_parts + 1, 0);
  for (int p = 0; p < num_parts; ++p) base[p + 1] = base[p] + tables[p].size;
  const int64_t M = base[num_parts];
  lat->num_points = M;
  if (num_parts > 1) {
    pfor(E, 4, [&](int64_t b, int64_t end) {
      for (int64_t e = b; e < end; ++e)
        lat->offset[e] += static_cast<int32_t>(base[internal::PartOf(hashes[e], num_parts)]);
    });
  }
  hashes.clear();
  hashes.shrink_to_fit();

  DKCRF_TOC(insert);
  DKCRF_TIC(neighbours);
  // 3. Blur neighbours of every point along each of the D+1 lattice directions.
  lat->nbr.assign(static_cast<size_t>(D1) * M * 2, static_cast<int32_t>(M));
  auto find = [&](const int32_t* key) -> int32_t {
    const uint32_t h = internal::HashKey(key, D);
    const int p = internal::PartOf(h, num_parts);
    const int32_t id = tables[p].Find(key, h);
    return id < 0 ? static_cast<int32_t>(M) : static_cast<int32_t>(base[p] + id);
  };
  pfor(M, 30 * D1 * D, [&](int64_t b, int64_t end) {
    int32_t n1[D], n2[D];
    int p = 0;
    for (int64_t m = b; m < end; ++m) {
      while (m >= base[p + 1]) ++p;
      const int32_t* key = &tables[p].keys[(m - base[p]) * D];
      for (int j = 0; j <= D; ++j) {
        for (int k = 0; k < D; ++k) { n1[k] = key[k] - 1; n2[k] = key[k] + 1; }
        if (j < D) { n1[j] = key[j] + D; n2[j] = key[j] - D; }
        int32_t* out = &lat->nbr[(static_cast<int64_t>(j) * M + m) * 2];
        out[0] = find(n1);
        out[1] = find(n2);
      }
    }
  });
  tables.clear();
  tables.shrink_to_fit();

  DKCRF_TOC(neighbours);
  DKCRF_TIC(ranges);
  // 4. Splat ranges: T contiguous ranges of points, each with its vertices in ascending order.
  const int T = num_parts;
  // Point o belongs to range floor(o * T / M), i.e. range t is [ceil(t * M / T), ceil((t + 1) * M / T)).
  lat->range_point.assign(T + 1, 0);
  for (int t = 0; t <= T; ++t) lat->range_point[t] = (t * M + T - 1) / T;
  lat->range_entry.resize(E);
  auto range_of = [&](int64_t o) { return static_cast<int>((o * T) / M); };
  std::vector<int64_t> count(T + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++count[range_of(lat->offset[e]) + 1];
  for (int t = 0; t < T; ++t) count[t + 1] += count[t];
  lat->range_start.assign(count.begin(), count.end());
  for (int64_t e = 0; e < E; ++e) lat->range_entry[count[range_of(lat->offset[e])]++] = static_cast<int32_t>(e);
  DKCRF_TOC(ranges);
}

}  // namespace dkcrf

#endif  // DEEPLAB_KERAS_CRF_PERMUTOHEDRAL_H_
