// Global-sample index of an upsampled corpus mixture: for each global sample of a mixture phase,
// out_corpus[g] is the corpus slot and out_window[g] the window of that corpus.
//
// Specified in megatron_normistral/data/mixture.py, by the docstrings of its Python reference
// (reference_mixture_index: which corpus, which window, a phase cut short;
// reference_epoch_permutation: the per-epoch shuffle), which this must equal bit for bit; the
// tests compare them. Randomness and bounded draws: helpers.h (bounded64 here).
#include <pybind11/numpy.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "helpers.h"

namespace py = pybind11;

namespace normistral {
namespace {

// Keep in sync with mixture.py (_BUCKET_SALT).
constexpr uint64_t BUCKET_SALT = 0xD1B54A32D192ED03ULL;

int bucket_bits(uint64_t n, uint64_t leaf) {
    int b = 0;
    while (b < 16 && (n >> b) > leaf) ++b;
    return b;
}

void fisher_yates(uint32_t* p, uint64_t s, uint64_t e, uint64_t key) {
    for (uint64_t t = s; t + 1 < e; ++t) {
        const uint64_t j = t + bounded64(draw(key, t), e - t);
        std::swap(p[t], p[j]);
    }
}

void epoch_permutation(std::vector<uint32_t>& out, std::vector<uint16_t>& tmp, uint64_t n, uint64_t key,
                       uint64_t leaf) {
    out.resize(n);
    const int b = bucket_bits(n, leaf);
    if (b == 0) {
        for (uint64_t i = 0; i < n; ++i) out[i] = (uint32_t)i;
        fisher_yates(out.data(), 0, n, key);
        return;
    }
    const uint64_t nb = 1ULL << b, bkey = derive_key(key, BUCKET_SALT);
    tmp.resize(n);
    std::vector<uint64_t> pos(nb + 1, 0);
    for (uint64_t i = 0; i < n; ++i) {
        const uint16_t k = (uint16_t)(draw(bkey, i) >> (64 - b));
        tmp[i] = k;
        ++pos[k + 1];
    }
    for (uint64_t k = 0; k < nb; ++k) pos[k + 1] += pos[k];
    std::vector<uint64_t> fill(pos.begin(), pos.end() - 1);
    for (uint64_t i = 0; i < n; ++i) out[fill[tmp[i]]++] = (uint32_t)i;  // stable: i ascending per bucket
    for (uint64_t k = 0; k < nb; ++k) fisher_yates(out.data(), pos[k], pos[k + 1], key);
}

py::array_t<uint32_t> py_epoch_permutation(uint64_t n, uint64_t seed, uint64_t slot, uint64_t epoch,
                                           uint64_t leaf) {
    if (n > 0xFFFFFFFFULL) throw py::value_error("more than 2^32 windows per epoch");
    if (leaf < 1) throw py::value_error("leaf must be >= 1");
    std::vector<uint32_t> p;
    std::vector<uint16_t> tmp;
    epoch_permutation(p, tmp, n, key_path(seed, slot, epoch), leaf);
    py::array_t<uint32_t> out((py::ssize_t)n);
    std::copy(p.begin(), p.end(), out.mutable_data());
    return out;
}

// Validated per-phase sample counts: N = sum(samples), and the deficits fit in int64.
int64_t phase_length(const I64& samples) {
    const py::ssize_t K = samples.size();
    if (K == 0 || K > 255) throw py::value_error("need 1..255 corpora");
    int64_t N = 0;
    for (py::ssize_t c = 0; c < K; ++c) {
        if (samples.data()[c] < 0) throw py::value_error("negative sample count");
        N += samples.data()[c];
    }
    // deficit = S[c]*(g+1) - count*N must fit in int64.
    if (N > 3000000000LL) throw py::value_error("more than 3e9 samples in one phase");
    return N;
}

// The corpus of each of the first n samples of a phase of N = sum(S) samples (which corpus):
// visit(g, corpus, samples that corpus already got) for g = 0 .. n-1; count[] ends as the counts.
template <class Visit>
void smooth_interleave(const int64_t* S, py::ssize_t K, int64_t N, int64_t n, std::vector<int64_t>& count,
                       Visit&& visit) {
    std::vector<int64_t> deficit(K, 0);
    count.assign(K, 0);
    for (int64_t g = 0; g < n; ++g) {
        // No "samples left" test needed: the deficits sum to N > 0 at every step, and an
        // exhausted corpus has deficit S*(g+1) - S*N <= 0, so it can never be the maximum.
        int best = 0;
        int64_t best_def = (deficit[0] += S[0]);
        for (py::ssize_t c = 1; c < K; ++c) {
            const int64_t d = (deficit[c] += S[c]);
            if (d > best_def) { best = (int)c; best_def = d; }
        }
        visit(g, best, count[best]);
        deficit[best] -= N;
        ++count[best];
    }
}

// The first out_corpus.size() (<= sum(samples)) samples of the phase.
void build_mixture_index(I64 samples, I64 start_counter, I64 windows_per_epoch, I64 slots, uint64_t seed,
                         py::array_t<uint8_t, py::array::c_style> out_corpus,
                         py::array_t<uint32_t, py::array::c_style> out_window, uint64_t leaf) {
    if (leaf < 1) throw py::value_error("leaf must be >= 1");
    const py::ssize_t K = samples.size();
    if (start_counter.size() != K || windows_per_epoch.size() != K || slots.size() != K)
        throw py::value_error("per-corpus arrays differ in length");
    const int64_t N = phase_length(samples);
    const int64_t* S = samples.data();
    const int64_t* C0 = start_counter.data();
    const int64_t* W = windows_per_epoch.data();
    const int64_t* slot = slots.data();
    for (py::ssize_t c = 0; c < K; ++c) {
        if (C0[c] < 0) throw py::value_error("negative sample count");
        if (S[c] > 0 && W[c] <= 0) throw py::value_error("corpus " + std::to_string(c) + " has no complete window");
        if (W[c] > (int64_t)0xFFFFFFFFLL) throw py::value_error("more than 2^32 windows per epoch");
        if (slot[c] < 0 || slot[c] > 255) throw py::value_error("slot out of range 0..255");
    }
    const int64_t n = (int64_t)out_corpus.size();
    if (out_window.size() != n || n > N)
        throw py::value_error("output arrays must have the same length, at most sum(samples) = " + std::to_string(N));
    uint8_t* oc = out_corpus.mutable_data();
    uint32_t* ow = out_window.mutable_data();

    py::gil_scoped_release nogil;
    std::vector<int64_t> count, cur_epoch(K, -1);
    std::vector<std::vector<uint32_t>> perm(K);
    std::vector<uint16_t> tmp;
    smooth_interleave(S, K, N, n, count, [&](int64_t g, int best, int64_t got) {
        const int64_t k = C0[best] + got;
        const int64_t e = k / W[best];
        if (e != cur_epoch[best]) {
            epoch_permutation(perm[best], tmp, (uint64_t)W[best], key_path(seed, (uint64_t)slot[best], (uint64_t)e),
                              leaf);
            cur_epoch[best] = e;
        }
        oc[g] = (uint8_t)slot[best];
        ow[g] = perm[best][(size_t)(k - e * W[best])];
    });
}

// Each corpus's count among the first n samples of the phase (the index without building it).
py::array_t<int64_t> mixture_prefix_counts(I64 samples, int64_t n) {
    const int64_t N = phase_length(samples);
    if (n < 0 || n > N) throw py::value_error("n must be in [0, sum(samples) = " + std::to_string(N) + "]");
    const py::ssize_t K = samples.size();
    std::vector<int64_t> count;
    {
        py::gil_scoped_release nogil;
        smooth_interleave(samples.data(), K, N, n, count, [](int64_t, int, int64_t) {});
    }
    py::array_t<int64_t> out(K);
    std::copy(count.begin(), count.end(), out.mutable_data());
    return out;
}

}  // namespace

void register_mixture_index(py::module_& m) {
    m.def("build_mixture_index", &build_mixture_index, py::arg("samples"), py::arg("start_counter"),
          py::arg("windows_per_epoch"), py::arg("slots"), py::arg("seed"), py::arg("out_corpus"),
          py::arg("out_window"), py::arg("leaf") = 65536,
          "Fill out_corpus (uint8 slot) and out_window (uint32 window) with the first len(out_corpus) samples "
          "of one mixture phase of sum(samples) samples.");
    m.def("mixture_prefix_counts", &mixture_prefix_counts, py::arg("samples"), py::arg("n"),
          "Samples of each corpus among the first n of a mixture phase (int64 per corpus).");
    m.def("epoch_permutation", &py_epoch_permutation, py::arg("n"), py::arg("seed"), py::arg("slot"),
          py::arg("epoch"), py::arg("leaf") = 65536, "The shuffled order of the n windows of (slot, epoch) under seed.");
}

}  // namespace normistral
