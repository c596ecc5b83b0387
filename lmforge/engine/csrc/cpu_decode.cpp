// One engine step of a Llama-family model on CPU over the paged KV cache: each row is one new token of
// some sequence (a decoding sequence's one token, or a token of a short prompt chunk), at its position,
// written to its slot, attending to its sequence's keys up to itself. engine/cpu_decode.py drives it.
// Rows of one chunk are causal without a mask: at every layer all rows' keys and values are written
// before any row attends, and row r reads only positions <= its own.
//
// Why C++: at serving sizes a decode step is a few hundred small ops, and on CPU PyTorch's eager
// dispatch of each (Python binding, dispatcher, a fresh output tensor) costs more than its maths.
// Here the matmuls stay ATen calls (MKL/oneDNN, into buffers kept between steps) and everything
// between them is one pass of plain loops: RMSNorm, QK-norm, rotary, the cache write, paged
// attention straight off the block table (no gather into a padded batch), SwiGLU, the residuals.
//
// Numerics follow model.py in fp32: RMSNorm as weight * (x * rsqrt(mean(x^2) + eps)), rotary in
// the "rotate half" layout, softmax attention scaled by 1/sqrt(Hd) over keys max(0, n - window) ..
// n - 1. Sums run in a different order than PyTorch's kernels, so results agree to ~1e-5, not bitwise
// (the tests allow 1e-4 for logits and cached keys/values).
//
// Shape legend: B rows (new tokens), S sequences, R rows wanting logits, D hidden, H query heads,
// K key/value heads, G = H / K, Hd head_dim, I intermediate, V vocab, L layers; pools are (L, slots, K, Hd)
// with slot = block * block_size + offset.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstring>
#include <optional>
#include <vector>

namespace {

using OptTensor = std::optional<at::Tensor>;

// The attention scores' dot products (n = head_dim): with AVX-512 or AVX2 the lanes are summed by
// shuffles; the compiler's own reduction spilled them to the stack and added them one by one.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (i = 16; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (n >= 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
    for (i = 8; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    s = _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  }
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// e^x in a form the compiler vectorises (libm's expf is a call per element): e^x = 2^n e^r with
// n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for precision, Cody & Waite), e^r by Cephes'
// expf polynomial; about 1 ulp on the range used here, which is what PyTorch's vectorised exp gives.
inline float exp_approx(float x) {
  x = std::min(88.7f, std::max(-87.3f, x));  // e^x stays a normal float
  const float t = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.f ? 0.5f : -0.5f));
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// out = w * (x * rsqrt(mean(x^2) + eps)), one row of n.
inline void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / n + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in place on one head of 2 * half.
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// y (B, N) = x (B, Din) @ w (N, Din)^T + b
void linear(const at::Tensor& x, const at::Tensor& w, const OptTensor& b, at::Tensor& y) {
  if (b) at::addmm_out(y, *b, x, w.t());
  else at::mm_out(y, x, w.t());
}

struct Layer {
  at::Tensor input_norm, qkv_w, o_w, post_norm, gate_up_w, down_w;
  OptTensor qkv_b, q_norm, k_norm, o_b, gate_up_b, down_b;
};

class CpuDecoder {
 public:
  CpuDecoder(at::Tensor embed, at::Tensor norm, at::Tensor lm_head, at::Tensor cos, at::Tensor sin,
             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double eps,
             int64_t window)
      : embed_(embed), norm_(norm), lm_head_(lm_head), cos_(cos), sin_(sin), H_(num_heads), K_(num_kv_heads),
        Hd_(head_dim), I_(intermediate), eps_(static_cast<float>(eps)), window_(window) {
    D_ = embed.size(1);
  }

  void add_layer(at::Tensor input_norm, at::Tensor qkv_w, OptTensor qkv_b, OptTensor q_norm, OptTensor k_norm,
                 at::Tensor o_w, OptTensor o_b, at::Tensor post_norm, at::Tensor gate_up_w, OptTensor gate_up_b,
                 at::Tensor down_w, OptTensor down_b) {
    layers_.push_back({input_norm, qkv_w, o_w, post_norm, gate_up_w, down_w, qkv_b, q_norm, k_norm, o_b, gate_up_b,
                       down_b});
  }

