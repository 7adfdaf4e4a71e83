// Hybrid training objective (NorMistral-11b-warm, arXiv 2412.06484): per-sample mode (causal LM
// or masked next-token prediction) and span masking / corruption of a masked sample.
//
// Specified in megatron_normistral/data/objective.py (module docstring, "Definitions"); the
// numpy reference there (backend="reference") is what this must equal bit for bit, and the
// tests compare them. Randomness and bounded draws: helpers.h (bounded32 here). Thresholds and
// the mask-rate fraction arrive as integers computed once in Python, for both backends.
#include <pybind11/numpy.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "helpers.h"

namespace py = pybind11;

namespace normistral {
namespace {

// Stream salts: keep in sync with objective.py (_SALT_*).
constexpr uint64_t SALT_MODE = 0x6D6F64655F736C74ULL;    // "mode_slt"
constexpr uint64_t SALT_SPAN = 0x7370616E5F6C656EULL;    // "span_len"
constexpr uint64_t SALT_ORDER = 0x6F726465725F6679ULL;   // "order_fy"
constexpr uint64_t SALT_ACTION = 0x616374696F6E5F75ULL;  // "action_u"
constexpr uint64_t SALT_RANDOM = 0x72616E645F746F6BULL;  // "rand_tok"

py::array_t<bool> sample_modes(uint64_t seed, I64 indices, uint64_t threshold) {
    auto in = indices.unchecked<1>();
    const py::ssize_t n = in.shape(0);
    py::array_t<bool> out(n);
    bool* o = out.mutable_data();
    for (py::ssize_t i = 0; i < n; ++i) {
        if (in(i) < 0) throw std::invalid_argument("objective_sample_modes: negative global index");
        o[i] = (draw(key_path(seed, (uint64_t)in(i), SALT_MODE), 0) >> 11) < threshold;
    }
    return out;
}

struct Span {
    int64_t start;
    int64_t len;
};

// Corrupts x (n = s+1 tokens) into out; chosen[j] = 1 for the chosen positions. Returns nothing
// but may throw on invalid token ids.
void corrupt_one(const int64_t* x, int64_t n, uint64_t key, int64_t num_special, int64_t max_span,
                 int64_t rate_num, int64_t rate_den, uint64_t thr_mask, uint64_t thr_random, int64_t mask_id,
                 int64_t vocab_size, int64_t* out, bool* chosen, std::vector<Span>& spans) {
    bool bad = false;
    for (int64_t j = 0; j < n; ++j) bad |= (x[j] < 0) | (x[j] >= vocab_size);  // vectorisable
    if (bad) {
        for (int64_t j = 0; j < n; ++j)
            if (x[j] < 0 || x[j] >= vocab_size)
                throw std::invalid_argument("objective_corrupt: token id " + std::to_string(x[j]) +
                                            " at position " + std::to_string(j) + " outside [0, vocab_size=" +
                                            std::to_string(vocab_size) + ")");
    }
    std::memcpy(out, x, sizeof(int64_t) * (size_t)n);
    std::memset(chosen, 0, sizeof(bool) * (size_t)n);
    // Spans over the maskable label positions 1..n-1.
    const uint64_t ks_span = derive_key(key, SALT_SPAN);
    spans.clear();
    int64_t L = 0;
    uint64_t k = 0;
    int64_t j = 1;
    while (j < n) {
        if (x[j] < num_special) {
            ++j;
            continue;
        }
        int64_t run_end = j;
        while (run_end < n && x[run_end] >= num_special) ++run_end;
        L += run_end - j;
        while (j < run_end) {
            int64_t len = 1 + (int64_t)bounded32(draw(ks_span, k++), (uint64_t)max_span);
            if (len > run_end - j) len = run_end - j;
            spans.push_back({j, len});
            j += len;
        }
    }
    const int64_t target = (int64_t)((__int128)L * rate_num / rate_den);
    if (target <= 0) return;

    const uint64_t ks_order = derive_key(key, SALT_ORDER);
    const uint64_t ks_action = derive_key(key, SALT_ACTION);
    const uint64_t ks_random = derive_key(key, SALT_RANDOM);
    const uint64_t n_rand = (uint64_t)(vocab_size - num_special);
    // Shuffle span indices (the index keys the span's action draw).
    const int64_t ns = (int64_t)spans.size();
    thread_local std::vector<int32_t> order;
    order.resize(ns);
    for (int64_t i = 0; i < ns; ++i) order[i] = (int32_t)i;
    int64_t got = 0;
    for (int64_t t = 0; t < ns && got < target; ++t) {
        const int64_t r = t + (int64_t)bounded32(draw(ks_order, (uint64_t)t), (uint64_t)(ns - t));
        std::swap(order[t], order[r]);
        const int32_t si = order[t];
        const Span sp = spans[si];
        int64_t take = sp.len;
        if (take > target - got) take = target - got;
        got += take;
        const uint64_t u = draw(ks_action, (uint64_t)si) >> 11;
        for (int64_t p = sp.start; p < sp.start + take; ++p) {
            chosen[p] = true;
            if (u < thr_mask)
                out[p] = mask_id;
            else if (u < thr_random)
                out[p] = num_special + (int64_t)bounded32(draw(ks_random, (uint64_t)p), n_rand);
        }
    }
}

py::tuple corrupt(I64 tokens, int64_t global_index, uint64_t seed, int64_t num_special, int64_t max_span,
                  int64_t rate_num, int64_t rate_den, uint64_t thr_mask, uint64_t thr_random, int64_t mask_id,
                  int64_t vocab_size) {
    if (tokens.ndim() != 1) throw std::invalid_argument("objective_corrupt: tokens must be 1-D");
    if (global_index < 0) throw std::invalid_argument("objective_corrupt: negative global index");
    if (max_span < 1 || max_span >= (int64_t(1) << 31)) throw std::invalid_argument("objective_corrupt: bad max_span");
    if (rate_num < 0 || rate_den <= 0 || rate_num > rate_den)
        throw std::invalid_argument("objective_corrupt: rate must be in [0, 1]");
    if (num_special < 0 || vocab_size <= num_special || vocab_size - num_special >= (int64_t(1) << 32))
        throw std::invalid_argument("objective_corrupt: need 0 <= num_special < vocab_size");
    if (mask_id < 0 || mask_id >= vocab_size) throw std::invalid_argument("objective_corrupt: mask_id outside vocab");
    const int64_t n = tokens.shape(0);
    if (n >= (int64_t(1) << 31)) throw std::invalid_argument("objective_corrupt: sample too long");
    py::array_t<int64_t> out(n);
    py::array_t<bool> chosen(n);
    const int64_t* x = tokens.data();
    int64_t* o = out.mutable_data();
    bool* c = chosen.mutable_data();
    {
        py::gil_scoped_release nogil;
        thread_local std::vector<Span> spans;
        corrupt_one(x, n, key_path(seed, (uint64_t)global_index), num_special, max_span, rate_num, rate_den,
                    thr_mask, thr_random, mask_id, vocab_size, o, c, spans);
    }
    return py::make_tuple(out, chosen);
}

}  // namespace

void register_objective(pybind11::module_& m) {
    m.def("objective_sample_modes", &sample_modes, py::arg("seed"), py::arg("global_indices"),
          py::arg("threshold"),
          "Per-sample mode of the hybrid objective: True = masked. threshold = round(p * 2^53).");
    m.def("objective_corrupt", &corrupt, py::arg("tokens"), py::arg("global_index"), py::arg("seed"),
          py::arg("num_special"), py::arg("max_span"), py::arg("rate_num"), py::arg("rate_den"),
          py::arg("thr_mask"), py::arg("thr_random"), py::arg("mask_id"), py::arg("vocab_size"),
          "Span masking of one sample (s+1 tokens): returns (corrupted int64 array, chosen bool array).");
}

}  // namespace normistral
