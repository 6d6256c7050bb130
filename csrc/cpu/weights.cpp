// Full-size <-> compact tensors: the weight gather before a layer's GEMM/conv, the scatter of its
// weight gradient back into a full-size tensor, and the same for per-channel vectors.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#include "common.h"
#include "kept.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CADK_HAVE_AVX512_ROWS 1
#endif

namespace cadk::cpu {
namespace {

// Elements move as raw bits: copies need only the element size.
template <typename F>
void with_bits(const Tensor& t, const F& f) {
  switch (t.element_size()) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK(false, "cadk: unsupported element size ", t.element_size(), " of ", t.scalar_type());
  }
}

// Weight storage seen as [C_out, P, Q]: P = C_in, Q = kernel taps (channel-major), or P = taps,
// Q = C_in (channels-last). `in_inner` tells which.
struct WeightShape {
  int64_t out, in, taps;
  bool in_inner;
  // Whether each tap's C_in entries are contiguous (channels-last, or a linear weight's rows).
  bool in_runs() const { return in_inner || taps == 1; }
};

WeightShape weight_shape(const Tensor& w) {
  const int64_t taps = w.dim() > 2 ? w.numel() / std::max<int64_t>(1, w.size(0) * w.size(1)) : 1;
  return {w.size(0), w.size(1), taps, format_of(w) == at::MemoryFormat::ChannelsLast};
}

std::vector<int64_t> inverse_index(const Tensor& alive, int64_t full) {
  std::vector<int64_t> inv(full, -1);
  const Tensor a = alive.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  for (int64_t k = 0; k < a.numel(); ++k) inv[p[k]] = k;
  return inv;
}

std::vector<int64_t> dense_strides(at::IntArrayRef sizes, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::ChannelsLast) return c10::get_channels_last_strides_2d(sizes);
  const auto dense = c10::contiguous_strides(sizes);
  return {dense.begin(), dense.end()};
}

Tensor view_of(const at::Storage& storage, at::IntArrayRef sizes, const at::TensorOptions& options,
               at::MemoryFormat fmt) {
  return at::empty({0}, options).set_(storage, 0, sizes, dense_strides(sizes, fmt));
}

int64_t bytes_of(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return c10::multiply_integers(sizes) * int64_t(c10::elementSize(options.dtype().toScalarType()));
}

// Whether only the cache still references `storage`: nobody else can see it being reused. The
// acquire fence orders the reuse after the last user's release of its reference on another thread.
bool only_cached(const at::Storage& storage) {
  if (storage.use_count() != 1) return false;
  std::atomic_thread_fence(std::memory_order_acquire);
  return true;
}

std::vector<at::Storage>& scratch_cache() {
  thread_local std::vector<at::Storage> cached;
  return cached;
}

}  // namespace

// A few storages per thread, each reused once only this cache still references it. Bounded: at
// most kSlots storages and kMaxScratchBytes in all; a request that does not fit gets fresh memory.
Tensor scratch_tensor(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt) {
  constexpr size_t kSlots = 4;
  constexpr int64_t kMaxScratchBytes = int64_t(64) << 20;
  std::vector<at::Storage>& cached = scratch_cache();
  const int64_t bytes = bytes_of(sizes, options);
  if (bytes > kMaxScratchBytes) return at::empty(sizes, options.memory_format(fmt));
  at::Storage* pick = nullptr;  // the smallest free storage that fits
  int64_t held = 0;
  for (at::Storage& st : cached) {
    held += int64_t(st.nbytes());
    const bool fits = int64_t(st.nbytes()) >= bytes && only_cached(st);
    if (fits && (pick == nullptr || st.nbytes() < pick->nbytes())) pick = &st;
  }
  if (pick != nullptr) return view_of(*pick, sizes, options, fmt);
  // Make room by dropping free storages, largest first, then cache a new one if it fits.
  while (cached.size() >= kSlots || held + bytes > kMaxScratchBytes) {
    auto victim = cached.end();
    for (auto it = cached.begin(); it != cached.end(); ++it) {
      if (it->use_count() == 1 && (victim == cached.end() || it->nbytes() > victim->nbytes())) victim = it;
    }
    if (victim == cached.end()) break;
    held -= int64_t(victim->nbytes());
    cached.erase(victim);
  }
  at::Storage fresh = at::empty({bytes}, options.dtype(at::kByte)).storage();
  if (cached.size() < kSlots && held + bytes <= kMaxScratchBytes) cached.push_back(fresh);
  return view_of(fresh, sizes, options, fmt);
}

