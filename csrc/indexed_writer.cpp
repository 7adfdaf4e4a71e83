// Writer of megatron-core's indexed dataset format (PREFIX.bin + PREFIX.idx), used by
// tools/preprocess_data.py. The layout is specified by the docstring of its pure-Python
// reference, megatron_normistral/data/indexed.py:_PyWriter; tests check both write
// byte-identical files.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "helpers.h"

namespace py = pybind11;

namespace normistral {
namespace {

// megatron-core's DType codes (indexed_dataset.DType); floats are not token ids, so refused.
size_t itemsize_of(int code) {
    switch (code) {
        case 1: case 2: return 1;   // uint8, int8
        case 3: case 8: return 2;   // int16, uint16
        case 4: return 4;           // int32
        case 5: return 8;           // int64
        default: throw std::invalid_argument("unsupported dtype code " + std::to_string(code));
    }
}

void range_of(int code, int64_t& lo, int64_t& hi) {
    switch (code) {
        case 1: lo = 0; hi = 255; break;
        case 2: lo = -128; hi = 127; break;
        case 3: lo = -32768; hi = 32767; break;
        case 8: lo = 0; hi = 65535; break;
        case 4: lo = std::numeric_limits<int32_t>::min(); hi = std::numeric_limits<int32_t>::max(); break;
        default: lo = std::numeric_limits<int64_t>::min(); hi = std::numeric_limits<int64_t>::max();
    }
}

void store(char* dst, int code, int64_t v) {
    switch (code) {
        case 1: { uint8_t x = (uint8_t)v; std::memcpy(dst, &x, 1); break; }
        case 2: { int8_t x = (int8_t)v; std::memcpy(dst, &x, 1); break; }
        case 3: { int16_t x = (int16_t)v; std::memcpy(dst, &x, 2); break; }
        case 8: { uint16_t x = (uint16_t)v; std::memcpy(dst, &x, 2); break; }
        case 4: { int32_t x = (int32_t)v; std::memcpy(dst, &x, 4); break; }
        default: std::memcpy(dst, &v, 8);
    }
}

// Raises Python's OSError(err, strerror, path) (ENOSPC, EFBIG, EIO, ...), so callers see which
// file failed and why, as with Python's own file objects. Needs the GIL.
[[noreturn]] void raise_os_error(int err, const std::string& path) {
    errno = err ? err : EIO;
    PyErr_SetFromErrnoWithFilename(PyExc_OSError, path.c_str());
    throw py::error_already_set();
}

py::dtype numpy_dtype_of(int code) {
    switch (code) {
        case 1: return py::dtype("uint8");
        case 2: return py::dtype("int8");
        case 3: return py::dtype("int16");
        case 8: return py::dtype("uint16");
        case 4: return py::dtype("int32");
        default: return py::dtype("int64");
    }
}

// Packs a list of token-id lists (what tokenizers return) into one array of the target dtype
// plus the lengths, walking the Python objects directly: about 10x cheaper than
// numpy.fromiter over a chained iterator, and it is the worker's main cost after tokenising.
py::tuple pack_token_lists(const py::list& docs, int code) {
    const size_t isz = itemsize_of(code);
    int64_t lo, hi;
    range_of(code, lo, hi);
    const Py_ssize_t n = PyList_GET_SIZE(docs.ptr());
    py::array_t<int64_t> lengths(n);
    int64_t* len = lengths.mutable_data();
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* d = PyList_GET_ITEM(docs.ptr(), i);
        if (!PyList_Check(d)) throw py::type_error("pack_token_lists: every document must be a list of ints");
        len[i] = PyList_GET_SIZE(d);
        total += (size_t)len[i];
    }
    py::array out(numpy_dtype_of(code), std::vector<py::ssize_t>{(py::ssize_t)total});
    char* dst = static_cast<char*>(out.mutable_data());
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* d = PyList_GET_ITEM(docs.ptr(), i);
        const Py_ssize_t m = PyList_GET_SIZE(d);
        for (Py_ssize_t j = 0; j < m; ++j) {
            int overflow = 0;
            const long long v = PyLong_AsLongLongAndOverflow(PyList_GET_ITEM(d, j), &overflow);
            if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
            if (overflow || v < lo || v > hi)
                throw py::value_error("token id out of range of the output dtype");
            store(dst, code, v);
            dst += isz;
        }
    }
    return py::make_tuple(out, lengths);
}

