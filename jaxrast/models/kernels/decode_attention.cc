// Decode attention on CPU for the engine's slots: each query reads exactly the keys it
// may see (its own row's, up to its position), in one call per layer.
//
// Why a kernel: with XLA's ops a slot either reads its whole cache (256 positions on the toy
// family while most rows hold ~100) or gathers its blocks first (the gathers cost as much as
// the reads on XLA:CPU). Here a row costs its own length. Built and loaded by
// jaxrast/models/cpu_attention.py; every query's arithmetic depends on its own keys only, in
// a fixed order, so a row's result never depends on its neighbours or its slot.
//
// Shapes: q [b, kv, g, t, d], k [P, kv, d, page] (keys transposed), v [P, kv, page, d] (a
// pool of P pages), pages [b, n] int32 (row b's position j lives in page pages[b, j / page];
// a cache in rows passes one page per row, of its whole length), qpos [b, t] int32,
// kmask [b, s] bool with s = n * page; out [b, kv, g, t, d]. Query (b, t) sees key j when
// j <= qpos[b, t] and kmask[b, j] and, with a sliding window (attribute window > 0),
// j > qpos[b, t] - window: no value behind the window is read (keys only in the tile of 8
// that the window starts in, masked). Scores are q.k /
// divisor, soft-capped to softcap * tanh(score / softcap) when softcap > 0. page and d must
// be multiples of 8; float32 only. A page id outside the pool reads page 0 (never a visible key).
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t i8v __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8 load(const float* p) { return *reinterpret_cast<const v8*>(p); }
static inline void store(float* p, v8 x) { *reinterpret_cast<v8*>(p) = x; }
static inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp of 8 lanes (Cephes-style range reduction and polynomial); below -87 the result is 0.
static inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f);
  i8v tiny = x < lo;
  v8 v = x < lo ? lo : x;
  v8 kf = v * splat(1.44269504088896341f);
  kf = kf + (kf >= splat(0.0f) ? splat(0.5f) : splat(-0.5f));
  i8v ki = __builtin_convertvector(kf, i8v);
  v8 k = __builtin_convertvector(ki, v8);
  v8 r = v - k * splat(0.693359375f);
  r = r - k * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  i8v bits = (ki + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, 32);
  v8 out = p * scale;
  return tiny ? splat(0.0f) : out;
}

static inline float hsum(v8 x) {  // a fixed tree
  float a[8];
  std::memcpy(a, &x, 32);
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}
static inline float hmax(v8 x) {
  float a[8];
  std::memcpy(a, &x, 32);
  float m = a[0];
  for (int i = 1; i < 8; ++i) m = a[i] > m ? a[i] : m;
  return m;
}

// Scores of G query heads against 8 keys of one kv head (Kj: the first key's column, `stride`
// floats between a key's dims), stored at sc[g * S]: the keys are read once and the G
// accumulators stay in registers (G is a compile-time constant).
template <int G>
static void scores8(const float* Kj, int64_t stride, int64_t S, int64_t D, const float* qs, float* sc) {
  v8 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = splat(0.0f);
  for (int64_t dd = 0; dd < D; ++dd) {
    const v8 kv = load(Kj + dd * stride);
    for (int g = 0; g < G; ++g) acc[g] += splat(qs[g * D + dd]) * kv;
  }
  for (int g = 0; g < G; ++g) store(sc + g * S, acc[g]);
}

static void scores_any(const float* Kj, int64_t stride, int64_t S, int64_t D, const float* qs, int64_t G, float* sc) {
  for (int64_t g = 0; g < G; ++g) {
    v8 acc = splat(0.0f);
    for (int64_t dd = 0; dd < D; ++dd) acc += splat(qs[g * D + dd]) * load(Kj + dd * stride);
    store(sc + g * S, acc);
  }
}