namespace {

// Memory for full-size weight gradients, handed back once the caller has dropped them. Each backward
// returns a new full-size gradient, typically freed by the optimizer's zero_grad(set_to_none=True);
// from malloc, blocks of this size came back as fresh pages (glibc trims and regrows the heap), so
// every backward page-faulted its gradient in again. A buffer is reused only when the pool holds its
// one remaining strong reference (only_cached). Buffers in use cost the pool nothing; the free ones
// are bounded in bytes, least recently handed out dropped first. Small gradients come from malloc's
// free lists anyway and are not kept. The pool's reference also makes autograd sum two gradients of
// one weight (a weight used twice in a graph) out of place rather than into the first.
class GradientBuffers {
 public:
  Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat fmt) {
    const int64_t bytes = bytes_of(sizes, options);
    if (bytes < kMinBytes || bytes > kMaxFreeBytes) return at::empty(sizes, options.memory_format(fmt));
    std::lock_guard<std::mutex> lock(mu_);
    at::Storage storage;
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it) {
      if (int64_t(it->nbytes()) == bytes && only_cached(*it)) {
        storage = std::move(*it);
        buffers_.erase(it);
        break;
      }
    }
    if (!storage) storage = at::empty({bytes}, options.dtype(at::kByte)).storage();
    buffers_.push_back(storage);
    trim(kMaxFreeBytes);
    return view_of(storage, sizes, options, fmt);
  }

  void release_free() {
    std::lock_guard<std::mutex> lock(mu_);
    trim(0);
  }

 private:
  static constexpr int64_t kMinBytes = int64_t(256) << 10;
  static constexpr int64_t kMaxFreeBytes = int64_t(64) << 20;
  static constexpr size_t kMaxBuffers = 256;

  // Drops the oldest free buffers past max_free bytes, then the oldest of any past kMaxBuffers.
  void trim(int64_t max_free) {
    int64_t free_bytes = 0;
    for (const at::Storage& st : buffers_) free_bytes += st.use_count() == 1 ? int64_t(st.nbytes()) : 0;
    for (auto it = buffers_.begin(); it != buffers_.end() && free_bytes > max_free;) {
      if (it->use_count() != 1) {
        ++it;
        continue;
      }
      free_bytes -= int64_t(it->nbytes());
      it = buffers_.erase(it);
    }
    while (buffers_.size() > kMaxBuffers) buffers_.pop_front();
  }

  std::mutex mu_;
  std::list<at::Storage> buffers_;  // least recently handed out first
};

GradientBuffers& gradient_buffers() {
  static GradientBuffers buffers;
  return buffers;
}

// Alive channels of a C_in run as one bit mask per 16 consecutive channels, for the vector paths.
std::vector<uint16_t> run_masks(const Tensor& alive, int64_t full) {
  std::vector<uint16_t> masks((full + 15) / 16, 0);
  const Tensor a = alive.contiguous();
  const int64_t* p = a.data_ptr<int64_t>();
  for (int64_t k = 0; k < a.numel(); ++k) masks[p[k] >> 4] |= uint16_t(1u << (p[k] & 15));
  return masks;
}

#ifdef CADK_HAVE_AVX512_ROWS
inline __mmask16 low_bits(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// out[0..popcount) = src[j] for the alive j < n, in order: one load and compress per 16 entries
// rather than an indexed load per alive entry.
__attribute__((target("avx512f"))) void compress_run32(const uint32_t* src, const uint16_t* masks, int64_t n,
                                                      uint32_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = masks[j >> 4];
    const int count = __builtin_popcount(m);
    const __m512i v = _mm512_maskz_compress_epi32(m, _mm512_maskz_loadu_epi32(low_bits(n - j), src + j));
    _mm512_mask_storeu_epi32(out, low_bits(count), v);
    out += count;
  }
}

