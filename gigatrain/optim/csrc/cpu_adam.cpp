// AdamW step on flat fp32 CPU buffers for optimizer offload.
//
// One pass over memory: read param, grad (fp32, bf16 or fp16), exp_avg, exp_avg_sq; write param,
// exp_avg, exp_avg_sq and optionally a bf16/fp16 copy of the new param. Threads split the range
// with OpenMP.
//
// The arithmetic mirrors torch's fused CPU AdamW (aten/src/ATen/native/cpu/FusedAdamKernel.cpp)
// operation by operation, so that results are bit-identical to torch.optim.AdamW(fused=True):
//   p  = p * f32(1 - lr * wd)
//   m  = fma(c, g - m, base)               (torch's lerp: c = w, base = m if |w| < .5, else
//                                            c = w - 1, base = g; w = 1 - beta1)
//   v  = fma(f32(1 - beta2) * g, g, v * beta2)
//   d  = sqrt(v) / f32(sqrt(1 - beta2^t)) + eps
//   p  = p + (f32(-lr / (1 - beta1^t)) * m) / d
// The scalars are computed in double exactly as torch does, then rounded to fp32.
//
// Speed: on wide cores this loop is bound by the divide/sqrt unit, not by memory, while the data
// is in cache. Divisions by a per-step constant (the bias correction sqrt(1 - beta2^t) and the
// loss scale) are therefore done as a multiplication by the reciprocal in double precision,
// rounded once to fp32. That is still the correctly rounded fp32 quotient: for fp32 a and c,
// a / c is never within a relative 2^-49 of an fp32 rounding boundary (a midpoint between two
// fp32 numbers has a 25-bit odd significand, so a = c * midpoint is impossible and
// |a - c * midpoint| is at least one unit of c * midpoint), while the double product is within
// 2^-52 of a / c. This keeps the bit-exact match and frees the divider for the two operations
// that need it (sqrt and the per-element division).
//
// Everything is compiled without implicit FMA contraction (-ffp-contract=off); FMAs appear only
// where torch's kernel has them.
//
// ISA: AVX-512 and AVX2 paths are compiled in the same file with target pragmas and chosen at run
// time, so the built library is portable across x86-64 machines (no -march=native needed); any
// other machine uses the scalar path.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GT_X86 1
#else
#define GT_X86 0
#endif

namespace {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Per-step constants, rounded to fp32 the way torch's fused kernel rounds them.
struct Consts {
  float decay;         // 1 - lr * wd
  float lerp_coeff;    // w or w - 1
  bool lerp_small;     // |w| < 0.5: base is exp_avg, else base is grad
  float beta2;
  float c2;            // 1 - beta2
  double inv_bc2s;     // 1 / f32(sqrt(1 - beta2^t)), in double (see header)
  float eps;
  float neg_step;      // -lr / (1 - beta1^t)
  double inv_scale;    // 1 / f32(grad_scale), in double
  float clip;          // multiplies the unscaled gradient
  bool has_decay, has_scale, has_clip;
};

// ---------------------------------------------------------------- scalar conversions
inline float bits_to_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t x = f32_to_bits(f);
  if (std::isnan(f)) return 0x7fc0;
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
  return uint16_t(x >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (e == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  if (e == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    float v = float(mant) * 5.9604644775390625e-08f;
    return bits_to_f32(f32_to_bits(v) | sign);
  }
  return bits_to_f32(sign | ((e + 112u) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // inf or nan (keep nan quiet)
    return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {                                  // normal fp16
    uint32_t r = ax - 0x38000000u;                          // rebias exponent by 127 - 15
    r += 0xfffu + ((r >> 13) & 1u);                         // round to nearest even
    return uint16_t(sign | (r >> 13));
  }
  // Subnormal fp16: adding 0.5 lets the FPU round |f| to a multiple of 2^-24 (ulp of 0.5).
  float t = bits_to_f32(ax) + 0.5f;
  return uint16_t(sign | (f32_to_bits(t) - 0x3f000000u));
}

inline float load_grad_scalar(const void* g, int dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(g)[i];
  uint16_t h = static_cast<const uint16_t*>(g)[i];
  return dt == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

inline void store_out_scalar(void* o, int dt, int64_t i, float x) {
  if (dt == kBF16) static_cast<uint16_t*>(o)[i] = f32_to_bf16(x);
  else if (dt == kF16) static_cast<uint16_t*>(o)[i] = f32_to_f16(x);
  else if (dt == kF32) static_cast<float*>(o)[i] = x;
}

// ---------------------------------------------------------------- scalar path
void adam_scalar(float* p, const void* g, int gdt, float* m, float* v, void* out, int odt,
                 int64_t begin, int64_t end, const Consts& c) {
  for (int64_t i = begin; i < end; ++i) {
    float gi = load_grad_scalar(g, gdt, i);
    if (c.has_scale) gi = float(double(gi) * c.inv_scale);
    if (c.has_clip) gi = gi * c.clip;
    float pi = p[i];
    if (c.has_decay) pi = pi * c.decay;
    float mi = m[i];
    mi = std::fma(c.lerp_coeff, gi - mi, c.lerp_small ? mi : gi);
    float vi = std::fma(c.c2 * gi, gi, v[i] * c.beta2);
    float d = float(double(std::sqrt(vi)) * c.inv_bc2s) + c.eps;
    pi = pi + (c.neg_step * mi) / d;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (out) store_out_scalar(out, odt, i, pi);
  }
}

#if GT_X86
// ---------------------------------------------------------------- AVX2 + FMA + F16C path
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

inline __m256 avx2_load_grad(const void* g, int dt, int64_t i) {
  if (dt == kF32) return _mm256_loadu_ps(static_cast<const float*>(g) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(g) + i));
  if (dt == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

inline __m256 avx2_div_const(__m256 a, __m256d inv) {
  __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
  __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
  __m128 rlo = _mm256_cvtpd_ps(_mm256_mul_pd(lo, inv));
  __m128 rhi = _mm256_cvtpd_ps(_mm256_mul_pd(hi, inv));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(rlo), rhi, 1);
}

inline void avx2_store_out(void* o, int dt, int64_t i, __m256 x) {
  if (dt == kF16) {
    __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(o) + i), h);
  } else if (dt == kBF16) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(o) + i), _mm256_castsi256_si128(packed));
  } else if (dt == kF32) {
    _mm256_storeu_ps(static_cast<float*>(o) + i, x);
  }
}

