// Mean-field inference in a fully connected CRF with Gaussian edge potentials (Kraehenbuehl & Koltun, NIPS
// 2011), with the semantics of the reference `densecrf` / pydensecrf:
//   unary U = -log(clip(p, 1e-5, 1))   (or the given unary, or -logits),
//   Q0 = softmax(-U);   Q <- softmax(-U + w_b * Kb(Q) + w_g * Kg(Q))   per iteration (Potts compatibility),
// where Kb is the bilateral kernel on (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), Kg the Gaussian kernel on
// (x/sxy, y/sxy), both through a permutohedral lattice with symmetric normalisation 1/sqrt(K 1).
// This header is independent of TensorFlow; dense_crf_op.cc wraps it as a TF op.
#ifndef DEEPLAB_KERAS_CRF_DENSE_CRF_H_
#define DEEPLAB_KERAS_CRF_DENSE_CRF_H_

#include <cstdint>
#include <memory>
#include <string>

#include "permutohedral.h"

namespace dkcrf {

enum class InputType { kProbs = 0, kUnary = 1, kLogits = 2 };

// The CRF parameters (pydensecrf meaning). No defaults here: the Python side (deeplab_keras/crf/params.py,
// CRFParams) is their one source and the op receives every value as an input; ValidateParams checks them.
struct CrfParams {
  int iterations;
  float bilateral_weight;
  float bilateral_xy_std;
  float bilateral_rgb_std;
  float gaussian_weight;
  float gaussian_xy_std;
};

// Limits (documented in the Python API).
constexpr int kMaxLabels = 1024;
constexpr int64_t kMaxPixels = int64_t{1} << 26;   // per image
constexpr int64_t kMaxValues = int64_t{1} << 30;   // pixels x labels per image
constexpr int kMaxIterations = 10000;             // = params.py MAX_ITERATIONS (a test checks)
constexpr float kMaxWeight = 1e6f;                 // = params.py MAX_WEIGHT (a test checks)
constexpr float kMaxFeature = 262144.f;            // x/xy_std, y/xy_std and 255/rgb_std
constexpr float kProbClip = 1e-5f;                 // as pydensecrf.utils.unary_from_softmax
constexpr float kProbSumTolerance = 1e-2f;         // |sum over C of probs - 1| allowed per pixel (float16 softmax)
// Bilateral lattice points per pixel assumed before the lattice is built (VOC photos at DeepLab's parameters:
// 0.5 .. 2.1; noise-like images up to 6, caught by the re-check once the lattice is built).
constexpr int64_t kAssumedPointsPerPixel = 2;

// Bytes the op allocates for `batch` images of height x width with num_labels labels: its output plus the
// peak of one image's working memory (lattices, their construction, the mean-field buffers; -U is kept in the
// output until the last iteration), with 5 % + 8 MiB to spare. bilateral_points:
// the bilateral lattice's size when known (-1: kAssumedPointsPerPixel per pixel).
int64_t EstimateBytes(int64_t batch, int64_t height, int64_t width, int64_t num_labels, const CrfParams& params,
                      int64_t bilateral_points = -1);

// The default memory limit: 80 % of the memory available now (MemAvailable, or the cgroup's remaining
// allowance when lower); -1 when it cannot be read.
int64_t DefaultMemoryLimit();

// "" when `needed` fits `limit` (<= 0: no limit), else the message of the error (estimate, limit, what to do).
std::string MemoryProblem(int64_t needed, int64_t limit, int64_t height, int64_t width, int64_t num_labels,
                          const char* when);

// Returns "" when the parameters are valid for an image of height x width, else a message naming the
// offending argument and what to do.
std::string ValidateParams(const CrfParams& p, int64_t height, int64_t width);

// The Gaussian (x, y) kernel (normalised, without its weight) for height x width images. It depends only on
// the image size, so one build serves every image of a batch (and may be cached across calls).
//
// For a power-of-two xy_std <= 1 (DeepLab's default 1) the features y / xy_std are exact integer multiples and
// moving one row down moves every elevated point by a lattice vector: the lattice filter (splat, blur, slice,
// symmetric normalisation) is then the same linear stencil on every row away from the top and bottom borders
// (each column has its own, x / xy_std * sqrt(3) being irrational). The kernel is read off a probe image of the
// same width and 2 * band + 1 rows and applied as an explicit stencil (about 30 taps for xy_std = 1): no
// splat, blur or slice in the iterations. It equals the lattice filter up to float rounding. Otherwise the
// kernel is the lattice itself.
struct GaussianKernel {
  bool stencil = false;
  Lattice lattice;              // when !stencil
  int64_t width = 0, height = 0;
  int64_t band = 0, probe_rows = 0;
  std::vector<int32_t> start;   // [width * probe_rows + 1]: taps of probe pixel k are [start[k], start[k + 1])
  std::vector<int32_t> offset;  // pixel index offset of a tap (dy * width + dx)
  std::vector<float> weight;    // its weight

