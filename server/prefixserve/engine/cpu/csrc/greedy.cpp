// The greedy choice of every row of a step's logits, and its log-probability, in one native pass per row:
// max, the first index holding it (torch's max().indices, argmax's tie rule) and log-sum-exp, read from the
// logits in the model's dtype. torch's way (cast to fp32, log_softmax, max, amax, gather) wrote and read the
// [rows, vocab] logits four times: ~4.5 ms of a 64-row decode step on a 50k vocabulary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "vec_load.h"

namespace {

using prefixserve::load;
using prefixserve::load_partial;
using prefixserve::Vec;
using prefixserve::W;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int64_t BLOCK = 1024;  // the row's maximum is found per block, then the first index in its block

// (token, log-probability) of one row of n logits; token -1 where the row has a NaN or +inf, or no finite
// value: a choice from such a row would look like a real one.
template <typename T>
std::pair<int64_t, float> pick(const T* x, int64_t n) {
  float best = NEG_INF;
  int64_t best_block = -1;
  bool nan = false;
  for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {
    const int64_t b1 = std::min(n, b0 + BLOCK);
    Vec top(NEG_INF);
    int64_t i = b0;
    for (; i + W <= b1; i += W) top = at::vec::maximum(top, load(x + i));  // NaN-propagating
    if (i < b1) top = at::vec::maximum(top, load_partial(x + i, b1 - i, NEG_INF));
    const float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, top);
    if (std::isnan(m)) nan = true;
    if (m > best) best = m, best_block = b0;
  }
  if (nan || !std::isfinite(best)) return {-1, 0.f};
  int64_t token = best_block;
  while (static_cast<float>(x[token]) != best) ++token;
  const Vec m(best);
  Vec sum(0.f);
  int64_t i = 0;
  for (; i + W <= n; i += W) sum = sum + prefixserve::exp_floored(load(x + i) - m);
  if (i < n) sum = sum + (load_partial(x + i, n - i, NEG_INF) - m).exp();  // -inf: exp is 0
  const float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  return {token, -std::log(total)};  // x[token] - (best + log(total)), with x[token] == best
}

std::tuple<at::Tensor, at::Tensor> greedy_pick(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "greedy_pick: logits [rows, vocab], rows contiguous");
  TORCH_CHECK(logits.size(1) > 0, "greedy_pick: an empty vocabulary");
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = logits.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) std::tie(tp[r], lp[r]) = pick(x + r * logits.stride(0), n);
    });
  };
  if (logits.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else if (logits.scalar_type() == at::kBFloat16) {
    run(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(false, "greedy_pick supports float32 and bfloat16, got ", logits.scalar_type());
  }
  return {tokens, logprobs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixserve, m) { m.def("greedy_pick(Tensor logits) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) { m.impl("greedy_pick", &greedy_pick); }