void adam_avx2(float* p, const void* g, int gdt, float* m, float* v, void* out, int odt,
               int64_t begin, int64_t end, const Consts& c) {
  const __m256 decay = _mm256_set1_ps(c.decay), coeff = _mm256_set1_ps(c.lerp_coeff);
  const __m256 beta2 = _mm256_set1_ps(c.beta2), c2 = _mm256_set1_ps(c.c2);
  const __m256 eps = _mm256_set1_ps(c.eps), neg_step = _mm256_set1_ps(c.neg_step);
  const __m256 clip = _mm256_set1_ps(c.clip);
  const __m256d inv_bc2s = _mm256_set1_pd(c.inv_bc2s), inv_scale = _mm256_set1_pd(c.inv_scale);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 gi = avx2_load_grad(g, gdt, i);
    if (c.has_scale) gi = avx2_div_const(gi, inv_scale);
    if (c.has_clip) gi = _mm256_mul_ps(gi, clip);
    __m256 pi = _mm256_loadu_ps(p + i);
    if (c.has_decay) pi = _mm256_mul_ps(pi, decay);
    __m256 mi = _mm256_loadu_ps(m + i);
    __m256 base = c.lerp_small ? mi : gi;
    mi = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gi, mi), base);
    __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(c2, gi), gi, _mm256_mul_ps(_mm256_loadu_ps(v + i), beta2));
    __m256 d = _mm256_add_ps(avx2_div_const(_mm256_sqrt_ps(vi), inv_bc2s), eps);
    pi = _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(neg_step, mi), d));
    _mm256_storeu_ps(p + i, pi);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    if (out) avx2_store_out(out, odt, i, pi);
  }
  if (i < end) adam_scalar(p, g, gdt, m, v, out, odt, i, end, c);
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------- AVX-512 path
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

inline __m512 avx512_load_grad(const void* g, int dt, int64_t i, __mmask16 k) {
  if (dt == kF32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(g) + i);
  __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(g) + i);
  if (dt == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

inline __m512 avx512_div_const(__m512 a, __m512d inv) {
  __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
  __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1));
  __m256 rlo = _mm512_cvtpd_ps(_mm512_mul_pd(lo, inv));
  __m256 rhi = _mm512_cvtpd_ps(_mm512_mul_pd(hi, inv));
  return _mm512_insertf32x8(_mm512_castps256_ps512(rlo), rhi, 1);
}

inline void avx512_store_out(void* o, int dt, int64_t i, __m512 x, __mmask16 k) {
  if (dt == kF16) {
    __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(o) + i, k, h);
  } else if (dt == kBF16) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(o) + i, k, _mm512_cvtepi32_epi16(r));
  } else if (dt == kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(o) + i, k, x);
  }
}