  // Probe row whose stencil row y of the image uses.
  int64_t ProbeRow(int64_t y) const {
    if (probe_rows == height || y < band) return y;
    if (y >= height - band) return y - (height - probe_rows);
    return band;
  }
  int64_t Bytes() const;
};

std::shared_ptr<const GaussianKernel> BuildGaussianKernel(int64_t height, int64_t width, float xy_std,
                                                          int num_threads, const ParallelFor& pfor);

// Runs the CRF on one image. `in` is [H*W, C] (probs / unary / logits), `image` [H*W, 3] uint8 (RGB in the
// order the features use), `q` receives [H*W, C] probabilities. Inputs must be validated (finite, sizes).
// `gaussian`: the BuildGaussianKernel result for this size and params.gaussian_xy_std (built here if null).
// memory_limit: bytes (<= 0: none); once the bilateral lattice is built, the estimate is re-checked with its
// real size before the mean-field buffers are allocated. Returns "" or the problem (nothing written to q).
// Throws std::bad_alloc when memory runs out (the caller turns it into an error status).
// compat: a C x C label compatibility mu (row-major; x = -U - mu (w_b Kb(Q) + w_g Kg(Q))), or null for Potts
// (today's update, bit for bit). saved: null, or [iterations, H*W, C] receiving Q_0 .. Q_{iterations-1} (the
// input of every iteration, for the backward pass).
std::string DenseCrfImage(const float* in, InputType input_type, const uint8_t* image, int64_t height,
                          int64_t width, int num_labels, const CrfParams& params, int num_threads,
                          const ParallelFor& pfor, float* q, const GaussianKernel* gaussian = nullptr,
                          int64_t memory_limit = 0, const float* compat = nullptr, float* saved = nullptr);

// Bytes the backward pass (DenseCrfGradImage over a batch) allocates besides its inputs: its outputs, the
// marginals when it has to recompute them (saved == false), and one image's lattices and buffers.
int64_t EstimateGradBytes(int64_t batch, int64_t height, int64_t width, int64_t num_labels,
                          const CrfParams& params, bool saved);

// The backward pass of DenseCrfImage for one image: given the forward's inputs, its per-iteration marginals
// `saved` ([iterations, H*W, C]: Q_0 .. Q_{T-1}), its output `q` and the upstream gradient `grad_q` (finite),
// writes the gradient w.r.t. `in` into grad_in [H*W, C] and adds the gradients w.r.t. the kernel weights to
// *grad_wb, *grad_wg and w.r.t. compat (when given) to grad_compat [C*C]. The filters are applied transposed
// (splat, blur directions in reverse order, slice) on the forward's lattices (the Gaussian one always as a
// lattice; `gaussian_lattice`: a prebuilt one or null). A kernel of weight 0 is not filtered (its gradient is 0).
std::string DenseCrfGradImage(const float* in, InputType input_type, const uint8_t* image, int64_t height,
                              int64_t width, int num_labels, const CrfParams& params, const float* compat,
                              const float* saved, const float* q, const float* grad_q, int num_threads,
                              const ParallelFor& pfor, const Lattice* gaussian_lattice, int64_t memory_limit,
                              float* grad_in, double* grad_wb, double* grad_wg, double* grad_compat);

// The Gaussian (x, y) kernel's lattice for height x width images (normalised), as the backward pass uses it.
void BuildGaussianLattice(int64_t height, int64_t width, float xy_std, int num_threads, const ParallelFor& pfor,
                          Lattice* lattice);

}  // namespace dkcrf

#endif  // DEEPLAB_KERAS_CRF_DENSE_CRF_H_
