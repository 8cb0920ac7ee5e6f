// A layer's small ops, one pass each instead of a chain of torch ops: RMSNorm, alone or after the residual
// add; rotary embedding of q and k
// with k/v stored in the KV pool; k/v stored without it (index_copy_ from the strided views attention modules
// make copied 2,048 tokens of GPT-2 in 0.7 ms a layer). In a decode step each of these chains is 8-12 torch ops
// on a few rows; in a prefill they read and write the activations several times over.
//
// Values follow transformers' formulas (Llama's RMSNorm: fp32 statistics, the normalized value rounded to the
// model's dtype before the weight multiplies it; rotate_half RoPE), computed in fp32 and rounded once where
// transformers rounds. Every token's result is independent of the others (batch-invariant).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "vec_load.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

using prefixserve::load2;
using prefixserve::round2;
using prefixserve::store2;
using prefixserve::Vec;
using prefixserve::W;

// out[0:h] = weight * T(x * inv), 2W values at a time; the tail (h % 2W) value by value, the same arithmetic.
template <typename T>
inline void scale_row(const T* x, float inv, const T* w, T* out, int64_t h) {
  int64_t i = 0;
  for (; i + 2 * W <= h; i += 2 * W) {
    Vec a, b, wa, wb;
    load2(x + i, a, b);
    a = a * Vec(inv), b = b * Vec(inv);
    round2(x, a, b);
    load2(w + i, wa, wb);
    store2(out + i, wa * a, wb * b);
  }
  for (; i < h; ++i) out[i] = round_to<T>(to_f(w[i]) * to_f(round_to<T>(to_f(x[i]) * inv)));
}

inline float inverse_rms(float sum_of_squares, int64_t h, float eps) {
  return 1.f / std::sqrt(sum_of_squares / static_cast<float>(h) + eps);
}

// The sum of x[0:h]^2: 2W lanes, then the tail.
template <typename T>
inline float sum_of_squares(const T* x, int64_t h) {
  Vec acc_a(0.f), acc_b(0.f);
  int64_t i = 0;
  for (; i + 2 * W <= h; i += 2 * W) {
    Vec a, b;
    load2(x + i, a, b);
    acc_a = at::vec::fmadd(a, a, acc_a), acc_b = at::vec::fmadd(b, b, acc_b);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc_a + acc_b);
  for (; i < h; ++i) sum += to_f(x[i]) * to_f(x[i]);
  return sum;
}

// out = weight * T(x * rsqrt(mean(x^2) + eps)), row by row over the last dimension.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  // Rows are small work (a microsecond each): a decode step's few rows run on the calling thread.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      scale_row(x + r * h, inverse_rms(sum_of_squares(x + r * h, h), h, eps), w, out + r * h, h);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must have one dtype");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.numel() == h, "rms_norm: weight must have x's last dimension");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = h ? x.numel() / h : 0;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, h, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    rms_norm_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
                                 out.data_ptr<c10::BFloat16>(), rows, h, eps);
  } else {
    TORCH_CHECK(false, "rms_norm supports float32 and bfloat16, got ", x.scalar_type());
  }
  return out;
}

// residual = T(residual + x), then out = rms_norm(residual): a decoder layer's `residual + hidden_states` and
// the norm after it (the post-attention norm, or the next layer's input norm) in one pass over the row.
template <typename T>
void add_rms_norm_rows(const T* x, T* res, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      T* rr = res + r * h;
      int64_t i = 0;
      for (; i + 2 * W <= h; i += 2 * W) {
        Vec a, b, xa, xb;
        load2(rr + i, a, b);
        load2(xr + i, xa, xb);
        store2(rr + i, a + xa, b + xb);
      }
      for (; i < h; ++i) rr[i] = round_to<T>(to_f(rr[i]) + to_f(xr[i]));
      scale_row(rr, inverse_rms(sum_of_squares(rr, h), h, eps), w, out + r * h, h);
    }
  });
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: contiguous tensors only");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual must have one shape");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && residual.scalar_type() == weight.scalar_type(),
              "add_rms_norm: x, residual and weight must have one dtype");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.numel() == h, "add_rms_norm: weight must have x's last dimension");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = h ? x.numel() / h : 0;
  if (x.scalar_type() == at::kFloat) {
    add_rms_norm_rows<float>(x.data_ptr<float>(), residual.data_ptr<float>(), weight.data_ptr<float>(),
                             out.data_ptr<float>(), rows, h, eps);
  } else if (x.scalar_type() == at::kBFloat16) {
    using B = c10::BFloat16;
    add_rms_norm_rows<B>(x.data_ptr<B>(), residual.data_ptr<B>(), weight.data_ptr<B>(), out.data_ptr<B>(), rows, h,
                         eps);
  } else {
    TORCH_CHECK(false, "add_rms_norm supports float32 and bfloat16, got ", x.scalar_type());
  }
  return out;
}

// One head of d values: dst = x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x[d/2:], x[:d/2]).
template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, T* dst, int64_t d) {
  const int64_t half = d / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = to_f(x[i]), b = to_f(x[i + half]);
    dst[i] = round_to<T>(a * to_f(cos[i]) - b * to_f(sin[i]));
    dst[i + half] = round_to<T>(b * to_f(cos[i + half]) + a * to_f(sin[i + half]));
  }
}

