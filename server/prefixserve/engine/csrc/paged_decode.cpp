// Paged decode attention on the CPU: one query token per row, attending over that row's slots of the KV pool,
// read in place in the pool's dtype (fp32 or bf16): no gather, no cast to a new tensor, no padding.
//
// Work is split over (row, kv head); each task handles the query heads that share its kv head (GQA without
// repeating K/V), in fp32, with a fixed order of operations per row: a row's result does not depend on the
// other rows of the step (batch-invariant), nor on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// A pool row as fp32: fp32 rows are read where they are; bf16 ones are widened into `buf`.
inline const float* as_float(const float* src, float* /*buf*/, int64_t /*n*/) { return src; }

inline const float* as_float(const c10::BFloat16* src, float* buf, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t widened = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &widened, sizeof(f));
    buf[i] = f;
  }
  return buf;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// q: [rows, q_heads, d]; k_pool, v_pool: [kv_heads, pool_slots, d]; slots: [total]; starts: [rows + 1].
// D: the head size when known at compile time (then the inner loops unroll fully), or 0.
template <typename T, int64_t D>
void decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& slots,
            const at::Tensor& starts, double scale, at::Tensor& out) {
  const int64_t rows = q.size(0), q_heads = q.size(1), d = D ? D : q.size(2);
  const int64_t kv_heads = k_pool.size(0), pool_slots = k_pool.size(1);
  const int64_t group = q_heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), row(d), total(group), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t first = st[r], len = st[r + 1] - st[r];
      scores.resize(group * len);
      for (int64_t g = 0; g < group; ++g) {
        const float* src = as_float(qp + (r * q_heads + h * group + g) * d, qf.data() + g * d, d);
        std::copy(src, src + d, qf.data() + g * d);
      }
      const T* kh = kp + h * pool_slots * d;
      const T* vh = vp + h * pool_slots * d;
      for (int64_t j = 0; j < len; ++j) {
        const float* k = as_float(kh + sp[first + j] * d, row.data(), d);
        for (int64_t g = 0; g < group; ++g) scores[g * len + j] = dot(qf.data() + g * d, k, d) * fscale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) top = std::max(top, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) {
          s[j] = std::exp(s[j] - top);
          sum += s[j];
        }
        total[g] = sum;
      }
      for (int64_t j = 0; j < len; ++j) {
        const float* v = as_float(vh + sp[first + j] * d, row.data(), d);
        for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + j], v, acc.data() + g * d, d);
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = op + (r * q_heads + h * group + g) * d;
        const float inv = 1.f / total[g];
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(acc[g * d + i] * inv);
      }
    }
  });
}

template <typename T>
void dispatch_head_size(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& slots, const at::Tensor& starts, double scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: return decode<T, 64>(q, k_pool, v_pool, slots, starts, scale, out);
    case 128: return decode<T, 128>(q, k_pool, v_pool, slots, starts, scale, out);
    default: return decode<T, 0>(q, k_pool, v_pool, slots, starts, scale, out);
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& slots, const at::Tensor& starts, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "q [rows, heads, d], pools [kv_heads, slots, d]");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.scalar_type() == v_pool.scalar_type(),
              "q and the pools must have one dtype");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(0) == 0, "head sizes do not match");
  TORCH_CHECK(slots.scalar_type() == at::kLong && starts.scalar_type() == at::kLong, "int64 slots and starts");
  TORCH_CHECK(starts.numel() == q.size(0) + 1, "starts must have rows + 1 entries");
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch_head_size<float>(q, k_pool, v_pool, slots, starts, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_size<c10::BFloat16>(q, k_pool, v_pool, slots, starts, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(prefixserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor starts, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
