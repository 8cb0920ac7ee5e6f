// Paged decode attention on the CPU: one query token per row, attending over that row's slots of the KV pool,
// read in place in the pool's dtype (fp32 or bf16): no gather, no cast to a new tensor, no padding.
//
// One task is one (kv head, row): the query heads that share the kv head (GQA without repeating K/V) over the
// row's slots, in fp32. Tasks run head by head, rows in the caller's order, so rows whose contexts begin with
// the same slots (an adapter prefix, a cached system prompt), put next to each other by the caller, find those
// slots in this core's cache. A row's result depends only on its own query and slots, computed in a fixed
// order: neither on the other rows of the step (batch-invariant) nor on the number of threads.
//
// Scores are computed W keys at a time (W = floats per vector register): each key's dot product accumulates in
// a register of its own, and one transposing reduction turns the W registers into W scores, instead of a
// horizontal sum per key. bf16 keys and values are widened to fp32 in registers as they are loaded. Head sizes
// that are not a whole number of vectors take a plain loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "vec_load.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using prefixserve::load;
using prefixserve::Vec;
using prefixserve::W;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// Lane t of the result is the sum of the lanes of acc[t]: W horizontal sums in one transposing tree.
// Inlined: its W inputs stay in registers (called, they were spilled to the stack and reloaded).
__attribute__((always_inline)) inline Vec sum_each(const Vec* acc) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i) {  // within each 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    const __m512 a = acc[2 * i], b = acc[2 * i + 1];
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: the lane's sum of four accumulators
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes 0+1 and 2+3 of quads 2i and 2i+1
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return Vec(_mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                           _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd)));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 pairs[4], quads[2];
  for (int i = 0; i < 4; ++i) {
    const __m256 a = acc[2 * i], b = acc[2 * i + 1];
    pairs[i] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 2; ++i) {
    const __m256d a = _mm256_castps_pd(pairs[2 * i]), b = _mm256_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return Vec(_mm256_add_ps(_mm256_permute2f128_ps(quads[0], quads[1], 0x20),
                           _mm256_permute2f128_ps(quads[0], quads[1], 0x31)));
#else
  float buf[W];
  for (int64_t t = 0; t < W; ++t) buf[t] = hsum(acc[t]);
  return Vec::loadu(buf);
#endif
}

// Turns scores[0:padded] into exp(score - max) in place; returns their sum. Padding holds -inf: it becomes
// exp(-87) (see exp_floored), and only the row's real keys are summed with the values.
inline float exp_normalize(float* s, int64_t padded) {
  Vec top(NEG_INF);
  for (int64_t j = 0; j < padded; j += W) top = at::vec::maximum(top, Vec::loadu(s + j));
  const Vec m(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, top));
  Vec sum(0.f);
  for (int64_t j = 0; j < padded; j += W) {
    const Vec e = prefixserve::exp_floored(Vec::loadu(s + j) - m);
    e.store(s + j);
    sum = sum + e;
  }
  return hsum(sum);
}

template <typename T>
inline void store_row(const float* src, float scale, T* dst, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c] * scale);
}

// One task's inputs: a row's query heads for one kv head, and that head's pools.
template <typename T>
struct Task {
  const T* q;        // [group, d] the query heads sharing the kv head (rows of q_stride)
  int64_t q_stride;  // elements between query heads
  T* out;            // written like q
  int64_t out_stride;
  const T* keys;     // [pool_slots, d] of this kv head
  const T* values;
  const int64_t* slots;  // the row's slots, in context order
  int64_t len;
  int64_t group;
  // The next task's slots of this head (its row; nullptr at the end): prefetched while this one computes, so
  // its keys and values, scattered over the pool block by block, are in cache when it starts.
  const int64_t* next_slots;
  int64_t next_len;
};

// Brings the rows of slots[from:to] of `base` ([slots, d]) towards this core's cache.
template <typename T>
inline void prefetch_slots(const T* base, const int64_t* slots, int64_t from, int64_t to, int64_t d) {
  constexpr int64_t LINE = 64;
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t j = from; j < to; ++j) {
    const char* row = reinterpret_cast<const char*>(base + slots[j] * d);
    for (int64_t b = 0; b < bytes; b += LINE) __builtin_prefetch(row + b, 0, 3);
  }
}

// Per-thread scratch, grown as needed and reused across tasks and calls.
struct Scratch {
  std::vector<float> q, scores, acc, totals;
};

