// TensorFlow op "DenseCrf": fully connected CRF mean-field inference (see dense_crf.h).
#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>
#include <cmath>
#include <new>
#include <string>

#include "dense_crf.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// Written into the binary so the Python loader can tell a stale library from a current one without loading it.
#ifndef DKCRF_BUILD_STAMP
#define DKCRF_BUILD_STAMP "unknown"
#endif
extern "C" __attribute__((visibility("default"), used)) const char dkcrf_build_stamp[] =
    "DKCRF_STAMP[" DKCRF_BUILD_STAMP "]";

Status DenseCrfShape(InferenceContext* c) {
  ShapeHandle in = c->input(0), im = c->input(1);
  if (c->RankKnown(in) && c->Rank(in) != 4)
    return errors::InvalidArgument("DenseCrf: `probs` must be rank 4 [N, H, W, C], got shape ",
                                   c->DebugString(in));
  if (c->RankKnown(im) && c->Rank(im) != 4)
    return errors::InvalidArgument("DenseCrf: `images` must be rank 4 [N, H, W, 3], got shape ",
                                   c->DebugString(im));
  TF_RETURN_IF_ERROR(c->WithRank(in, 4, &in));
  TF_RETURN_IF_ERROR(c->WithRank(im, 4, &im));
  if (c->ValueKnown(c->Dim(im, 3)) && c->Value(c->Dim(im, 3)) != 3)
    return errors::InvalidArgument("DenseCrf: `images` must have 3 channels (RGB), got shape ",
                                   c->DebugString(im));
  const char* names[3] = {"N (batch)", "H (height)", "W (width)"};
  std::vector<DimensionHandle> dims(4);
  for (int i = 0; i < 3; ++i) {
    if (!c->Merge(c->Dim(in, i), c->Dim(im, i), &dims[i]).ok())
      return errors::InvalidArgument("DenseCrf: `probs` and `images` disagree on ", names[i], ": ",
                                     c->DebugString(in), " vs ", c->DebugString(im));
  }
  dims[3] = c->Dim(in, 3);
  for (int i = 2; i < 8; ++i) {
    ShapeHandle unused;
    if (!c->WithRank(c->input(i), 0, &unused).ok())
      return errors::InvalidArgument("DenseCrf: input ", i, " (a parameter) must be a scalar, got shape ",
                                     c->DebugString(c->input(i)));
  }
  c->set_output(0, c->MakeShape(dims));
  bool save = false;
  TF_RETURN_IF_ERROR(c->GetAttr("save_marginals", &save));
  c->set_output(1, c->MakeShape({dims[0], save ? c->UnknownDim() : c->MakeDim(0), dims[1], dims[2], dims[3]}));
  return OkStatus();
}

}  // namespace

// The inputs of DenseCrf, also the first inputs of its gradient DenseCrfGrad.
#define DKCRF_FORWARD_INPUTS                  \
  Input("probs: float")                       \
      .Input("images: uint8")                 \
      .Input("iterations: int32")             \
      .Input("bilateral_weight: float")       \
      .Input("bilateral_xy_std: float")       \
      .Input("bilateral_rgb_std: float")      \
      .Input("gaussian_weight: float")        \
      .Input("gaussian_xy_std: float")        \
      .Input("compatibility: float")