// out[g][0 .. 8C) += sum_j w[g][j] * V[j, c0 .. c0 + 8C) for the G query heads at once: V is
// read once, the G x C accumulators stay in registers.
template <int G, int C>
static void weighted8(const float* w, int64_t S, const float* Vb, int64_t D, int64_t n, int64_t c0, v8* out) {
  v8 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = splat(0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = Vb + j * D + c0;
    v8 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(vr + 8 * c);
    for (int g = 0; g < G; ++g) {
      const v8 wj = splat(w[g * S + j]);
      for (int c = 0; c < C; ++c) acc[g][c] += wj * vv[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) out[g * (D / 8) + c0 / 8 + c] += acc[g][c];
}

template <int G>
static void weighted_g(const float* w, int64_t S, const float* Vb, int64_t D, int64_t n, v8* out) {
  int64_t c0 = 0;
  for (; c0 + 16 <= D; c0 += 16) weighted8<G, 2>(w, S, Vb, D, n, c0, out);
  if (c0 < D) weighted8<G, 1>(w, S, Vb, D, n, c0, out);
}

static void weighted(const float* w, int64_t S, const float* Vb, int64_t D, int64_t G, int64_t n, v8* out) {
  switch (G) {
    case 1: return weighted_g<1>(w, S, Vb, D, n, out);
    case 2: return weighted_g<2>(w, S, Vb, D, n, out);
    case 3: return weighted_g<3>(w, S, Vb, D, n, out);
    case 4: return weighted_g<4>(w, S, Vb, D, n, out);
    case 8: return weighted_g<8>(w, S, Vb, D, n, out);
    default:
      for (int64_t g = 0; g < G; ++g) weighted_g<1>(w + g * S, S, Vb, D, n, out + g * (D / 8));
  }
}

static ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                  ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::S32> qpos,
                                  ffi::Buffer<ffi::PRED> kmask, ffi::ResultBuffer<ffi::F32> out, float divisor,
                                  int64_t window, float softcap) {
  auto qd = q.dimensions();
  const int64_t B = qd[0], H = qd[1], G = qd[2], T = qd[3], D = qd[4];
  const int64_t NP = k.dimensions()[0], PS = k.dimensions()[3], N = pages.dimensions()[1], S = N * PS;
  if (PS % 8 || D % 8) return ffi::Error::InvalidArgument("decode attention: page size and head size must be multiples of 8");
  const int32_t* PT = pages.typed_data();
  const float* Q = q.typed_data();
  const float* K = k.typed_data();
  const float* V = v.typed_data();
  const int32_t* P = qpos.typed_data();
  const bool* M = kmask.typed_data();
  float* O = out->typed_data();
  const float scale = 1.0f / divisor;
  std::vector<float> sc(G * S), qs(G * D);
  std::vector<v8> acc(G * D / 8);
  std::vector<float> totals(G);
  std::vector<int64_t> page_of(N);
  for (int64_t b = 0; b < B; ++b) {
    const bool* mrow = M + b * S;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t p = PT[b * N + i];
      page_of[i] = (p < 0 || p >= NP) ? 0 : p;
    }
    for (int64_t h = 0; h < H; ++h) {
      // key j of this row and head: page page_of[j / PS], column j % PS
      auto kcol = [&](int64_t j) { return K + (page_of[j / PS] * H + h) * D * PS + j % PS; };
      auto vrow = [&](int64_t j) { return V + ((page_of[j / PS] * H + h) * PS + j % PS) * D; };
      for (int64_t t = 0; t < T; ++t) {
        int64_t n = static_cast<int64_t>(P[b * T + t]) + 1;
        n = n < 0 ? 0 : (n > S ? S : n);
        const int64_t n8 = (n + 7) / 8 * 8;
        // the first visible key, and the tile holding it: keys [lo8, n8) are scored, the
        // ones before lo masked like those at or past n
        int64_t lo = window > 0 ? n - window : 0;
        lo = lo < 0 ? 0 : (lo > n ? n : lo);
        const int64_t lo8 = lo / 8 * 8;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t dd = 0; dd < D; ++dd) qs[g * D + dd] = Q[(((b * H + h) * G + g) * T + t) * D + dd] * scale;
        for (int64_t j = lo8; j < n8; j += 8) {
          const float* Kj = kcol(j);
          float* sj = sc.data() + j;
          switch (G) {
            case 1: scores8<1>(Kj, PS, S, D, qs.data(), sj); break;
            case 2: scores8<2>(Kj, PS, S, D, qs.data(), sj); break;
            case 3: scores8<3>(Kj, PS, S, D, qs.data(), sj); break;
            case 4: scores8<4>(Kj, PS, S, D, qs.data(), sj); break;
            case 5: scores8<5>(Kj, PS, S, D, qs.data(), sj); break;
            case 6: scores8<6>(Kj, PS, S, D, qs.data(), sj); break;
            case 7: scores8<7>(Kj, PS, S, D, qs.data(), sj); break;
            case 8: scores8<8>(Kj, PS, S, D, qs.data(), sj); break;
            default: scores_any(Kj, PS, S, D, qs.data(), G, sj);
          }
        }
        const bool all_seen = std::memchr(mrow + lo, 0, n - lo) == nullptr;  // the engine's case: no hole
        for (int64_t g = 0; g < G; ++g) {
          float* sg = sc.data() + g * S;
          if (softcap > 0.0f)
            for (int64_t j = lo; j < n; ++j) sg[j] = softcap * std::tanh(sg[j] / softcap);
          if (all_seen) {
            for (int64_t j = lo8; j < lo; ++j) sg[j] = -INFINITY;
            for (int64_t j = n; j < n8; ++j) sg[j] = -INFINITY;
          } else {
            for (int64_t j = lo8; j < n8; ++j) sg[j] = (j >= lo && j < n && mrow[j]) ? sg[j] : -INFINITY;
          }
          v8 mx = splat(-INFINITY);
          for (int64_t j = lo8; j < n8; j += 8) { v8 x = load(sg + j); mx = x > mx ? x : mx; }
          const float top = hmax(mx);
          v8 tot = splat(0.0f);
          if (top == -INFINITY) {  // sees no key (never in the engine: a query sees itself): 0
            for (int64_t j = lo8; j < n8; j += 8) store(sg + j, splat(0.0f));
          } else {
            for (int64_t j = lo8; j < n8; j += 8) { v8 w = exp8(load(sg + j) - splat(top)); store(sg + j, w); tot += w; }
          }
          totals[g] = hsum(tot);
        }
        // the weights of the visible keys lo .. n-1 against their rows of V, a page's run of
        // them at a time: no value behind the window is read (a key there is, in its tile of
        // 8, and masked)
        std::fill(acc.begin(), acc.end(), splat(0.0f));
        for (int64_t j = lo; j < n;) {
          const int64_t end = std::min(n, (j / PS + 1) * PS);
          weighted(sc.data() + j, S, vrow(j), D, G, end - j, acc.data());
          j = end;
        }
        for (int64_t g = 0; g < G; ++g) {
          float* o = O + (((b * H + h) * G + g) * T + t) * D;
          const float total = totals[g];
          for (int64_t c = 0; c < D / 8; ++c)
            store(o + 8 * c, total > 0.0f ? acc[g * (D / 8) + c] / splat(total) : splat(0.0f));
        }
      }
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxrast_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("divisor")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));