// Head size d = NV whole vectors: scores W keys at a time, values summed in registers.
template <typename T, int NV>
void attend(const Task<T>& t, float scale, Scratch& s) {
  constexpr int64_t D = NV * W;
  constexpr int HEADS_PER_PASS = NV <= 4 ? 4 : NV <= 8 ? 2 : 1;  // accumulators in registers, per pass over V
  const int64_t padded = (t.len + W - 1) / W * W, group = t.group;
  s.q.resize(group * D);
  s.scores.resize(group * padded);
  for (int64_t g = 0; g < group; ++g)
    for (int c = 0; c < NV; ++c) (load(t.q + g * t.q_stride + c * W) * Vec(scale)).store(s.q.data() + g * D + c * W);
  const int64_t tiles = padded / W;
  for (int64_t j0 = 0; j0 < padded; j0 += W) {
    if (t.next_slots != nullptr) {  // the next row's keys and values, spread over this row's tiles
      const int64_t i = j0 / W, from = i * t.next_len / tiles, to = (i + 1) * t.next_len / tiles;
      prefetch_slots(t.keys, t.next_slots, from, to, D);
      prefetch_slots(t.values, t.next_slots, from, to, D);
    }
    const int64_t n = std::min(W, t.len - j0);
    const T* key[W];
    for (int64_t k = 0; k < W; ++k) key[k] = t.keys + t.slots[j0 + std::min(k, n - 1)] * D;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = s.q.data() + g * D;
      Vec acc[W];
      for (int64_t k = 0; k < W; ++k) {
        Vec a = load(key[k]) * Vec::loadu(qg);
        for (int c = 1; c < NV; ++c) a = at::vec::fmadd(Vec::loadu(qg + c * W), load(key[k] + c * W), a);
        acc[k] = a;
      }
      float* dst = s.scores.data() + g * padded + j0;
      sum_each(acc).store(dst);
      for (int64_t k = n; k < W; ++k) dst[k] = NEG_INF;
    }
  }
  s.totals.resize(group);
  float* total = s.totals.data();
  for (int64_t g = 0; g < group; ++g) total[g] = exp_normalize(s.scores.data() + g * padded, padded);
  float row[D];
  for (int64_t g0 = 0; g0 < group; g0 += HEADS_PER_PASS) {
    const int heads = static_cast<int>(std::min<int64_t>(HEADS_PER_PASS, group - g0));
    Vec acc[HEADS_PER_PASS][NV];
    for (int h = 0; h < HEADS_PER_PASS; ++h)
      for (int c = 0; c < NV; ++c) acc[h][c] = Vec(0.f);
    const float* p = s.scores.data() + g0 * padded;
    for (int64_t j = 0; j < t.len; ++j) {
      const T* v = t.values + t.slots[j] * D;
      Vec vv[NV];
      for (int c = 0; c < NV; ++c) vv[c] = load(v + c * W);
      for (int h = 0; h < HEADS_PER_PASS; ++h) {
        if (h >= heads) break;
        const Vec w(p[h * padded + j]);
        for (int c = 0; c < NV; ++c) acc[h][c] = at::vec::fmadd(w, vv[c], acc[h][c]);
      }
    }
    for (int h = 0; h < heads; ++h) {
      for (int c = 0; c < NV; ++c) acc[h][c].store(row + c * W);
      store_row(row, 1.f / total[g0 + h], t.out + (g0 + h) * t.out_stride, D);
    }
  }
}