void adam_avx512(float* p, const void* g, int gdt, float* m, float* v, void* out, int odt,
                 int64_t begin, int64_t end, const Consts& c) {
  // Constants live in registers; reading them through `c` would reload them after every store,
  // since the compiler cannot rule out that the float stores alias them.
  const __m512 decay = _mm512_set1_ps(c.decay), coeff = _mm512_set1_ps(c.lerp_coeff);
  const __m512 beta2 = _mm512_set1_ps(c.beta2), c2 = _mm512_set1_ps(c.c2);
  const __m512 eps = _mm512_set1_ps(c.eps), neg_step = _mm512_set1_ps(c.neg_step);
  const __m512 clip = _mm512_set1_ps(c.clip);
  const __m512d inv_bc2s = _mm512_set1_pd(c.inv_bc2s), inv_scale = _mm512_set1_pd(c.inv_scale);
  const bool has_scale = c.has_scale, has_clip = c.has_clip, has_decay = c.has_decay;
  const bool lerp_small = c.lerp_small;

  // One vector of 16 lanes; masked-off lanes are loaded as zeros and not stored.
  auto block = [&](int64_t i, __mmask16 k) {
    __m512 gi = avx512_load_grad(g, gdt, i, k);
    if (has_scale) gi = avx512_div_const(gi, inv_scale);
    if (has_clip) gi = _mm512_mul_ps(gi, clip);
    __m512 pi = _mm512_maskz_loadu_ps(k, p + i);
    if (has_decay) pi = _mm512_mul_ps(pi, decay);
    __m512 mi = _mm512_maskz_loadu_ps(k, m + i);
    __m512 base = lerp_small ? mi : gi;
    mi = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gi, mi), base);
    __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, gi), gi, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), beta2));
    __m512 d = _mm512_add_ps(avx512_div_const(_mm512_sqrt_ps(vi), inv_bc2s), eps);
    pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(neg_step, mi), d));
    _mm512_mask_storeu_ps(p + i, k, pi);
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
    if (out) avx512_store_out(out, odt, i, pi, k);
  };
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) block(i, 0xffff);
  if (i < end) block(i, __mmask16((1u << (end - i)) - 1u));
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // GT_X86

int detect_isa() {
#if GT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kScalar;
}

using Kernel = void (*)(float*, const void*, int, float*, float*, void*, int, int64_t, int64_t, const Consts&);

Kernel kernel_for(int isa) {
#if GT_X86
  if (isa == kAvx512) return adam_avx512;
  if (isa == kAvx2) return adam_avx2;
#endif
  return adam_scalar;
}

}  // namespace

extern "C" {

// ISA the step will use given an upper bound (-1: best available): 0 scalar, 1 AVX2, 2 AVX-512.
int gt_cpu_adam_isa(int max_isa) {
  static const int isa = detect_isa();
  return max_isa >= 0 ? std::min(isa, max_isa) : isa;
}

// Whether the library was built with OpenMP (otherwise num_threads is ignored).
int gt_cpu_adam_has_openmp() {
#if defined(_OPENMP)
  return 1;
#else
  return 0;
#endif
}

// AdamW step on n contiguous elements. grad_dtype/out_dtype: 0 fp32, 1 bf16, 2 fp16; out may be
// null. step is the 1-based step count after increment (as torch's state["step"]). Returns 0, or
// a negative number for invalid arguments.
int gt_cpu_adamw_step(float* param, const void* grad, int grad_dtype, float* exp_avg,
                      float* exp_avg_sq, void* out, int out_dtype, int64_t n, double lr,
                      double beta1, double beta2, double eps, double weight_decay, double step,
                      double grad_scale, double clip_coef, int num_threads, int max_isa) {
  if (n < 0) return -1;
  if (grad_dtype < kF32 || grad_dtype > kF16) return -2;
  if (out && (out_dtype < kF32 || out_dtype > kF16)) return -3;
  if (n == 0) return 0;

  // Same double-precision scalars as torch's fused kernel.
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  const float lerp_w = float(1 - beta1);

  Consts c;
  c.has_decay = weight_decay != 0.0;
  c.decay = float(1 - lr * weight_decay);
  c.lerp_small = std::abs(lerp_w) < 0.5f;
  c.lerp_coeff = c.lerp_small ? lerp_w : lerp_w - 1.0f;
  c.beta2 = float(beta2);
  c.c2 = float(1 - beta2);
  c.inv_bc2s = 1.0 / double(float(std::sqrt(bias_correction2)));
  c.eps = float(eps);
  c.neg_step = float(-step_size);
  c.has_scale = grad_scale != 1.0;
  c.inv_scale = 1.0 / double(float(grad_scale));
  c.has_clip = clip_coef != 1.0;
  c.clip = float(clip_coef);

  const Kernel kernel = kernel_for(gt_cpu_adam_isa(max_isa));

  // Below ~32K elements per thread, waking threads costs more than it saves.
  constexpr int64_t kMinPerThread = 32768;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / kMinPerThread));
#if defined(_OPENMP)
  if (threads > 1) {
    // Threads take 32K-element blocks (128 KB per stream) from a shared counter rather than one
    // fixed share each: when the host is busy (data loading, copy threads, other ranks) a thread
    // that is descheduled no longer holds everyone else up at the end of the step. Block
    // boundaries are multiples of 16 elements, so for a 64-byte aligned buffer no two threads
    // write to the same cache line.
    constexpr int64_t kBlock = 32768;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(int(threads)) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b = blk * kBlock, e = std::min(n, b + kBlock);
      kernel(param, grad, grad_dtype, exp_avg, exp_avg_sq, out, out_dtype, b, e, c);
    }
    return 0;
  }
#endif
  kernel(param, grad, grad_dtype, exp_avg, exp_avg_sq, out, out_dtype, 0, n, c);
  return 0;
}

}  // extern "C"