// The inverse: out[j] = the next compact entry for alive j, 0 for the others; n entries written in
// one sequential pass.
__attribute__((target("avx512f"))) void expand_run32(const uint32_t* src, const uint16_t* masks, int64_t n,
                                                    uint32_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = masks[j >> 4];
    const int count = __builtin_popcount(m);
    const __m512i v = _mm512_maskz_expand_epi32(m, _mm512_maskz_loadu_epi32(low_bits(count), src));
    _mm512_mask_storeu_epi32(out + j, low_bits(n - j), v);
    src += count;
  }
}

// expand_run32 and zeros with streaming stores (see streams()): `out` 64-byte aligned, n a multiple of 16.
__attribute__((target("avx512f"))) void expand_run32_stream(const uint32_t* src, const uint16_t* masks, int64_t n,
                                                           uint32_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = masks[j >> 4];
    const int count = __builtin_popcount(m);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j),
                        _mm512_maskz_expand_epi32(m, _mm512_maskz_loadu_epi32(low_bits(count), src)));
    src += count;
  }
}

__attribute__((target("avx512f"))) void zero_run32_stream(uint32_t* out, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j), _mm512_setzero_si512());
}

// The same for 2-byte elements (VBMI2), 16 lanes in a 256-bit register: `out` 32-byte aligned.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2"))) void expand_run16_stream(
    const uint16_t* src, const uint16_t* masks, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = masks[j >> 4];
    const int count = __builtin_popcount(m);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm256_maskz_expand_epi16(m, _mm256_maskz_loadu_epi16(low_bits(count), src)));
    src += count;
  }
}

__attribute__((target("avx512f"))) void zero_run16_stream(uint16_t* out, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) _mm256_stream_si256(reinterpret_cast<__m256i*>(out + j), _mm256_setzero_si256());
}

__attribute__((target("avx512f"))) void stream_fence() { _mm_sfence(); }

// The same for 2-byte elements (bfloat16, half), 16 lanes in a 256-bit register.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2"))) void compress_run16(
    const uint16_t* src, const uint16_t* masks, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = masks[j >> 4];
    const int count = __builtin_popcount(m);
    const __m256i v = _mm256_maskz_compress_epi16(m, _mm256_maskz_loadu_epi16(low_bits(n - j), src + j));
    _mm256_mask_storeu_epi16(out, low_bits(count), v);
    out += count;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2"))) void expand_run16(
    const uint16_t* src, const uint16_t* masks, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = masks[j >> 4];
    const int count = __builtin_popcount(m);
    const __m256i v = _mm256_maskz_expand_epi16(m, _mm256_maskz_loadu_epi16(low_bits(count), src));
    _mm256_mask_storeu_epi16(out + j, low_bits(n - j), v);
    src += count;
  }
}

bool vector_runs(const WeightShape& s, int64_t element_size) {
  if (!s.in_runs()) return false;
  return element_size == 4 ? cpu_has_avx512() : element_size == 2 && cpu_has_avx512_vbmi2();
}
#else
void compress_run32(const uint32_t*, const uint16_t*, int64_t, uint32_t*) {}
void expand_run32(const uint32_t*, const uint16_t*, int64_t, uint32_t*) {}
void compress_run16(const uint16_t*, const uint16_t*, int64_t, uint16_t*) {}
void expand_run16(const uint16_t*, const uint16_t*, int64_t, uint16_t*) {}
bool vector_runs(const WeightShape&, int64_t) { return false; }
void expand_run32_stream(const uint32_t*, const uint16_t*, int64_t, uint32_t*) {}
void zero_run32_stream(uint32_t*, int64_t) {}
void expand_run16_stream(const uint16_t*, const uint16_t*, int64_t, uint16_t*) {}
void zero_run16_stream(uint16_t*, int64_t) {}
void stream_fence() {}
#endif

// One run of the vector paths, for the element type B (4 or 2 bytes; others never take them).
template <typename B>
void compress_run(const B* src, const uint16_t* masks, int64_t n, B* out) {
  if constexpr (sizeof(B) == 4) {
    compress_run32(reinterpret_cast<const uint32_t*>(src), masks, n, reinterpret_cast<uint32_t*>(out));
  } else if constexpr (sizeof(B) == 2) {
    compress_run16(reinterpret_cast<const uint16_t*>(src), masks, n, reinterpret_cast<uint16_t*>(out));
  } else {
    TORCH_INTERNAL_ASSERT(false, "cadk: no vector path for ", sizeof(B), "-byte elements");
  }
}

