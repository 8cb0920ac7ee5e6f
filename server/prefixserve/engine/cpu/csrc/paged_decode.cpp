// Paged decode attention on the CPU: one query token per row, attending over that row's slots of the KV pool,
// read in place in the pool's dtype (fp32 or bf16): no gather, no cast to a new tensor, no padding.
//
// Work is split over (group of rows, kv head) across torch's threads; each task handles the query heads that
// share its kv head (GQA without repeating K/V) for every row of its group, whose leading slots (an adapter
// prefix, prompt blocks from the prompt cache) are the same and are read once for all of them, in fp32, in at::vec registers (AVX2 or AVX-512 where the build says so,
// plain loops elsewhere), with a fixed order of operations per row: a row's result depends neither on the other
// rows of the step (batch-invariant) nor on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
static_assert(16 % W == 0, "shared slot counts come in multiples of 16: whole vectors");
constexpr int64_t TILE = 64;  // keys whose values are summed per pass: a tile of V stays in L1 for every query head

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

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// q . k over d values; D: d when known at compile time (the loop unrolls fully), else 0.
template <int64_t D>
inline float dot(const float* q, const float* k, int64_t d) {
  const int64_t n = D ? D : d, full = n - n % (2 * W);
  Vec a0(0.f), a1(0.f);
  for (int64_t i = 0; i < full; i += 2 * W) {
    a0 = at::vec::fmadd(Vec::loadu(q + i), Vec::loadu(k + i), a0);
    a1 = at::vec::fmadd(Vec::loadu(q + i + W), Vec::loadu(k + i + W), a1);
  }
  float acc = hsum(a0 + a1);
  for (int64_t i = full; i < n; ++i) acc += q[i] * k[i];
  return acc;
}

// out[0:d] += sum over the tile's keys t of p[t] * v_t.
template <int64_t D>
inline void weighted_sum(const float* p, const float* const* v, int64_t keys, float* out, int64_t d) {
  const int64_t n = D ? D : d, full = n - n % W;
  if constexpr (D > 0 && D % W == 0 && D / W <= 16) {
    Vec acc[D / W];
    for (int64_t c = 0; c < D / W; ++c) acc[c] = Vec::loadu(out + c * W);
    for (int64_t t = 0; t < keys; ++t) {
      const Vec w(p[t]);
      for (int64_t c = 0; c < D / W; ++c) acc[c] = at::vec::fmadd(w, Vec::loadu(v[t] + c * W), acc[c]);
    }
    for (int64_t c = 0; c < D / W; ++c) acc[c].store(out + c * W);
  } else {
    for (int64_t t = 0; t < keys; ++t) {
      const Vec w(p[t]);
      for (int64_t i = 0; i < full; i += W)
        at::vec::fmadd(w, Vec::loadu(v[t] + i), Vec::loadu(out + i)).store(out + i);
      for (int64_t i = full; i < n; ++i) out[i] += p[t] * v[t][i];
    }
  }
}

// Turns scores[0:len] into exp(score - max) in place; returns their sum. `len` is padded to W with -inf.
inline float exp_normalize(float* s, int64_t padded) {
  Vec top(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < padded; j += W) top = at::vec::maximum(top, Vec::loadu(s + j));
  const Vec m(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, top));
  Vec sum(0.f);
  for (int64_t j = 0; j < padded; j += W) {
    const Vec e = (Vec::loadu(s + j) - m).exp();
    e.store(s + j);
    sum = sum + e;
  }
  return hsum(sum);
}