class IndexedWriter {
public:
    IndexedWriter(const std::string& bin_path, const std::string& idx_path, int dtype_code)
        : bin_path_(bin_path), idx_path_(idx_path), code_(dtype_code), itemsize_(itemsize_of(dtype_code)) {
        bin_ = std::fopen(bin_path.c_str(), "wb");
        if (!bin_) raise_os_error(errno, bin_path);
        // Large stdio buffer: .bin writes arrive as many small-to-medium chunks.
        std::setvbuf(bin_, nullptr, _IOFBF, 1 << 22);
        doc_idx_.push_back(0);
    }
    ~IndexedWriter() { if (bin_) std::fclose(bin_); }

    // tokens: contiguous array already in the output dtype; seq_lengths: tokens per sequence;
    // doc_seq_counts: sequences per document (None: one sequence per document).
    void add_packed(py::array tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> seq_lengths,
                    py::object doc_seq_counts) {
        check_open();
        if ((size_t)tokens.itemsize() != itemsize_) throw py::value_error("tokens dtype does not match the writer's dtype");
        if (!(tokens.flags() & py::array::c_style)) throw py::value_error("tokens must be C-contiguous");
        const int64_t* L = seq_lengths.data();
        const py::ssize_t ns = seq_lengths.size();
        int64_t total = 0;
        for (py::ssize_t i = 0; i < ns; ++i) {
            if (L[i] < 0 || L[i] > std::numeric_limits<int32_t>::max()) throw py::value_error("bad sequence length");
            total += L[i];
        }
        if (total != (int64_t)tokens.size()) throw py::value_error("sum(seq_lengths) != len(tokens)");
        if (doc_seq_counts.is_none()) {
            for (py::ssize_t i = 0; i < ns; ++i) doc_idx_.push_back(doc_idx_.back() + 1);
        } else {
            auto counts = doc_seq_counts.cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
            int64_t s = 0;
            for (py::ssize_t i = 0; i < counts.size(); ++i) {
                if (counts.data()[i] < 1) throw py::value_error("a document needs at least one sequence");
                s += counts.data()[i];
            }
            if (s != (int64_t)ns) throw py::value_error("sum(doc_seq_counts) != len(seq_lengths)");
            for (py::ssize_t i = 0; i < counts.size(); ++i) doc_idx_.push_back(doc_idx_.back() + counts.data()[i]);
        }
        for (py::ssize_t i = 0; i < ns; ++i) lengths_.push_back((int32_t)L[i]);
        const size_t nbytes = (size_t)total * itemsize_;
        const char* src = static_cast<const char*>(tokens.data());
        int err = 0;
        {
            py::gil_scoped_release nogil;
            if (nbytes && std::fwrite(src, 1, nbytes, bin_) != nbytes) err = errno ? errno : EIO;
        }
        if (err) raise_os_error(err, bin_path_);
    }

    // Convenience path for lists of token-id lists, one sequence per document.
    void add_documents(const py::list& docs) {
        py::tuple packed = pack_token_lists(docs, code_);
        add_packed(packed[0].cast<py::array>(), packed[1].cast<py::array_t<int64_t>>(), py::none());
    }