template <typename B>
void expand_run(const B* src, const uint16_t* masks, int64_t n, B* out) {
  if constexpr (sizeof(B) == 4) {
    expand_run32(reinterpret_cast<const uint32_t*>(src), masks, n, reinterpret_cast<uint32_t*>(out));
  } else if constexpr (sizeof(B) == 2) {
    expand_run16(reinterpret_cast<const uint16_t*>(src), masks, n, reinterpret_cast<uint16_t*>(out));
  } else {
    TORCH_INTERNAL_ASSERT(false, "cadk: no vector path for ", sizeof(B), "-byte elements");
  }
}

// One run with streaming stores (see streams()): the expanded compact run, or zeros for src == null.
template <typename B>
void stream_run(const B* src, const uint16_t* masks, int64_t n, B* out) {
  if constexpr (sizeof(B) == 4) {
    uint32_t* d = reinterpret_cast<uint32_t*>(out);
    if (src == nullptr) return zero_run32_stream(d, n);
    expand_run32_stream(reinterpret_cast<const uint32_t*>(src), masks, n, d);
  } else if constexpr (sizeof(B) == 2) {
    uint16_t* d = reinterpret_cast<uint16_t*>(out);
    if (src == nullptr) return zero_run16_stream(d, n);
    expand_run16_stream(reinterpret_cast<const uint16_t*>(src), masks, n, d);
  } else {
    TORCH_INTERNAL_ASSERT(false, "cadk: no streaming path for ", sizeof(B), "-byte elements");
  }
}

// run_masks of alive_in where the rows take the vector path, else none (the scalar loops).
std::vector<uint16_t> vector_masks(const WeightShape& s, int64_t element_size, const Tensor& alive_in) {
  return vector_runs(s, element_size) ? run_masks(alive_in, s.in) : std::vector<uint16_t>{};
}

// Compact row `drow` ([taps, A] or [A, taps]) from full-size row `srow`.
template <typename B>
void gather_row(const WeightShape& s, const int64_t* ip, int64_t ai, const uint16_t* masks, const B* srow,
                B* drow) {
  if (masks != nullptr) {
    for (int64_t k = 0; k < s.taps; ++k) compress_run<B>(srow + k * s.in, masks, s.in, drow + k * ai);
  } else if (s.in_runs()) {
    for (int64_t k = 0; k < s.taps; ++k)
      for (int64_t i = 0; i < ai; ++i) drow[k * ai + i] = srow[k * s.in + ip[i]];
  } else {
    for (int64_t i = 0; i < ai; ++i)
      for (int64_t k = 0; k < s.taps; ++k) drow[i * s.taps + k] = srow[ip[i] * s.taps + k];
  }
}

// Full-size row `drow` from compact row `srow`, zeros at dead channels; srow == nullptr: all zeros.
// `stream`: with streaming stores (see streams()).
template <typename B>
void scatter_row(const WeightShape& s, const int64_t* ip, int64_t ai, const uint16_t* masks, const B* srow,
                 B* drow, bool stream) {
  if (stream) {
    for (int64_t k = 0; k < s.taps; ++k) {
      stream_run(srow == nullptr ? nullptr : srow + k * ai, masks, s.in, drow + k * s.in);
    }
    return;
  }
  if (srow != nullptr && masks != nullptr) {
    for (int64_t k = 0; k < s.taps; ++k) expand_run<B>(srow + k * ai, masks, s.in, drow + k * s.in);
    return;
  }
  // Zero the row, then write its alive entries: a memset plus a sparse pass.
  std::memset(drow, 0, s.in * s.taps * sizeof(B));
  if (srow == nullptr) return;
  if (s.in_runs()) {
    for (int64_t k = 0; k < s.taps; ++k)
      for (int64_t i = 0; i < ai; ++i) drow[k * s.in + ip[i]] = srow[k * ai + i];
  } else {
    for (int64_t i = 0; i < ai; ++i)
      for (int64_t k = 0; k < s.taps; ++k) drow[ip[i] * s.taps + k] = srow[i * s.taps + k];
  }
}