REGISTER_OP("DenseCrf")
    .DKCRF_FORWARD_INPUTS
    .Output("refined: float")
    .Output("marginals: float")
    .Attr("input_type: {'probs', 'unary', 'logits'} = 'probs'")
    .Attr("max_memory: int = -1")
    .Attr("save_marginals: bool = false")
    .SetShapeFn(DenseCrfShape)
    .Doc(R"doc(
Fully connected CRF (Kraehenbuehl & Koltun 2011) mean-field inference, pydensecrf semantics.

probs: [N, H, W, C] probabilities (input_type='probs'; unary = -log(clip(p, 1e-5, 1))), unary energies
  (input_type='unary') or logits (input_type='logits'; unary = -logits).
images: [N, H, W, 3] uint8 RGB images (the bilateral kernel's colour features).
iterations: number of mean-field iterations (>= 0).
compatibility: [C, C] label compatibility mu (update x = -U - mu (w_b Kb(Q) + w_g Kg(Q))), or an empty tensor
  for Potts (the update -U + w_b Kb(Q) + w_g Kg(Q), bit for bit as before).
refined: [N, H, W, C] probabilities after inference.
marginals: [N, iterations, H, W, C] the input Q of every iteration when save_marginals (for the gradient,
  DenseCrfGrad), else [N, 0, H, W, C].
max_memory: bytes the op may allocate (estimated before allocating): -1 = 80 % of the memory available at run
  time, 0 = no limit.
)doc");

REGISTER_OP("DenseCrfMemoryEstimate")
    .Input("shape: int64")
    .Input("iterations: int32")
    .Input("bilateral_weight: float")
    .Input("gaussian_weight: float")
    .Input("gaussian_xy_std: float")
    .Input("bilateral_points: int64")
    .Output("bytes: int64")
    .Output("default_limit: int64")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Scalar());
      c->set_output(1, c->Scalar());
      return OkStatus();
    })
    .Doc(R"doc(
The bytes DenseCrf would allocate for probs of shape [N, H, W, C] (the estimate it checks against its limit;
bilateral_points: the bilateral lattice's size if known, else -1), and its default limit (-1 if the available
memory cannot be read).
)doc");

dkcrf::ParallelFor MakePfor(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t total, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
    if (total <= 0) return;
    workers->ParallelFor(total, std::max<int64_t>(cost, 1), fn);
  };
}

// The input_type and max_memory attributes (both ops have them).
void ReadAttrs(OpKernelConstruction* ctx, dkcrf::InputType* input_type, int64_t* max_memory) {
  std::string type;
  OP_REQUIRES_OK(ctx, ctx->GetAttr("input_type", &type));
  *input_type = type == "probs" ? dkcrf::InputType::kProbs
                : type == "unary" ? dkcrf::InputType::kUnary : dkcrf::InputType::kLogits;
  OP_REQUIRES_OK(ctx, ctx->GetAttr("max_memory", max_memory));
}

// Bytes of the saved marginals [N, iterations, H, W, C].
int64_t SavedBytes(const Tensor& in, const dkcrf::CrfParams& params) {
  return in.NumElements() * params.iterations * static_cast<int64_t>(sizeof(float));
}

