// Global-sample index of an upsampled corpus mixture (see megatron_normistral/data/mixture.py,
// whose numpy/Python reference implementation this must match exactly; tests compare them).
//
// For global sample g of a mixture phase, out_corpus[g] is the corpus slot and out_window[g]
// the window of that corpus: window w covers tokens [w*L, w*L + L + 1) of the corpus's token
// stream (documents back to back with EOD), so no per-document or per-window array is ever
// built and the cost is proportional to the number of samples.
//
// 1. Which corpus: deterministic smooth interleaving. Corpus c's deficit after g+1 samples is
//    samples[c]*(g+1) - count[c]*N (exact integers, so C++ and Python agree bit for bit); the
//    corpus with the largest deficit that still has samples left wins (ties: lowest index).
// 2. Which window: corpus c's k-th sample overall (k = start_counter[c] + samples it already
//    got in this phase) is permutation_e[k mod n_c] with e = k div n_c, a random
//    permutation of the n_c windows seeded by (seed, slot, epoch) (see epoch_permutation). Each epoch is a fresh
//    shuffle, and a later phase that starts at the counter where the previous one stopped
//    continues the same stream: nothing consumed is repeated or skipped.
#include <pybind11/numpy.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "helpers.h"

namespace py = pybind11;

namespace normistral {
namespace {

inline uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

inline uint64_t epoch_key(uint64_t seed, uint64_t slot, uint64_t epoch) {
    return splitmix64(splitmix64(splitmix64(seed) ^ slot) ^ epoch);
}

// Per-epoch shuffle, a one-level Rao-Sandelius shuffle: every window goes to one of 2^b
// buckets by a hash bit string (two sequential passes), then each bucket (<= ~leaf windows,
// cache-resident) gets a forward Fisher-Yates. A uniform random bucket split followed by
// uniform shuffles within buckets is a uniform random permutation, and it avoids the
// cache miss per element that a plain Fisher-Yates over tens of millions of windows costs
// (measured ~5x faster at 61M samples here). Randomness: splitmix64 of a per-epoch key plus a
// counter; bounded draws by multiply-shift (no division).
constexpr uint64_t BUCKET_SALT = 0xD1B54A32D192ED03ULL;

int bucket_bits(uint64_t n, uint64_t leaf) {
    int b = 0;
    while (b < 16 && (n >> b) > leaf) ++b;
    return b;
}

void fisher_yates(uint32_t* p, uint64_t s, uint64_t e, uint64_t key) {
    for (uint64_t t = s; t + 1 < e; ++t) {
        const uint64_t j = t + (uint64_t)(((unsigned __int128)splitmix64(key + t) * (e - t)) >> 64);
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
    const uint64_t nb = 1ULL << b, bkey = splitmix64(key ^ BUCKET_SALT);
    tmp.resize(n);
    std::vector<uint64_t> pos(nb + 1, 0);
    for (uint64_t i = 0; i < n; ++i) {
        const uint16_t k = (uint16_t)(splitmix64(bkey + i) >> (64 - b));
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
    epoch_permutation(p, tmp, n, epoch_key(seed, slot, epoch), leaf);
    py::array_t<uint32_t> out((py::ssize_t)n);
    std::copy(p.begin(), p.end(), out.mutable_data());
    return out;
}

using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

void build_mixture_index(I64 samples, I64 start_counter, I64 windows_per_epoch, I64 slots, uint64_t seed,
                         py::array_t<uint8_t, py::array::c_style> out_corpus,
                         py::array_t<uint32_t, py::array::c_style> out_window, uint64_t leaf) {
    if (leaf < 1) throw py::value_error("leaf must be >= 1");
    const py::ssize_t K = samples.size();
    if (start_counter.size() != K || windows_per_epoch.size() != K || slots.size() != K)
        throw py::value_error("per-corpus arrays differ in length");
    if (K == 0 || K > 255) throw py::value_error("need 1..255 corpora");
    const int64_t* S = samples.data();
    const int64_t* C0 = start_counter.data();
    const int64_t* W = windows_per_epoch.data();
    const int64_t* slot = slots.data();
    int64_t N = 0;
    for (py::ssize_t c = 0; c < K; ++c) {
        if (S[c] < 0 || C0[c] < 0) throw py::value_error("negative sample count");
        if (S[c] > 0 && W[c] <= 0) throw py::value_error("corpus " + std::to_string(c) + " has no complete window");
        if (W[c] > (int64_t)0xFFFFFFFFLL) throw py::value_error("more than 2^32 windows per epoch");
        if (slot[c] < 0 || slot[c] > 255) throw py::value_error("slot out of range 0..255");
        N += S[c];
    }
    if (out_corpus.size() != N || out_window.size() != N)
        throw py::value_error("output arrays must have sum(samples) = " + std::to_string(N) + " entries");
    // deficit = S[c]*(g+1) - count*N must fit in int64.
    if (N > 3000000000LL) throw py::value_error("more than 3e9 samples in one phase");
    uint8_t* oc = out_corpus.mutable_data();
    uint32_t* ow = out_window.mutable_data();

    py::gil_scoped_release nogil;
    std::vector<int64_t> deficit(K, 0), count(K, 0), cur_epoch(K, -1);
    std::vector<std::vector<uint32_t>> perm(K);
    std::vector<uint16_t> tmp;
    for (int64_t g = 0; g < N; ++g) {
        // No "samples left" test needed: the deficits sum to N > 0 at every step, and an
        // exhausted corpus has deficit S*(g+1) - S*N <= 0, so it can never be the maximum.
        int best = 0;
        int64_t best_def = (deficit[0] += S[0]);
        for (py::ssize_t c = 1; c < K; ++c) {
            const int64_t d = (deficit[c] += S[c]);
            if (d > best_def) { best = (int)c; best_def = d; }
        }
        const int64_t k = C0[best] + count[best];
        const int64_t e = k / W[best];
        if (e != cur_epoch[best]) {
            epoch_permutation(perm[best], tmp, (uint64_t)W[best], epoch_key(seed, (uint64_t)slot[best], (uint64_t)e),
                              leaf);
            cur_epoch[best] = e;
        }
        oc[g] = (uint8_t)slot[best];
        ow[g] = perm[best][(size_t)(k - e * W[best])];
        deficit[best] -= N;
        ++count[best];
    }
}

}  // namespace

void register_mixture_index(py::module_& m) {
    m.def("build_mixture_index", &build_mixture_index, py::arg("samples"), py::arg("start_counter"),
          py::arg("windows_per_epoch"), py::arg("slots"), py::arg("seed"), py::arg("out_corpus"),
          py::arg("out_window"), py::arg("leaf") = 65536,
          "Fill out_corpus (uint8 slot) and out_window (uint32 window) for one mixture phase.");
    m.def("epoch_permutation", &py_epoch_permutation, py::arg("n"), py::arg("seed"), py::arg("slot"),
          py::arg("epoch"), py::arg("leaf") = 65536, "The shuffled order of the n windows of (slot, epoch) under seed.");
    m.def("splitmix64", [](uint64_t x) { return splitmix64(x); }, py::arg("x"));
}

}  // namespace normistral