// Whether scatter rows go out with streaming stores: rows on the vector path (masks given, so 4- or
// 2-byte elements), runs of whole 16-element vectors (from a 64-byte aligned base, each run starts 64-byte
// aligned for 4-byte and 32-byte aligned for 2-byte elements, as the 512- and 256-bit stores need),
// and a gradient too large to stay in cache, where writing through the cache would first read every
// line and evict the operands of the GEMMs around it.
bool streams(const WeightShape& s, const Tensor& out, const uint16_t* masks) {
  constexpr int64_t kMinStreamBytes = int64_t(1) << 20;
  return masks != nullptr && s.in_runs() && s.in % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 == 0 && out.nbytes() >= size_t(kMinStreamBytes);
}

// Starts loading the next alive row while the current one is gathered. Alive rows sit apart in the
// full-size weight, and a linear layer's row is often one 4 KiB page, where the hardware prefetchers
// stop: without this each row began with a round trip to memory (a gather of half of a 1024x1024
// weight took 1.7x as long).
inline void prefetch_lines(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

int64_t row_grain(const WeightShape& s) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.in * s.taps)); }

Tensor gather_into(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out, bool scratch) {
  const WeightShape s = weight_shape(weight);
  const auto fmt = format_of(weight);
  const Tensor src = weight.contiguous(fmt);
  const int64_t ai = alive_in.numel(), ao = alive_out.numel();
  auto sizes = weight.sizes().vec();
  sizes[0] = ao;
  sizes[1] = ai;
  Tensor out = scratch ? scratch_tensor(sizes, weight.options(), fmt) : at::empty(sizes, weight.options().memory_format(fmt));
  const Tensor in_idx = alive_in.contiguous(), out_idx = alive_out.contiguous();
  const int64_t* ip = in_idx.data_ptr<int64_t>();
  const int64_t* op = out_idx.data_ptr<int64_t>();
  const std::vector<uint16_t> masks = vector_masks(s, weight.element_size(), alive_in);
  const uint16_t* mp = masks.empty() ? nullptr : masks.data();
  with_bits(weight, [&](auto bits) {
    using B = decltype(bits);
    const B* sp = static_cast<const B*>(src.data_ptr());
    B* dp = static_cast<B*>(out.data_ptr());
    at::parallel_for(0, ao, row_grain(s), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        if (o + 1 < e) prefetch_lines(sp + op[o + 1] * s.in * s.taps, s.in * s.taps * int64_t(sizeof(B)));
        gather_row<B>(s, ip, ai, mp, sp + op[o] * s.in * s.taps, dp + o * ai * s.taps);
      }
    });
  });
  return out;
}

// The weight's identity and version counter stand for its contents, as for autograd's saved
// tensors; holding the weight keeps its identity from passing to a new tensor.
// The weight is held weakly: a forward that gets no backward must not keep its layer's weight alive
// until the entry is evicted. The weak reference keeps the TensorImpl's address from being reused, so
// comparing addresses cannot match a new tensor to a dead one.
struct WeightKey {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
  const c10::TensorImpl* impl = nullptr;
  int64_t version = 0;
  const void* data = nullptr;
  std::vector<int64_t> alive_in, alive_out;
  bool operator==(const WeightKey& o) const {
    return impl == o.impl && version == o.version && data == o.data && alive_in == o.alive_in &&
           alive_out == o.alive_out;
  }
};

WeightKey weight_key(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  return {c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(weight.getIntrusivePtr()),
          weight.unsafeGetTensorImpl(), weight._version(), weight.data_ptr(), index_list(alive_in),
          index_list(alive_out)};
}

KeptForBackward<WeightKey>& kept_weights() {
  static KeptForBackward<WeightKey> kept;
  return kept;
}

bool all_alive(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  const WeightShape s = weight_shape(weight);
  return is_full(alive_in, s.in) && is_full(alive_out, s.out);
}

}  // namespace