// Checks the DenseCrf inputs (shared by DenseCrf and DenseCrfGrad, whose first 9 inputs are DenseCrf's) and
// reads the parameters; on a problem the context holds the error (check ctx->status()).
void CheckForwardInputs(OpKernelContext* ctx, dkcrf::InputType input_type_, dkcrf::CrfParams* params_out,
                        const float** compat) {
    const Tensor& in = ctx->input(0);
    const Tensor& im = ctx->input(1);
    OP_REQUIRES(ctx, in.dims() == 4,
                errors::InvalidArgument("DenseCrf: `probs` must be rank 4 [N, H, W, C], got shape ",
                                        in.shape().DebugString()));
    OP_REQUIRES(ctx, im.dims() == 4 && im.dim_size(3) == 3,
                errors::InvalidArgument("DenseCrf: `images` must be [N, H, W, 3] uint8, got shape ",
                                        im.shape().DebugString()));
    for (int i = 0; i < 3; ++i) {
      OP_REQUIRES(ctx, in.dim_size(i) == im.dim_size(i),
                  errors::InvalidArgument("DenseCrf: `probs` ", in.shape().DebugString(), " and `images` ",
                                          im.shape().DebugString(), " must agree on N, H and W"));
    }
    const char* names[6] = {"iterations", "bilateral_weight", "bilateral_xy_std", "bilateral_rgb_std",
                            "gaussian_weight", "gaussian_xy_std"};
    for (int i = 2; i < 8; ++i) {
      OP_REQUIRES(ctx, TensorShapeUtils::IsScalar(ctx->input(i).shape()),
                  errors::InvalidArgument("DenseCrf: `", names[i - 2], "` must be a scalar, got shape ",
                                          ctx->input(i).shape().DebugString()));
    }
    const int64_t batch = in.dim_size(0), height = in.dim_size(1), width = in.dim_size(2);
    const int64_t labels = in.dim_size(3);
    OP_REQUIRES(ctx, labels >= 1 && labels <= dkcrf::kMaxLabels,
                errors::InvalidArgument("DenseCrf: the number of labels C (last dim of `probs`, shape ",
                                        in.shape().DebugString(), ") must be in [1, ", dkcrf::kMaxLabels,
                                        "]"));
    OP_REQUIRES(ctx, height >= 1 && width >= 1,
                errors::InvalidArgument("DenseCrf: images must have H >= 1 and W >= 1, got shape ",
                                        in.shape().DebugString()));
    OP_REQUIRES(ctx, height * width <= dkcrf::kMaxPixels,
                errors::InvalidArgument("DenseCrf: an image may have at most ", dkcrf::kMaxPixels,
                                        " pixels, got ", height, "x", width, "; run it on tiles"));
    OP_REQUIRES(ctx, height * width * labels <= dkcrf::kMaxValues,
                errors::InvalidArgument("DenseCrf: an image may have at most ", dkcrf::kMaxValues,
                                        " pixels x labels, got ", height, "x", width, "x", labels,
                                        "; run it on tiles"));
    dkcrf::CrfParams& params = *params_out;
    params.iterations = ctx->input(2).scalar<int32>()();
    params.bilateral_weight = ctx->input(3).scalar<float>()();
    params.bilateral_xy_std = ctx->input(4).scalar<float>()();
    params.bilateral_rgb_std = ctx->input(5).scalar<float>()();
    params.gaussian_weight = ctx->input(6).scalar<float>()();
    params.gaussian_xy_std = ctx->input(7).scalar<float>()();
    const std::string problem = dkcrf::ValidateParams(params, height, width);
    OP_REQUIRES(ctx, problem.empty(), errors::InvalidArgument("DenseCrf: ", problem));

    const dkcrf::ParallelFor pfor = MakePfor(ctx);

    // Every value finite (and >= 0 for probabilities), probabilities summing to 1 over the labels at every pixel;
    // report the first offending element / pixel.
    const float* data = in.flat<float>().data();
    const int64_t total = in.NumElements(), num_pixels = batch * height * width;
    std::atomic<int64_t> first_bad(total), first_bad_sum(num_pixels);
    const bool probs = input_type_ == dkcrf::InputType::kProbs;
    auto lower = [](std::atomic<int64_t>* first, int64_t i) {
      int64_t cur = first->load();
      while (i < cur && !first->compare_exchange_weak(cur, i)) {}
    };
    pfor(num_pixels, 3 * labels, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const float* row = data + p * labels;
        float sum = 0.f;
        for (int64_t c = 0; c < labels; ++c) {
          if (!std::isfinite(row[c]) || (probs && row[c] < 0.f)) {
            lower(&first_bad, p * labels + c);
            return;
          }
          sum += row[c];
        }
        if (probs && !(std::fabs(sum - 1.f) <= dkcrf::kProbSumTolerance)) {
          lower(&first_bad_sum, p);
          return;
        }
      }
    });
    auto where = [&](int64_t p) {
      return strings::StrCat("[", p / width / height, ", ", (p / width) % height, ", ", p % width);
    };
    if (first_bad.load() < total) {
      const int64_t i = first_bad.load();
      ctx->CtxFailure(errors::InvalidArgument(
          "DenseCrf: `probs` must be finite", probs ? " and >= 0" : "", ", got ", data[i], " at ",
          where(i / labels), ", ", i % labels, "]", probs ? " (pass probabilities, e.g. softmax outputs)" : ""));
      return;
    }
    if (first_bad_sum.load() < num_pixels) {
      const int64_t p = first_bad_sum.load();
      float sum = 0.f;
      for (int64_t c = 0; c < labels; ++c) sum += data[p * labels + c];
      ctx->CtxFailure(errors::InvalidArgument(
          "DenseCrf: `probs` must sum to 1 over the ", labels, " labels at every pixel (within ",
          dkcrf::kProbSumTolerance, "), got ", sum, " at ", where(p), ", :]. Pass probabilities (a softmax), "
          "normalise them (probs / sum over the last axis), or pass logits with input_type='logits'"));
      return;
    }

    const Tensor& mu = ctx->input(8);
    *compat = nullptr;
    if (mu.NumElements() > 0) {
      OP_REQUIRES(ctx, mu.dims() == 2 && mu.dim_size(0) == labels && mu.dim_size(1) == labels,
                  errors::InvalidArgument("DenseCrf: `compatibility` must be [C, C] = [", labels, ", ", labels,
                                          "] (C: the last dim of `probs`) or empty for Potts, got shape ",
                                          mu.shape().DebugString()));
      const float* m = mu.flat<float>().data();
      for (int64_t i = 0; i < mu.NumElements(); ++i)
        OP_REQUIRES(ctx, std::isfinite(m[i]) && std::fabs(m[i]) <= dkcrf::kMaxWeight,
                    errors::InvalidArgument("DenseCrf: `compatibility` must be finite with |values| <= 1e6, got ",
                                            m[i], " at [", i / labels, ", ", i % labels, "]"));
      *compat = m;
    }
}

