// The CPU sampler's row loop: one token per row from probabilities the caller computed.
//
// engine/runtime/sampler.py computes, with torch, scaled = logits / temperature, logprobs =
// log_softmax(scaled) and probs = exp(logprobs) (three vectorised passes), and hands them here
// with each row's parameters. This loop does the rest of `sample` in one pass per row and no
// allocation per element: greedy argmax, the inverse CDF of uncut rows, and the top-k / top-p
// cut of the others, on a partial sort of only the tokens the cut can keep.
//
// Contract: the same token and log-prob, bit for bit, as the torch path of `sample` on a CPU
// (its full-sort semantics; ties by ascending index). Every sum below is a float64 running
// sum in a stated order, because torch's cumsum on a CPU is that exact sequential sum:
//   * total  = sum of probs[j] for j = 0 .. V-1 (vocabulary order);
//   * order  = tokens by descending prob, ties by ascending id;
//   * k      = top_k when 0 < top_k < V, else V; a row cuts when top_p < 1 or k < V;
//   * denom  = k < V ? sum of the first k probs in order : total;
//   * w[i]   = probs[order[i]] / denom for i < k; cum[i] = w[0] + ... + w[i];
//   * token i is kept when cum[i - 1] < top_p (cum[-1] = 0): the smallest prefix whose mass
//     reaches top_p, so the most likely token always is;
//   * draw   = the first i whose running sum of kept weights reaches u * (their total); an
//     uncut row draws the same way over probs in vocabulary order.
// Greedy rows take the first maximum of the raw logits (a NaN counts as the maximum, as in
// torch.argmax). A sampled row whose probs are not finite gets token -1: the caller raises.
#pragma once

#include <cstdint>

namespace engine {

struct SampleRowsArgs {
  int64_t rows = 0, vocab = 0;
  const float* logits = nullptr;    // [rows, vocab] raw logits (greedy rows' argmax); may be null if no row is greedy
  const float* probs = nullptr;     // [rows, vocab] exp(log_softmax(logits / T)); null when every row is greedy
  const float* logprobs = nullptr;  // [rows, vocab] log_softmax(logits / T); null when no log-prob is wanted
  const float* top_p = nullptr;     // [rows] in (0, 1]
  const int64_t* top_k = nullptr;   // [rows], 0 = no top-k cut
  const double* uniform = nullptr;  // [rows] in (0, 1]
  const uint8_t* greedy = nullptr;  // [rows] 1 = greedy; null = no greedy row
  int64_t* tokens = nullptr;        // out [rows]: the token, -1 for a sampled row whose probs are not finite
  double* chosen_logprobs = nullptr;  // out [rows] when logprobs is given: logprobs[row, token] (NaN for -1)
};

// Fills args.tokens (and args.chosen_logprobs). Thread-safe; touches only its arguments.
void sample_rows(const SampleRowsArgs& args);

}  // namespace engine
