// The CPU sampler's row loop (see sampler.h for the contract it shares with the torch path).
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace engine {
namespace {

// A float's biased exponent: probs in [0, 1] fall in 128 buckets, 2^(e - 127) <= p < 2^(e - 126),
// which order as the probs do.
constexpr int kBuckets = 256;

inline uint32_t float_bits(float p) {
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  return bits;
}

// A token's sort key: ascending keys = descending probability, then ascending id. probs >= 0,
// whose float bits order as the values do, and ids < 2^32, so the keys are unique.
inline uint64_t sort_key(float p, int64_t id) {
  return (static_cast<uint64_t>(0xFFFFFFFFu - float_bits(p)) << 32) | static_cast<uint64_t>(id);
}

inline int64_t key_id(uint64_t key) { return static_cast<int64_t>(key & 0xFFFFFFFFu); }

// The first maximum; a NaN is the maximum (its first occurrence), as torch.argmax has it.
int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > x[best]) best = j;
  }
  return best;
}

// The first index whose running float64 sum of w reaches target, or -1 (target past the sum: NaN).
int64_t first_reaching(const float* w, int64_t n, double target) {
  double cdf = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    cdf += static_cast<double>(w[j]);
    if (cdf >= target) return j;
  }
  return -1;
}

// Scratch reused across rows.
struct Scratch {
  std::vector<uint64_t> keys;  // [vocab]: the collected tokens' keys
  std::vector<double> cum;     // [vocab]: running sums of the kept weights
  double mass[2][kBuckets];    // two interleaved histograms: half the dependency chain on a bucket
  int64_t count[2][kBuckets];
};

// The keys of every token whose bucket is >= `lowest` (every token for 0), in vocabulary order.
int64_t collect(const float* p, int64_t vocab, int lowest, uint64_t* keys) {
  const uint32_t floor_bits = static_cast<uint32_t>(lowest) << 23;
  int64_t n = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    if (float_bits(p[j]) >= floor_bits) keys[n++] = sort_key(p[j], j);
  }
  return n;
}

// A row with a top-k and/or top-p cut: its token, drawn at u (sampler.h has the definition);
// -1 when the row's probs are not finite.
//
// Only the tokens the cut can reach are sorted. One pass sums the row's mass and count per
// exponent bucket; walking the buckets from the top gives the lowest bucket that the k most
// likely tokens, or a mass past top_p, need, and only tokens from there up are sorted. The
// buckets' sums are in another order than the definition's, so the top-p bound has a margin,
// and a row whose kept prefix still runs past the collected tokens is redone with all of them.
int64_t sample_cut_row(const float* p, int64_t vocab, int64_t k, float top_p, double u, Scratch& s) {
  std::fill(&s.mass[0][0], &s.mass[0][0] + 2 * kBuckets, 0.0);
  std::fill(&s.count[0][0], &s.count[0][0] + 2 * kBuckets, 0);
  double total = 0.0;  // in vocabulary order, as the definition has it
  for (int64_t j = 0; j < vocab; ++j) {
    const double pj = static_cast<double>(p[j]);
    const int e = static_cast<int>((float_bits(p[j]) >> 23) & 0xFF);  // (a NaN may carry the sign bit)
    total += pj;
    s.mass[j & 1][e] += pj;
    s.count[j & 1][e] += 1;
  }
  if (!(std::isfinite(total) && total > 0)) return -1;  // NaN probs (non-finite logits), or no mass at all
  const double limit = static_cast<double>(top_p);
  int lowest = kBuckets - 1;
  double mass = 0.0;
  int64_t count = 0;
  for (; lowest > 0; --lowest) {
    mass += s.mass[0][lowest] + s.mass[1][lowest];
    count += s.count[0][lowest] + s.count[1][lowest];
    // enough tokens for the top-k cut, and (without one) enough mass for top-p. The margin, far
    // above the rounding of either order's sum, only keeps the re-collect below rare; that
    // fallback is what makes the result exact.
    if (count >= k || (k == vocab && mass >= (limit + 1e-6) * total)) break;
  }
  uint64_t* keys = s.keys.data();
  for (;;) {
    const int64_t n = collect(p, vocab, lowest, keys);
    int64_t sorted = n;
    if (k < n) {  // the k most likely of the collected tokens, then in order
      std::nth_element(keys, keys + k, keys + n);
      sorted = k;
    }
    if (!std::is_sorted(keys, keys + sorted)) std::sort(keys, keys + sorted);
    double denom = total;
    if (k < vocab) {
      denom = 0.0;
      for (int64_t i = 0; i < k; ++i) denom += static_cast<double>(p[key_id(keys[i])]);
    }
    double running = 0.0;
    int64_t kept = 0;  // tokens kept: the mass before each is below top_p
    while (kept < sorted && running < limit) {
      running += static_cast<double>(p[key_id(keys[kept])]) / denom;
      s.cum[kept++] = running;
    }
    if (kept == n && running < limit && kept < k && n < vocab) {
      lowest = 0;  // the prefix runs past the collected tokens: all of them
      continue;
    }
    if (kept == 0) return -1;  // top_p <= 0 or NaN (SamplingParams rules both out): nothing to draw
    const double target = u * s.cum[kept - 1];
    const int64_t i = std::lower_bound(s.cum.begin(), s.cum.begin() + kept, target) - s.cum.begin();
    return key_id(keys[std::min(i, kept - 1)]);
  }
}

}  // namespace

void sample_rows(const SampleRowsArgs& a) {
  const int64_t V = a.vocab;
  Scratch scratch;
  for (int64_t r = 0; r < a.rows; ++r) {
    int64_t token;
    if (a.greedy != nullptr && a.greedy[r]) {
      token = argmax(a.logits + r * V, V);
    } else {
      const float* p = a.probs + r * V;
      const int64_t k = (a.top_k[r] > 0 && a.top_k[r] < V) ? a.top_k[r] : V;
      if (a.top_p[r] < 1.0f || k < V) {
        if (scratch.keys.empty()) {
          scratch.keys.resize(V);
          scratch.cum.resize(V);
        }
        token = sample_cut_row(p, V, k, a.top_p[r], a.uniform[r], scratch);
      } else {
        double total = 0.0;
        for (int64_t j = 0; j < V; ++j) total += static_cast<double>(p[j]);
        // NaN probs (the logits were not finite), or no mass at all: -1
        token = std::isfinite(total) && total > 0 ? first_reaching(p, V, a.uniform[r] * total) : -1;
      }
    }
    a.tokens[r] = token;
    if (a.chosen_logprobs != nullptr) {
      a.chosen_logprobs[r] = token >= 0 ? static_cast<double>(a.logprobs[r * V + token])
                                        : std::numeric_limits<double>::quiet_NaN();
    }
  }
}

}  // namespace engine