class DenseCrfOp : public OpKernel {
 public:
  explicit DenseCrfOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadAttrs(ctx, &input_type_, &max_memory_);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("save_marginals", &save_));
  }

  void Compute(OpKernelContext* ctx) override {
    dkcrf::CrfParams params{};  // every field is set from the op's inputs
    const float* compat = nullptr;
    CheckForwardInputs(ctx, input_type_, &params, &compat);
    if (!ctx->status().ok()) return;
    const Tensor& in = ctx->input(0);
    const Tensor& im = ctx->input(1);
    const int64_t batch = in.dim_size(0), height = in.dim_size(1), width = in.dim_size(2);
    const int64_t labels = in.dim_size(3);
    const int num_threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
    const dkcrf::ParallelFor pfor = MakePfor(ctx);
    const float* data = in.flat<float>().data();

    // Estimate the memory before allocating anything.
    const int64_t limit = max_memory_ < 0 ? dkcrf::DefaultMemoryLimit() : max_memory_;
    const std::string too_big =
        batch == 0 ? "" : dkcrf::MemoryProblem(dkcrf::EstimateBytes(batch, height, width, labels, params) +
                                                   (save_ ? SavedBytes(in, params) : 0),
                                               limit, height, width, labels, "before allocating");
    OP_REQUIRES(ctx, too_big.empty(), errors::InvalidArgument("DenseCrf: ", too_big));

    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.shape(), &out));
    Tensor* marginals = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch, save_ ? params.iterations : 0, height, width,
                                                              labels}), &marginals));
    if (batch == 0) return;
    float* saved = save_ && params.iterations > 0 ? marginals->flat<float>().data() : nullptr;
    const uint8* images = im.flat<uint8>().data();
    float* q = out->flat<float>().data();
    const int64_t pixels = height * width;
    try {
      std::shared_ptr<const dkcrf::GaussianKernel> gaussian;
      if (params.gaussian_weight > 0.f && params.iterations > 0)
        gaussian = GaussianKernel(height, width, params.gaussian_xy_std, num_threads, pfor);
      for (int64_t n = 0; n < batch; ++n) {
        const std::string problem = dkcrf::DenseCrfImage(
            data + n * pixels * labels, input_type_, images + n * pixels * 3, height, width,
            static_cast<int>(labels), params, num_threads, pfor, q + n * pixels * labels, gaussian.get(), limit,
            compat, saved == nullptr ? nullptr : saved + n * pixels * labels * params.iterations);
        OP_REQUIRES(ctx, problem.empty(), errors::InvalidArgument("DenseCrf: ", problem));
      }
    } catch (const std::bad_alloc&) {
      ctx->CtxFailure(errors::ResourceExhausted("DenseCrf: out of memory for a ", height, "x", width,
                                                " image with ", labels, " labels"));
    }
  }

 private:
  // The Gaussian kernel depends only on (H, W, xy_std): one build serves a whole batch, and the last few are
  // kept (up to kCacheBytes) for later calls on images of the same size.
  struct CacheEntry {
    int64_t height, width;
    float xy_std;
    int threads;
    std::shared_ptr<const dkcrf::GaussianKernel> kernel;
    int64_t bytes;
  };
  static constexpr int64_t kCacheBytes = int64_t{64} << 20;

  std::shared_ptr<const dkcrf::GaussianKernel> GaussianKernel(int64_t height, int64_t width, float xy_std,
                                                              int threads, const dkcrf::ParallelFor& pfor) {
    {
      std::lock_guard<std::mutex> lock(cache_mu_);
      for (size_t i = 0; i < cache_.size(); ++i) {
        const CacheEntry& c = cache_[i];
        if (c.height == height && c.width == width && c.xy_std == xy_std && c.threads == threads) {
          std::rotate(cache_.begin(), cache_.begin() + i, cache_.begin() + i + 1);  // most recent first
          return cache_.front().kernel;
        }
      }
    }
    auto kernel = dkcrf::BuildGaussianKernel(height, width, xy_std, threads, pfor);
    const int64_t bytes = kernel->Bytes();
    if (bytes <= kCacheBytes) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      cache_.insert(cache_.begin(), CacheEntry{height, width, xy_std, threads, kernel, bytes});
      int64_t total = 0;
      size_t keep = 0;
      while (keep < cache_.size() && total + cache_[keep].bytes <= kCacheBytes) total += cache_[keep++].bytes;
      cache_.resize(keep);
    }
    return kernel;
  }

  dkcrf::InputType input_type_;
  int64_t max_memory_ = -1;
  bool save_ = false;
  std::mutex cache_mu_;
  std::vector<CacheEntry> cache_;
};