  // tokens (B,) new token ids at positions (B,), of sequences seqs (B,) whose blocks are tables (S, W)
  // (padding past a sequence's length is never read); slots (B,) where each new key/value goes; logit_rows
  // (R,) the rows whose logits are wanted. k_pool, v_pool (L, slots, K, Hd) are written in place.
  // Returns logits (R, V).
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& seqs,
                  const at::Tensor& tables, const at::Tensor& slots, const at::Tensor& logit_rows,
                  at::Tensor& k_pool, at::Tensor& v_pool, int64_t block_size) {
    pybind11::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    const int64_t B = tokens.size(0), D = D_, H = H_, K = K_, Hd = Hd_, half = Hd_ / 2;
    const int64_t qkv_width = (H + 2 * K) * Hd, width = tables.size(1), num_slots = k_pool.size(1);
    reserve(B);
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* seq = seqs.data_ptr<int64_t>();
    const int64_t* tab = tables.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    float* x = x_.data_ptr<float>();
    float* h = h_.data_ptr<float>();
    const float* emb = embed_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < embed_.size(0), "cpu_decode: token id ", tok[b], " out of range");
      std::copy_n(emb + tok[b] * D, D, x + b * D);
    }

    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      const float* w_in = L.input_norm.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) rms_norm(x + b * D, w_in, eps_, D, h + b * D);
      linear(h_, L.qkv_w, L.qkv_b, qkv_);  // (B, (H + 2K) Hd): q heads, then k heads, then v heads

      // QK-norm and rotary on every head, and the new key/value into the pool.
      float* qkv = qkv_.data_ptr<float>();
      float* kp = k_pool[l].data_ptr<float>();
      float* vp = v_pool[l].data_ptr<float>();
      const float* qn = L.q_norm ? L.q_norm->data_ptr<float>() : nullptr;
      const float* kn = L.k_norm ? L.k_norm->data_ptr<float>() : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkv + b * qkv_width;
        const float* c = cos_.data_ptr<float>() + pos[b] * half;
        const float* s = sin_.data_ptr<float>() + pos[b] * half;
        for (int64_t head = 0; head < H + K; ++head) {
          float* v = row + head * Hd;
          const float* w = head < H ? qn : kn;
          if (w) rms_norm(v, w, eps_, Hd, v);
          rotate(v, c, s, half);
        }
        TORCH_CHECK(slot[b] >= 0 && slot[b] < num_slots, "cpu_decode: slot out of range");
        std::copy_n(row + H * Hd, K * Hd, kp + slot[b] * K * Hd);
        std::copy_n(row + (H + K) * Hd, K * Hd, vp + slot[b] * K * Hd);
      }

      attend(B, qkv, kp, vp, pos, seq, tab, width, block_size);
      linear(attn_, L.o_w, L.o_b, h_);
      x_.add_(h_);

      const float* w_post = L.post_norm.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) rms_norm(x + b * D, w_post, eps_, D, h + b * D);
      linear(h_, L.gate_up_w, L.gate_up_b, gate_up_);  // (B, 2I): gate, then up
      const float* gu = gate_up_.data_ptr<float>();
      float* act = act_.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        const float* g = gu + b * 2 * I_;
        const float* u = g + I_;
        float* a = act + b * I_;