// Any head size: plain loops, the same arithmetic in another order.
template <typename T>
void attend_any(const Task<T>& t, int64_t d, float scale, Scratch& s) {
  const int64_t padded = (t.len + W - 1) / W * W;
  s.scores.resize(padded);
  s.acc.resize(d);
  s.q.resize(d);
  for (int64_t g = 0; g < t.group; ++g) {
    const T* qg = t.q + g * t.q_stride;
    for (int64_t c = 0; c < d; ++c) s.q[c] = static_cast<float>(qg[c]) * scale;
    for (int64_t j = 0; j < t.len; ++j) {
      const T* k = t.keys + t.slots[j] * d;
      float dot = 0.f;
      for (int64_t c = 0; c < d; ++c) dot += s.q[c] * static_cast<float>(k[c]);
      s.scores[j] = dot;
    }
    std::fill(s.scores.begin() + t.len, s.scores.end(), NEG_INF);
    const float total = exp_normalize(s.scores.data(), padded);
    std::fill(s.acc.begin(), s.acc.end(), 0.f);
    for (int64_t j = 0; j < t.len; ++j) {
      const T* v = t.values + t.slots[j] * d;
      for (int64_t c = 0; c < d; ++c) s.acc[c] += s.scores[j] * static_cast<float>(v[c]);
    }
    store_row(s.acc.data(), 1.f / total, t.out + g * t.out_stride, d);
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tokens,
         const at::Tensor& slots, const at::Tensor& starts, double scale, at::Tensor& out) {
  const int64_t rows = tokens.numel(), q_heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = k_pool.size(0), pool_slots = k_pool.size(1), group = q_heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  std::atomic<bool> outside{false};
  // Head-major: a thread takes whole runs of rows for one kv head, so neighbouring rows' shared slots stay hot.
  at::parallel_for(0, kv_heads * rows, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / rows, r = task % rows;
      const int64_t* row_slots = sp + st[r];
      const int64_t len = st[r + 1] - st[r];
      bool inside = true;
      for (int64_t j = 0; j < len; ++j) inside &= row_slots[j] >= 0 && row_slots[j] < pool_slots;
      if (!inside) {
        outside = true;
        continue;
      }
      const bool last = r + 1 == rows;
      const Task<T> t{qp + tok[r] * q.stride(0) + h * group * q.stride(1), q.stride(1),
                      op + tok[r] * out.stride(0) + h * group * out.stride(1), out.stride(1),
                      kp + h * pool_slots * d, vp + h * pool_slots * d, row_slots, len, group,
                      last ? nullptr : sp + st[r + 1], last ? 0 : st[r + 2] - st[r + 1]};
      switch (d % W ? 0 : d / W) {
        case 4: attend<T, 4>(t, fscale, scratch); break;
        case 5: attend<T, 5>(t, fscale, scratch); break;
        case 6: attend<T, 6>(t, fscale, scratch); break;
        case 8: attend<T, 8>(t, fscale, scratch); break;
        case 16: attend<T, 16>(t, fscale, scratch); break;
        default: attend_any(t, d, fscale, scratch);
      }
    }
  });
  TORCH_CHECK(!outside, "paged_decode: a slot is outside the pool");
}

// q: [N, q_heads, d], out: the same shape (any strides, d contiguous); k_pool, v_pool: [kv_heads, slots, d];
// tokens: [rows] which of the N queries each row is; slots: each row's slots, one row after another, where
// starts: [rows + 1] says. Writes out[tokens[r]] for every row; leaves the other tokens of `out` alone.
void paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tokens,
                  const at::Tensor& slots, const at::Tensor& starts, double scale, at::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "q [N, heads, d], pools [kv_heads, slots, d]");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out must be contiguous in their last dimension");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.sizes() == v_pool.sizes(),
              "contiguous pools of one shape");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.scalar_type() == v_pool.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "q, out and the pools must have one dtype");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(0) == 0, "head sizes do not match");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && starts.scalar_type() == at::kLong,
              "int64 tokens, slots and starts");
  TORCH_CHECK(tokens.is_contiguous() && slots.is_contiguous() && starts.is_contiguous(), "contiguous indices");
  TORCH_CHECK(starts.numel() == tokens.numel() + 1, "starts must have rows + 1 entries");
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[tokens.numel()] == slots.numel(), "starts must run from 0 to the number of slots");
  for (int64_t r = 0; r < tokens.numel(); ++r) {
    TORCH_CHECK(st[r + 1] > st[r], "every row must have at least one slot");
    TORCH_CHECK(tok[r] >= 0 && tok[r] < q.size(0), "a token is outside q");
  }
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, k_pool, v_pool, tokens, slots, starts, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(q, k_pool, v_pool, tokens, slots, starts, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", q.scalar_type());
  }
}

// How this build came out: the threads at::parallel_for runs the kernel on now (1 where the build has no
// OpenMP: the kernel would silently run on one thread; the tests check that it follows torch.set_num_threads,
// which it does only when it shares torch's OpenMP runtime) and the floats per at::vec register.
std::string build_info() {
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  return "threads=" + std::to_string(threads) + " vector_floats=" + std::to_string(W);
}

}  // namespace

TORCH_LIBRARY(prefixserve, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor tokens, Tensor slots, Tensor starts, "
      "float scale, Tensor(a!) out) -> ()");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
