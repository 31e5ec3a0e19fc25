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

struct CrfParams {
  int iterations = 10;
  float bilateral_weight = 4.f;
  float bilateral_xy_std = 67.f;
  float bilateral_rgb_std = 3.f;
  float gaussian_weight = 3.f;
  float gaussian_xy_std = 1.f;
};

// Limits (documented in the Python API).
constexpr int kMaxLabels = 1024;
constexpr int64_t kMaxPixels = int64_t{1} << 26;   // per image
constexpr int64_t kMaxValues = int64_t{1} << 30;   // pixels x labels per image
constexpr int kMaxIterations = 10000;
constexpr float kMaxFeature = 262144.f;            // x/xy_std, y/xy_std and 255/rgb_std
constexpr float kProbClip = 1e-5f;                 // as pydensecrf.utils.unary_from_softmax

// Returns "" when the parameters are valid for an image of height x width, else a message naming the
// offending argument and what to do.
std::string ValidateParams(const CrfParams& p, int64_t height, int64_t width);

// Splat ranges / hash partitions used for an image of `num_pixels` pixels with `num_threads` threads.
int SplitCount(int64_t num_pixels, int num_threads);

// The Gaussian (x, y) kernel's lattice (normalised) for height x width images: it depends only on the image
// size, so one build serves every image of a batch (and may be cached across calls).
std::shared_ptr<const Lattice> BuildGaussianLattice(int64_t height, int64_t width, float xy_std, int num_threads,
                                                    const ParallelFor& pfor);

// Runs the CRF on one image. `in` is [H*W, C] (probs / unary / logits), `image` [H*W, 3] uint8 (RGB in the
// order the features use), `q` receives [H*W, C] probabilities. Inputs must be validated (finite, sizes).
// `gaussian`: the BuildGaussianLattice result for this size and params.gaussian_xy_std (built here if null).
// Throws std::bad_alloc when memory runs out (the caller turns it into an error status).
void DenseCrfImage(const float* in, InputType input_type, const uint8_t* image, int64_t height,
                   int64_t width, int num_labels, const CrfParams& params, int num_threads,
                   const ParallelFor& pfor, float* q, const Lattice* gaussian = nullptr);

}  // namespace dkcrf

#endif  // DEEPLAB_KERAS_CRF_DENSE_CRF_H_