REGISTER_KERNEL_BUILDER(Name("DenseCrf").Device(DEVICE_CPU), DenseCrfOp);

REGISTER_OP("DenseCrfGrad")
    .DKCRF_FORWARD_INPUTS
    .Input("refined: float")
    .Input("marginals: float")
    .Input("grad_refined: float")
    .Output("grad_probs: float")
    .Output("grad_bilateral_weight: float")
    .Output("grad_gaussian_weight: float")
    .Output("grad_compatibility: float")
    .Attr("input_type: {'probs', 'unary', 'logits'} = 'probs'")
    .Attr("max_memory: int = -1")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      c->set_output(3, c->input(8));
      return OkStatus();
    })
    .Doc(R"doc(
Gradient of DenseCrf (registered for it in Python): the first nine inputs are DenseCrf's, `refined` and
`marginals` its outputs (marginals [N, iterations, H, W, C] saved by save_marginals=true; [N, 0, H, W, C]: the
forward pass is recomputed here), grad_refined the upstream gradient (finite). Outputs the gradients w.r.t.
probs, the two kernel weights and the compatibility (shaped like it; zeros when it is empty).
)doc");

class DenseCrfGradOp : public OpKernel {
 public:
  explicit DenseCrfGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadAttrs(ctx, &input_type_, &max_memory_);
  }

  void Compute(OpKernelContext* ctx) override {
    dkcrf::CrfParams params{};
    const float* compat = nullptr;
    CheckForwardInputs(ctx, input_type_, &params, &compat);
    if (!ctx->status().ok()) return;
    const Tensor& in = ctx->input(0);
    const Tensor& refined = ctx->input(9);
    const Tensor& marginals = ctx->input(10);
    const Tensor& grad = ctx->input(11);
    const int64_t batch = in.dim_size(0), height = in.dim_size(1), width = in.dim_size(2);
    const int64_t labels = in.dim_size(3), pixels = height * width, T = params.iterations;
    OP_REQUIRES(ctx, refined.shape() == in.shape() && grad.shape() == in.shape(),
                errors::InvalidArgument("DenseCrfGrad: `refined` ", refined.shape().DebugString(),
                                        " and `grad_refined` ", grad.shape().DebugString(),
                                        " must be shaped like `probs` ", in.shape().DebugString()));
    const bool saved = marginals.dims() == 5 && marginals.dim_size(1) == T && T > 0;
    OP_REQUIRES(ctx, saved || (marginals.dims() == 5 && marginals.dim_size(1) == 0) || T == 0,
                errors::InvalidArgument("DenseCrfGrad: `marginals` must be [N, iterations, H, W, C] or "
                                        "[N, 0, H, W, C], got ", marginals.shape().DebugString()));
    if (saved) {
      OP_REQUIRES(ctx, marginals.dim_size(0) == batch && marginals.dim_size(2) == height &&
                           marginals.dim_size(3) == width && marginals.dim_size(4) == labels,
                  errors::InvalidArgument("DenseCrfGrad: `marginals` ", marginals.shape().DebugString(),
                                          " does not match `probs` ", in.shape().DebugString()));
    }
    const float* g = grad.flat<float>().data();
    const dkcrf::ParallelFor pfor = MakePfor(ctx);
    std::atomic<int64_t> first_bad(grad.NumElements());
    pfor(grad.NumElements(), 2, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (!std::isfinite(g[i])) {
          int64_t cur = first_bad.load();
          while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {}
          return;
        }
      }
    });
    if (first_bad.load() < grad.NumElements()) {
      const int64_t i = first_bad.load();
      ctx->CtxFailure(errors::InvalidArgument(
          "DenseCrfGrad: the upstream gradient of dense_crf must be finite, got ", g[i], " at [",
          i / labels / pixels, ", ", (i / labels / width) % height, ", ", (i / labels) % width, ", ", i % labels,
          "] (a NaN/Inf loss or learning rate upstream; check the loss and lower the learning rate)"));
      return;
    }
    const int64_t limit = max_memory_ < 0 ? dkcrf::DefaultMemoryLimit() : max_memory_;
    const std::string too_big =
        batch == 0 ? "" : dkcrf::MemoryProblem(dkcrf::EstimateGradBytes(batch, height, width, labels, params, saved),
                                               limit, height, width, labels, "for the gradient");
    OP_REQUIRES(ctx, too_big.empty(), errors::InvalidArgument("DenseCrfGrad: ", too_big));
    Tensor *grad_in = nullptr, *grad_wb = nullptr, *grad_wg = nullptr, *grad_mu = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, in.shape(), &grad_in));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &grad_wb));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &grad_wg));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, ctx->input(8).shape(), &grad_mu));
    std::vector<double> dmu(compat != nullptr ? labels * labels : 0, 0.0);
    double dwb = 0.0, dwg = 0.0;
    const float* data = in.flat<float>().data();
    const uint8* images = ctx->input(1).flat<uint8>().data();
    const float* q = refined.flat<float>().data();
    const int num_threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
    try {
      dkcrf::Lattice gaussian;
      if (params.gaussian_weight > 0.f && T > 0 && batch > 0)
        dkcrf::BuildGaussianLattice(height, width, params.gaussian_xy_std, num_threads, pfor, &gaussian);
      std::vector<float> recomputed, recomputed_q;
      if (!saved && T > 0) {
        recomputed.resize(T * pixels * labels);
        recomputed_q.resize(pixels * labels);
      }
      for (int64_t n = 0; n < batch; ++n) {
        const float* image_in = data + n * pixels * labels;
        const uint8* image = images + n * pixels * 3;
        const float* image_saved = nullptr;
        if (saved) {
          image_saved = marginals.flat<float>().data() + n * T * pixels * labels;
        } else if (T > 0) {  // recompute this image's forward pass, keeping its marginals
          const std::string problem = dkcrf::DenseCrfImage(image_in, input_type_, image, height, width,
                                                           static_cast<int>(labels), params, num_threads, pfor,
                                                           recomputed_q.data(), nullptr, limit, compat,
                                                           recomputed.data());
          OP_REQUIRES(ctx, problem.empty(), errors::InvalidArgument("DenseCrfGrad: ", problem));
          image_saved = recomputed.data();
        }
        const std::string problem = dkcrf::DenseCrfGradImage(
            image_in, input_type_, image, height, width, static_cast<int>(labels), params, compat, image_saved,
            q + n * pixels * labels, g + n * pixels * labels, num_threads, pfor,
            gaussian.num_points > 0 ? &gaussian : nullptr, limit, grad_in->flat<float>().data() + n * pixels * labels,
            &dwb, &dwg, dmu.empty() ? nullptr : dmu.data());
        OP_REQUIRES(ctx, problem.empty(), errors::InvalidArgument("DenseCrfGrad: ", problem));
      }
    } catch (const std::bad_alloc&) {
      ctx->CtxFailure(errors::ResourceExhausted("DenseCrfGrad: out of memory for a ", height, "x", width,
                                                " image with ", labels, " labels"));
      return;
    }
    grad_wb->scalar<float>()() = static_cast<float>(dwb);
    grad_wg->scalar<float>()() = static_cast<float>(dwg);
    float* gm = grad_mu->flat<float>().data();
    for (int64_t i = 0; i < grad_mu->NumElements(); ++i) gm[i] = dmu.empty() ? 0.f : static_cast<float>(dmu[i]);
  }

 private:
  dkcrf::InputType input_type_;
  int64_t max_memory_ = -1;
};