    void finalize() {
        check_open();
        // fclose flushes the stdio buffer: a full disk often shows up only here.
        errno = 0;
        const bool closed = std::fclose(bin_) == 0;
        bin_ = nullptr;
        if (!closed) raise_os_error(errno, bin_path_);
        FILE* f = std::fopen(idx_path_.c_str(), "wb");
        if (!f) raise_os_error(errno, idx_path_);
        std::setvbuf(f, nullptr, _IOFBF, 1 << 22);
        int err = 0;  // first write error (errno)
        auto put = [&](const void* p, size_t n) {
            if (n && !err && std::fwrite(p, 1, n, f) != n) err = errno ? errno : EIO;
        };
        const uint64_t version = 1, nseq = lengths_.size(), ndoc = doc_idx_.size();
        const uint8_t code = (uint8_t)code_;
        put("MMIDIDX\0\0", 9);
        put(&version, 8);
        put(&code, 1);
        put(&nseq, 8);
        put(&ndoc, 8);
        put(lengths_.data(), lengths_.size() * sizeof(int32_t));
        // Byte offsets of each sequence in .bin, written in blocks to bound the extra memory.
        std::vector<int64_t> ptr;
        ptr.reserve(1 << 16);
        int64_t pos = 0;
        for (size_t i = 0; i < lengths_.size(); ++i) {
            ptr.push_back(pos);
            pos += (int64_t)lengths_[i] * (int64_t)itemsize_;
            if (ptr.size() == ptr.capacity()) { put(ptr.data(), ptr.size() * 8); ptr.clear(); }
        }
        put(ptr.data(), ptr.size() * 8);
        put(doc_idx_.data(), doc_idx_.size() * sizeof(int64_t));
        errno = 0;
        if (std::fclose(f) != 0 && !err) err = errno ? errno : EIO;
        if (err) raise_os_error(err, idx_path_);
        finalized_ = true;
    }

    // Closes the .bin without writing the .idx (caller removes the temporary files).
    void abort() { if (bin_) { std::fclose(bin_); bin_ = nullptr; } }

    int64_t num_sequences() const { return (int64_t)lengths_.size(); }
    int64_t num_documents() const { return (int64_t)doc_idx_.size() - 1; }
    int dtype_code() const { return code_; }

private:
    void check_open() const {
        if (finalized_) throw std::runtime_error("writer already finalized");
        if (!bin_) throw std::runtime_error("writer closed");
    }
    FILE* bin_ = nullptr;
    std::string bin_path_;
    std::string idx_path_;
    int code_;
    size_t itemsize_;
    bool finalized_ = false;
    std::vector<int32_t> lengths_;
    std::vector<int64_t> doc_idx_;
};

}  // namespace

void register_indexed_writer(py::module_& m) {
    static_assert(sizeof(long long) == 8, "64-bit long long expected");
    {
        const uint16_t probe = 1;
        if (*reinterpret_cast<const uint8_t*>(&probe) != 1)
            throw std::runtime_error("megatron indexed format is little-endian; big-endian hosts unsupported");
    }
    m.def("pack_token_lists", &pack_token_lists, py::arg("docs"), py::arg("dtype_code"),
          "Pack list[list[int]] into (array of the dtype of `dtype_code`, int64 lengths).");
    py::class_<IndexedWriter>(m, "IndexedWriter",
                              "Streaming writer of megatron-core's .bin/.idx format (writes exactly the paths given).")
        .def(py::init<const std::string&, const std::string&, int>(), py::arg("bin_path"), py::arg("idx_path"),
             py::arg("dtype_code"))
        .def("add_packed", &IndexedWriter::add_packed, py::arg("tokens"), py::arg("seq_lengths"),
             py::arg("doc_seq_counts") = py::none())
        .def("add_documents", &IndexedWriter::add_documents, py::arg("docs"))
        .def("finalize", &IndexedWriter::finalize)
        .def("abort", &IndexedWriter::abort)
        .def_property_readonly("num_sequences", &IndexedWriter::num_sequences)
        .def_property_readonly("num_documents", &IndexedWriter::num_documents)
        .def_property_readonly("dtype_code", &IndexedWriter::dtype_code);
}

}  // namespace normistral