// q: [rows, q_heads, d]; k_pool, v_pool: [kv_heads, pool_slots, d]; slots: [total]; starts: [rows + 1];
// groups: [num_groups + 1] row ranges; shared: [num_groups] leading slots that every row of a group has in
// common (the same pool slots: its adapter prefix, cached prompt blocks), read once for the whole group.
template <typename T, int64_t D>
void decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& slots,
            const at::Tensor& starts, const at::Tensor& groups, const at::Tensor& shared, double scale,
            at::Tensor& out) {
  const int64_t q_heads = q.size(1), d = D ? D : q.size(2);
  const int64_t kv_heads = k_pool.size(0), pool_slots = k_pool.size(1);
  const int64_t group = q_heads / kv_heads, num_groups = shared.numel();
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* gp = groups.data_ptr<int64_t>();
  const int64_t* shp = shared.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  constexpr bool widen = !std::is_same_v<T, float>;

  at::parallel_for(0, num_groups * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, wide(widen ? TILE * d : 0), scores, total;
    std::vector<int64_t> offset, padded;
    std::vector<const float*> tile(TILE);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t gi = task / kv_heads, h = task % kv_heads;
      const int64_t r0 = gp[gi], rows = gp[gi + 1] - r0, common = shp[gi];
      const T* kh = kp + h * pool_slots * d;
      const T* vh = vp + h * pool_slots * d;
      // Row i's query head g scores keys at scores[offset[i] + g * padded[i] + j], padded to W with -inf.
      // `common` is a multiple of W, so a row's scores, sums and weighted sums see its keys in the same order
      // and the same vector lanes as when it is alone: sharing a prefix changes no bit of its result.
      offset.assign(rows + 1, 0);
      padded.resize(rows);
      for (int64_t i = 0; i < rows; ++i) {
        padded[i] = (st[r0 + i + 1] - st[r0 + i] + W - 1) / W * W;
        offset[i + 1] = offset[i] + group * padded[i];
      }
      scores.assign(offset[rows], -std::numeric_limits<float>::infinity());
      qf.resize(rows * group * d);
      acc.assign(rows * group * d, 0.f);
      total.resize(rows * group);
      for (int64_t i = 0; i < rows * group; ++i) {
        const int64_t r = r0 + i / group, g = i % group;
        float* dst = qf.data() + i * d;
        const float* src = as_float(qp + (r * q_heads + h * group + g) * d, dst, d);
        for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * fscale;
      }
      auto score = [&](int64_t i, int64_t g, int64_t j) -> float& { return scores[offset[i] + g * padded[i] + j]; };
      for (int64_t j = 0; j < common; ++j) {  // shared keys: read once, scored by every query of the group
        const float* k = as_float(kh + sp[st[r0] + j] * d, wide.data(), d);
        for (int64_t i = 0; i < rows * group; ++i) score(i / group, i % group, j) = dot<D>(qf.data() + i * d, k, d);
      }
      for (int64_t i = 0; i < rows; ++i) {  // each row's own keys
        const int64_t first = st[r0 + i], len = st[r0 + i + 1] - first;
        for (int64_t j = common; j < len; ++j) {
          const float* k = as_float(kh + sp[first + j] * d, wide.data(), d);
          for (int64_t g = 0; g < group; ++g) score(i, g, j) = dot<D>(qf.data() + (i * group + g) * d, k, d);
        }
      }
      for (int64_t i = 0; i < rows * group; ++i)
        total[i] = exp_normalize(&score(i / group, i % group, 0), padded[i / group]);
      auto sum_values = [&](int64_t i_begin, int64_t i_end, int64_t first, int64_t j_begin, int64_t j_end) {
        for (int64_t j0 = j_begin; j0 < j_end; j0 += TILE) {
          const int64_t keys = std::min(TILE, j_end - j0);
          for (int64_t t = 0; t < keys; ++t)
            tile[t] = as_float(vh + sp[first + j0 + t] * d, wide.data() + (widen ? t * d : 0), d);
          for (int64_t i = i_begin; i < i_end; ++i)
            for (int64_t g = 0; g < group; ++g)
              weighted_sum<D>(&score(i, g, j0), tile.data(), keys, acc.data() + (i * group + g) * d, d);
        }
      };
      sum_values(0, rows, st[r0], 0, common);  // shared values, read once
      for (int64_t i = 0; i < rows; ++i) sum_values(i, i + 1, st[r0 + i], common, st[r0 + i + 1] - st[r0 + i]);
      for (int64_t i = 0; i < rows * group; ++i) {
        const int64_t r = r0 + i / group, g = i % group;
        T* o = op + (r * q_heads + h * group + g) * d;
        const float inv = 1.f / total[i];
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(acc[i * d + c] * inv);
      }
    }
  });
}

template <typename T>
void dispatch_head_size(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& groups,
                        const at::Tensor& shared, double scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: return decode<T, 64>(q, k_pool, v_pool, slots, starts, groups, shared, scale, out);
    case 128: return decode<T, 128>(q, k_pool, v_pool, slots, starts, groups, shared, scale, out);
    default: return decode<T, 0>(q, k_pool, v_pool, slots, starts, groups, shared, scale, out);
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& slots, const at::Tensor& starts, const at::Tensor& groups,
                        const at::Tensor& shared, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "q [rows, heads, d], pools [kv_heads, slots, d]");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && k_pool.scalar_type() == v_pool.scalar_type(),
              "q and the pools must have one dtype");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(0) == 0, "head sizes do not match");
  TORCH_CHECK(slots.scalar_type() == at::kLong && starts.scalar_type() == at::kLong, "int64 slots and starts");
  TORCH_CHECK(starts.numel() == q.size(0) + 1, "starts must have rows + 1 entries");
  TORCH_CHECK(groups.scalar_type() == at::kLong && shared.scalar_type() == at::kLong, "int64 groups and shared");
  TORCH_CHECK(groups.numel() == shared.numel() + 1, "groups must have one entry more than shared");
  const int64_t* gp = groups.data_ptr<int64_t>();
  const int64_t* shp = shared.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(gp[0] == 0 && gp[shared.numel()] == q.size(0), "groups must cover the rows, from 0 to rows");
  for (int64_t g = 0; g < shared.numel(); ++g) {
    TORCH_CHECK(gp[g] < gp[g + 1], "groups must be increasing row ranges");
    TORCH_CHECK(shp[g] >= 0 && shp[g] % 16 == 0, "shared slot counts must be multiples of 16");
    for (int64_t r = gp[g]; r < gp[g + 1]; ++r)
      TORCH_CHECK(st[r + 1] - st[r] > shp[g], "a row must have slots of its own after the shared ones");
  }
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    dispatch_head_size<float>(q, k_pool, v_pool, slots, starts, groups, shared, scale, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_size<c10::BFloat16>(q, k_pool, v_pool, slots, starts, groups, shared, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
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
      "paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor slots, Tensor starts, Tensor groups, "
      "Tensor shared, float scale) -> Tensor");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(prefixserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