// qkv: [tokens, (q_heads + 2 kv_heads) * d], each token's q heads, then k heads, then v heads (one fused GEMM's
// output); cos, sin: [tokens, d]; pools: [kv_heads, slots, d]; slots: [tokens]. Writes each token's rotated
// keys and its values to its slot; returns the rotated queries, [tokens, q_heads, d].
template <typename T>
void rope_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool,
               at::Tensor& v_pool, const at::Tensor& slots, int64_t q_heads, at::Tensor& q_out) {
  const int64_t tokens = qkv.size(0), kv_heads = k_pool.size(0), pool_slots = k_pool.size(1), d = k_pool.size(2);
  const int64_t width = qkv.size(1);
  const T* src = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* kp = k_pool.data_ptr<T>();
  T* vp = v_pool.data_ptr<T>();
  T* qp = q_out.data_ptr<T>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = src + t * width;
      const T* c = cp + t * d;
      const T* s = sp + t * d;
      for (int64_t h = 0; h < q_heads; ++h) rotate(row + h * d, c, s, qp + (t * q_heads + h) * d, d);
      for (int64_t h = 0; h < kv_heads; ++h) {
        rotate(row + (q_heads + h) * d, c, s, kp + (h * pool_slots + slot[t]) * d, d);
        const T* v = row + (q_heads + kv_heads + h) * d;
        T* dst = vp + (h * pool_slots + slot[t]) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = v[i];
      }
    }
  });
}

at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_pool,
                      at::Tensor v_pool, const at::Tensor& slots, int64_t q_heads) {
  TORCH_CHECK(qkv.dim() == 2 && cos.dim() == 2 && sin.dim() == 2, "rope_store: qkv [tokens, width], cos/sin [tokens, d]");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes(), "rope_store: pools [kv_heads, slots, d]");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous() && slots.is_contiguous(),
              "rope_store: contiguous tensors only");
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype && k_pool.scalar_type() == dtype &&
                  v_pool.scalar_type() == dtype,
              "rope_store: qkv, cos, sin and the pools must have one dtype");
  const int64_t tokens = qkv.size(0), kv_heads = k_pool.size(0), d = k_pool.size(2);
  TORCH_CHECK(d % 2 == 0 && cos.size(1) == d && sin.size(1) == d, "rope_store: an even head size, cos/sin of it");
  TORCH_CHECK(cos.size(0) == tokens && sin.size(0) == tokens, "rope_store: cos/sin for every token");
  TORCH_CHECK(qkv.size(1) == (q_heads + 2 * kv_heads) * d, "rope_store: qkv must hold q, k and v heads");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == tokens, "rope_store: one int64 slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < k_pool.size(1), "rope_store: slot ", slot[t], " is outside the pool");
  at::Tensor q = at::empty({tokens, q_heads, d}, qkv.options());
  if (dtype == at::kFloat) {
    rope_rows<float>(qkv, cos, sin, k_pool, v_pool, slots, q_heads, q);
  } else if (dtype == at::kBFloat16) {
    rope_rows<c10::BFloat16>(qkv, cos, sin, k_pool, v_pool, slots, q_heads, q);
  } else {
    TORCH_CHECK(false, "rope_store supports float32 and bfloat16, got ", dtype);
  }
  return q;
}


// key, value: [tokens, kv_heads, d] (any strides, d contiguous); pools: [kv_heads, slots, d]; slots: [tokens].
template <typename T>
void store_rows(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_pool, at::Tensor& v_pool,
                const int64_t* slot) {
  const int64_t tokens = key.size(0), heads = key.size(1), d = key.size(2), pool_slots = k_pool.size(1);
  const T* kp = key.data_ptr<T>();
  const T* vp = value.data_ptr<T>();
  T* kd = k_pool.data_ptr<T>();
  T* vd = v_pool.data_ptr<T>();
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(kd + (h * pool_slots + slot[t]) * d, kp + t * key.stride(0) + h * key.stride(1), d * sizeof(T));
        std::memcpy(vd + (h * pool_slots + slot[t]) * d, vp + t * value.stride(0) + h * value.stride(1), d * sizeof(T));
      }
  });
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_pool, at::Tensor v_pool,
              const at::Tensor& slots) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "store_kv: key and value [tokens, kv_heads, d]");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "store_kv: key and value contiguous in d");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() && v_pool.is_contiguous(),
              "store_kv: contiguous pools [kv_heads, slots, d]");
  TORCH_CHECK(k_pool.size(0) == key.size(1) && k_pool.size(2) == key.size(2), "store_kv: key's heads and d are the pool's");
  const auto dtype = key.scalar_type();
  TORCH_CHECK(value.scalar_type() == dtype && k_pool.scalar_type() == dtype && v_pool.scalar_type() == dtype,
              "store_kv: key, value and the pools must have one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == key.size(0),
              "store_kv: one int64 slot per token");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < k_pool.size(1), "store_kv: slot ", slot[t], " is outside the pool");
  if (dtype == at::kFloat) {
    store_rows<float>(key, value, k_pool, v_pool, slot);
  } else if (dtype == at::kBFloat16) {
    store_rows<c10::BFloat16>(key, value, k_pool, v_pool, slot);
  } else {
    TORCH_CHECK(false, "store_kv supports float32 and bfloat16, got ", dtype);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def(
      "rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, "
      "int q_heads) -> Tensor");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_store", &rope_store);
  m.impl("store_kv", &store_kv);
}
