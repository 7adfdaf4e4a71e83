// The shared core of the C++ helpers, and the registration entry point of each helper (each
// lives in its own .cpp file; module.cpp builds the one extension, megatron_normistral._helpers).
//
// megatron_normistral/data/reference.py mirrors this header name for name and specifies each
// primitive (its docstrings); tests/data/test_reference_core.py compares the two through the
// bindings registered by register_core. Only integer arithmetic, so both agree bit for bit.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace normistral {

inline uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Counter-based randomness: a key is derived from the seed along a path of labels (a sample
// index, a corpus slot, an epoch, a stream salt), and the i-th draw of a key is draw(key, i).
inline uint64_t derive_key(uint64_t key, uint64_t label) { return splitmix64(key ^ label); }

template <class... Labels>
inline uint64_t key_path(uint64_t seed, Labels... labels) {
    uint64_t key = splitmix64(seed);
    ((key = derive_key(key, static_cast<uint64_t>(labels))), ...);
    return key;
}

inline uint64_t draw(uint64_t key, uint64_t i) { return splitmix64(key + i); }

// An integer in [0, n) from a draw by multiply-shift (no division, no rejection). Two kinds,
// each part of the output of the algorithm that uses it: bounded32 (the high 32 bits of the
// draw, n < 2^32; the objective) and bounded64 (all 64 bits, any n; the mixture's shuffle).
inline uint64_t bounded32(uint64_t x, uint64_t n) { return ((x >> 32) * n) >> 32; }
inline uint64_t bounded64(uint64_t x, uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * n) >> 64);
}

// An int64 array argument (other integer dtypes are converted).
using I64 = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;

void register_core(pybind11::module_& m);            // module.cpp: the primitives above
void register_indexed_writer(pybind11::module_& m);  // indexed_writer.cpp
void register_mixture_index(pybind11::module_& m);   // mixture_index.cpp
void register_objective(pybind11::module_& m);       // objective.cpp
}  // namespace normistral