REGISTER_KERNEL_BUILDER(Name("DenseCrfGrad").Device(DEVICE_CPU), DenseCrfGradOp);

class DenseCrfMemoryEstimateOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& shape = ctx->input(0);
    OP_REQUIRES(ctx, shape.dims() == 1 && shape.NumElements() == 4,
                errors::InvalidArgument("DenseCrfMemoryEstimate: `shape` must be [N, H, W, C], got ",
                                        shape.DebugString()));
    const auto s = shape.flat<int64_t>();
    for (int i = 0; i < 4; ++i)
      OP_REQUIRES(ctx, s(i) >= 0, errors::InvalidArgument("DenseCrfMemoryEstimate: negative dimension in ",
                                                          shape.DebugString()));
    dkcrf::CrfParams params{};  // every field is set from the op's inputs
    params.iterations = ctx->input(1).scalar<int32>()();
    params.bilateral_weight = ctx->input(2).scalar<float>()();
    params.gaussian_weight = ctx->input(3).scalar<float>()();
    params.gaussian_xy_std = ctx->input(4).scalar<float>()();
    Tensor* bytes = nullptr;
    Tensor* limit = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &bytes));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &limit));
    bytes->scalar<int64_t>()() =
        dkcrf::EstimateBytes(s(0), s(1), s(2), s(3), params, ctx->input(5).scalar<int64_t>()());
    limit->scalar<int64_t>()() = dkcrf::DefaultMemoryLimit();
  }
};

REGISTER_KERNEL_BUILDER(Name("DenseCrfMemoryEstimate").Device(DEVICE_CPU), DenseCrfMemoryEstimateOp);

}  // namespace tensorflow