Tensor gather_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out, Pass pass) {
  if (all_alive(weight, alive_in, alive_out)) return weight;
  if (pass == Pass::kAlone || weight.is_inference()) return gather_into(weight, alive_in, alive_out, true);
  WeightKey key = weight_key(weight, alive_in, alive_out);
  if (pass == Pass::kBackward) {
    Tensor kept = kept_weights().take(key);
    return kept.defined() ? kept : gather_into(weight, alive_in, alive_out, true);
  }
  Tensor out = gather_into(weight, alive_in, alive_out, false);
  kept_weights().put(std::move(key), out);
  return out;
}

void release_weight(const Tensor& weight, const Tensor& alive_in, const Tensor& alive_out) {
  if (!all_alive(weight, alive_in, alive_out)) kept_weights().take(weight_key(weight, alive_in, alive_out));
}

Tensor scatter_weight(const Tensor& compact, const Tensor& full_like, const Tensor& alive_in,
                      const Tensor& alive_out) {
  const WeightShape s = weight_shape(full_like);
  const auto fmt = format_of(full_like);
  const Tensor src = compact.to(full_like.scalar_type()).contiguous(fmt);
  if (all_alive(full_like, alive_in, alive_out)) return src;
  Tensor out = gradient_buffers().take(full_like.sizes(), full_like.options(), fmt);
  const std::vector<int64_t> inv_out = inverse_index(alive_out, s.out);
  const Tensor in_idx = alive_in.contiguous();
  const int64_t* ip = in_idx.data_ptr<int64_t>();
  const int64_t ai = alive_in.numel();
  const std::vector<uint16_t> masks = vector_masks(s, out.element_size(), alive_in);
  const uint16_t* mp = masks.empty() ? nullptr : masks.data();
  with_bits(out, [&](auto bits) {
    using B = decltype(bits);
    const B* sp = static_cast<const B*>(src.data_ptr());
    B* dp = static_cast<B*>(out.data_ptr());
    const bool stream = streams(s, out, mp);
    at::parallel_for(0, s.out, row_grain(s), [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const B* srow = inv_out[o] >= 0 ? sp + inv_out[o] * ai * s.taps : nullptr;
        scatter_row<B>(s, ip, ai, mp, srow, dp + o * s.in * s.taps, stream);
      }
      if (stream) stream_fence();
    });
  });
  return out;
}

void release_cached_memory() {
  auto& cached = scratch_cache();
  cached.erase(std::remove_if(cached.begin(), cached.end(), [](const at::Storage& st) { return st.use_count() == 1; }),
               cached.end());
  gradient_buffers().release_free();
  kept_weights().clear();
  release_kept_gates();
}

// These two run between large passes, when ATen's generic paths (index_select, TensorIterator
// copies) have dropped out of the caches: a plain loop costs a fraction of their first call.
Tensor gather_vector(const Tensor& v, const Tensor& alive) {
  if (is_full(alive, v.size(0))) return v;
  const Tensor src = v.contiguous(), idx = alive.contiguous();
  Tensor out = at::empty({idx.numel()}, v.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  with_bits(out, [&](auto bits) {
    using B = decltype(bits);
    const B* sp = static_cast<const B*>(src.data_ptr());
    B* dp = static_cast<B*>(out.data_ptr());
    for (int64_t k = 0; k < idx.numel(); ++k) dp[k] = sp[ip[k]];
  });
  return out;
}

Tensor scatter_vector(const Tensor& values, const Tensor& alive, int64_t full, at::ScalarType dtype) {
  const Tensor v = values.contiguous(), idx = alive.contiguous();
  TORCH_INTERNAL_ASSERT(v.numel() == idx.numel(), "cadk scatter_vector: ", v.numel(), " values for ",
                        idx.numel(), " alive indices");
  const bool all = is_full(alive, full);
  const auto options = v.options().dtype(dtype);
  Tensor out = all ? at::empty({full}, options) : at::zeros({full}, options);
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "cadk_scatter_vector", [&] {
    const scalar_t* sp = v.data_ptr<scalar_t>();
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cadk_scatter_vector", [&] {
      scalar_t* dp = out.data_ptr<scalar_t>();
      for (int64_t k = 0; k < idx.numel(); ++k) dp[all ? k : ip[k]] = static_cast<scalar_t>(src_t(sp[k]));
    });
  });
  return out;
}

Tensor no_grad_like(const Tensor& t) { return at::empty({0}, t.options()); }

}  // namespace cadk::cpu