#pragma omp simd
        for (int64_t i = 0; i < I_; ++i) a[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];  // SwiGLU: silu(g) * u
      }
      linear(act_, L.down_w, L.down_b, h_);
      x_.add_(h_);
    }
    const int64_t R = logit_rows.size(0);
    const int64_t* rows = logit_rows.data_ptr<int64_t>();
    const float* w_norm = norm_.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) rms_norm(x + rows[r] * D, w_norm, eps_, D, h + r * D);
    return at::mm(h_.narrow(0, 0, R), lm_head_.t());  // (R, V), a fresh tensor: the caller keeps it
  }

 private:
  // The step's buffers as (B, ...) views of ones kept between steps, grown when a step needs more rows.
  void reserve(int64_t B) {
    if (!store_[0].defined() || store_[0].size(0) < B) {
      auto f = at::TensorOptions().dtype(at::kFloat);
      const int64_t n = std::max<int64_t>(B, 2 * (store_[0].defined() ? store_[0].size(0) : 0));
      const int64_t widths[6] = {D_, D_, (H_ + 2 * K_) * Hd_, H_ * Hd_, 2 * I_, I_};
      for (int i = 0; i < 6; ++i) store_[i] = at::empty({n, widths[i]}, f);
    }
    at::Tensor* views[6] = {&x_, &h_, &qkv_, &attn_, &gate_up_, &act_};
    for (int i = 0; i < 6; ++i) *views[i] = store_[i].narrow(0, 0, B);
  }

  // attn_ (B, H Hd): each query head over its sequence's cached keys, read through the block table.
  // One task per row walks its sequence's blocks in order: a block's slots are adjacent, each slot holding
  // all K heads (K Hd floats), so the reads are sequential within a block. Walking one key/value head at a
  // time over the same slots (strided reads) took twice as long at 32 sequences; prefetching the next
  // block by hand gained nothing measurable (the pool sits on huge pages, see model_runner._pool).
  void attend(int64_t B, const float* qkv, const float* kp, const float* vp, const int64_t* pos,
              const int64_t* seq, const int64_t* tab, int64_t width, int64_t block_size) {
    // The common head sizes compiled as constants: the dot products unroll, and each head's output
    // sums stay in registers over a block's values instead of going through memory at every slot.
    switch (Hd_) {
      case 32: return attend_heads<32>(B, qkv, kp, vp, pos, seq, tab, width, block_size);
      case 64: return attend_heads<64>(B, qkv, kp, vp, pos, seq, tab, width, block_size);
      case 128: return attend_heads<128>(B, qkv, kp, vp, pos, seq, tab, width, block_size);
      default: return attend_heads<0>(B, qkv, kp, vp, pos, seq, tab, width, block_size);
    }
  }

  template <int64_t HD>  // head_dim, or 0: Hd_ at run time
  void attend_heads(int64_t B, const float* qkv, const float* kp, const float* vp, const int64_t* pos,
                    const int64_t* seq, const int64_t* tab, int64_t width, int64_t block_size) {
    const int64_t H = H_, K = K_, Hd = HD ? HD : Hd_, G = H_ / K_;
    const int64_t qkv_width = (H_ + 2 * K_) * Hd, stride = K_ * Hd;
    const float scale = 1.f / std::sqrt(static_cast<float>(Hd));
    float* out = attn_.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;  // (H, span)
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = pos[b] + 1, first = window_ > 0 ? std::max<int64_t>(0, n - window_) : 0, span = n - first;
        const int64_t* table = tab + seq[b] * width;
        const float* q = qkv + b * qkv_width;  // (H, Hd); query head h reads key/value head h / G
        float* o = out + b * H * Hd;  // (H, Hd)
        scores.resize(H * span);
        // Calls f(j, slot, count) for each run of count adjacent slots (a block's part in first .. n-1),
        // slot pointing at the first one's K Hd floats, j its index from first.
        auto walk = [&](const float* pool, auto&& f) {
          for (int64_t j = first; j < n;) {
            const int64_t block = j / block_size, offset = j % block_size;
            const int64_t count = std::min(n, (block + 1) * block_size) - j;
            f(j - first, pool + (table[block] * block_size + offset) * stride, count);
            j += count;
          }
        };
        walk(kp, [&](int64_t j, const float* key, int64_t count) {
          for (int64_t t = 0; t < count; ++t, key += stride)
            for (int64_t h = 0; h < H; ++h)
              scores[h * span + j + t] = dot(q + h * Hd, key + (h / G) * Hd, Hd) * scale;
        });
        for (int64_t h = 0; h < H; ++h) {  // softmax over each head's row
          float* sc = scores.data() + h * span;
          float m = sc[0];
          for (int64_t j = 1; j < span; ++j) m = std::max(m, sc[j]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < span; ++j) {
            sc[j] = exp_approx(sc[j] - m);
            sum += sc[j];
          }
          const float inv = 1.f / sum;
#pragma omp simd
          for (int64_t j = 0; j < span; ++j) sc[j] *= inv;
        }
        std::fill_n(o, H * Hd, 0.f);
        // Per head, a run's values summed into a local array: with HD a constant it lives in registers.
        walk(vp, [&](int64_t j, const float* val, int64_t count) {
          for (int64_t h = 0; h < H; ++h) {
            const float* p = scores.data() + h * span + j;
            const float* v = val + (h / G) * Hd;
            float* oh = o + h * Hd;
            if constexpr (HD > 0) {
              float acc[HD];
#pragma omp simd
              for (int64_t i = 0; i < HD; ++i) acc[i] = oh[i];
              for (int64_t t = 0; t < count; ++t, v += stride) {
                const float pt = p[t];
#pragma omp simd
                for (int64_t i = 0; i < HD; ++i) acc[i] += pt * v[i];
              }
#pragma omp simd
              for (int64_t i = 0; i < HD; ++i) oh[i] = acc[i];
            } else {
              for (int64_t t = 0; t < count; ++t, v += stride) {
                const float pt = p[t];
#pragma omp simd
                for (int64_t i = 0; i < Hd; ++i) oh[i] += pt * v[i];
              }
            }
          }
        });
      }
    });
  }

  at::Tensor embed_, norm_, lm_head_, cos_, sin_;
  int64_t H_, K_, Hd_, I_, D_;
  float eps_;
  int64_t window_;  // 0: none
  std::vector<Layer> layers_;
  at::Tensor store_[6];  // the buffers below, kept between steps (a fresh tensor's pages fault in anew)
  at::Tensor x_, h_, qkv_, attn_, gate_up_, act_;  // this step's (B, ...) views
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<CpuDecoder>(m, "CpuDecoder")
      .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t,
                          int64_t, double, int64_t>())
      .def("add_layer", &CpuDecoder::add_layer)
      .def("step", &CpuDecoder::step);
}
