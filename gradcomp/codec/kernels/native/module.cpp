// The Python module gradcomp.codec.kernels._native: the exchange's kernels as functions of raw
// pointers, called by gradcomp/codec/kernels/native.py (which checks every tensor first). The GIL is
// released while a kernel runs, so the training thread goes on meanwhile; large calls are split by
// rows over `threads` threads (each block's arithmetic is the same whichever thread runs it).
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x03090000
#endif
#include <Python.h>

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

namespace {

const Kernels* g_kernels = nullptr;

const Kernels* best_kernels() {
#ifdef GC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return gc_avx512::kernels();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return gc_avx2::kernels();
#endif
  return gc_generic::kernels();
}

// One block of fp32 per thread, reused (a block is at most a few thousand values).
float* block_buffer(int64_t block) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < block) buf.resize(static_cast<size_t>(block));
  return buf.data();
}

// Run fn(r0, r1) over rows [0, rows), split into contiguous ranges over up to `threads` threads.
template <typename F>
void parallel_rows(int64_t rows, int64_t block, int64_t threads, F fn) {
  const int64_t min_values = int64_t(1) << 18;  // below about 1 MB of fp32 a thread costs more than it saves
  int64_t n = std::min<int64_t>(threads, (rows * block) / min_values);
  n = std::max<int64_t>(1, std::min<int64_t>(n, rows));
  if (n == 1) {
    fn(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (rows + n - 1) / n;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    if (r0 < r1) pool.emplace_back([=] { fn(r0, r1); });
  }
  fn(0, std::min(rows, per));
  for (auto& th : pool) th.join();
}

template <typename T>
T* ptr(unsigned long long p) { return reinterpret_cast<T*>(static_cast<uintptr_t>(p)); }

// The format tuple native.py passes: (bits, is_float, mbits, emin, max_code, rms_step, midrise, qmax,
// group, e8m0, emax, special, has_inf, values, scale_values, signs, signed_norm, norm), the pointers as
// integers (0: none).
bool parse_fmt(PyObject* t, Fmt* f) {
  unsigned long long values, scale_values, signs, signed_norm;
  if (!PyArg_ParseTuple(t, "iiiiffifiiifiKKKKf", &f->bits, &f->is_float, &f->mbits, &f->emin, &f->max_code, &f->rms_step,
                        &f->midrise, &f->qmax, &f->group, &f->e8m0, &f->emax, &f->special, &f->has_inf, &values, &scale_values,
                        &signs, &signed_norm, &f->norm))
    return false;
  f->values = ptr<const float>(values);
  f->scale_values = ptr<const float>(scale_values);
  f->signs = ptr<const float>(signs);
  f->signed_norm = ptr<const float>(signed_norm);
  return true;
}

PyObject* py_encode(PyObject*, PyObject* args) {
  unsigned long long x, rin, rout, noise, codes, scales;
  int kind;
  long long rows, block, threads;
  PyObject* fmt;
  Fmt f;
  if (!PyArg_ParseTuple(args, "KiLLKKKKKOL", &x, &kind, &rows, &block, &rin, &rout, &noise, &codes, &scales, &fmt, &threads) ||
      !parse_fmt(fmt, &f))
    return nullptr;
  const Kernels* k = g_kernels;
  Py_BEGIN_ALLOW_THREADS
  parallel_rows(rows, block, threads, [&](int64_t r0, int64_t r1) {
    k->encode(ptr<const void>(x), kind, r0, r1, block, ptr<const float>(rin), ptr<float>(rout), ptr<const float>(noise),
              ptr<uint8_t>(codes), ptr<void>(scales), f, block_buffer(block));
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_reduce(PyObject*, PyObject* args) {
  unsigned long long codes, scales, rin, rout, noise, out_codes, out_scales;
  long long cstride, sstride, p, rows, block, threads;
  PyObject* fmt;
  Fmt f;
  if (!PyArg_ParseTuple(args, "KLKLLLLKKKKKOL", &codes, &cstride, &scales, &sstride, &p, &rows, &block, &rin, &rout,
                        &noise, &out_codes, &out_scales, &fmt, &threads) ||
      !parse_fmt(fmt, &f))
    return nullptr;
  const Kernels* k = g_kernels;
  Py_BEGIN_ALLOW_THREADS
  parallel_rows(rows, block, threads, [&](int64_t r0, int64_t r1) {
    k->reduce(ptr<const uint8_t>(codes), cstride, ptr<const void>(scales), sstride, p, r0, r1, block,
              ptr<const float>(rin), ptr<float>(rout), ptr<const float>(noise), ptr<uint8_t>(out_codes),
              ptr<void>(out_scales), f, block_buffer(block));
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_decode(PyObject*, PyObject* args) {
  unsigned long long codes, scales, out;
  long long rows, block, threads;
  int kind;
  PyObject* fmt;
  Fmt f;
  if (!PyArg_ParseTuple(args, "KKLLKiOL", &codes, &scales, &rows, &block, &out, &kind, &fmt, &threads) || !parse_fmt(fmt, &f))
    return nullptr;
  const Kernels* k = g_kernels;
  Py_BEGIN_ALLOW_THREADS
  parallel_rows(rows, block, threads, [&](int64_t r0, int64_t r1) {
    k->decode(ptr<const uint8_t>(codes), ptr<const void>(scales), r0, r1, block, ptr<void>(out), kind, f, block_buffer(block));
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyObject* py_decode_sum(PyObject*, PyObject* args) {
  unsigned long long codes, scales, out, factor;
  long long cstride, sstride, p, rows, block, divide, threads;
  int kind;
  PyObject* fmt;
  Fmt f;
  if (!PyArg_ParseTuple(args, "KLKLLLLKiLKOL", &codes, &cstride, &scales, &sstride, &p, &rows, &block, &out, &kind,
                        &divide, &factor, &fmt, &threads) ||
      !parse_fmt(fmt, &f))
    return nullptr;
  const Kernels* k = g_kernels;
  Py_BEGIN_ALLOW_THREADS
  parallel_rows(rows, block, threads, [&](int64_t r0, int64_t r1) {
    k->decode_sum(ptr<const uint8_t>(codes), cstride, ptr<const void>(scales), sstride, p, r0, r1, block, ptr<void>(out),
                  kind, divide, ptr<const float>(factor), f, block_buffer(block));
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

std::vector<const Kernels*> supported() {
  std::vector<const Kernels*> out;
  const Kernels* best = best_kernels();
#ifdef GC_X86
  if (best == gc_avx512::kernels()) out.push_back(gc_avx512::kernels());
  if (best == gc_avx512::kernels() || best == gc_avx2::kernels()) out.push_back(gc_avx2::kernels());
#endif
  out.push_back(gc_generic::kernels());
  (void)best;
  return out;
}

PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(g_kernels->name); }

PyObject* py_isas(PyObject*, PyObject*) {
  std::vector<const Kernels*> all = supported();
  PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(all.size()));
  if (!t) return nullptr;
  for (size_t i = 0; i < all.size(); ++i) PyTuple_SetItem(t, static_cast<Py_ssize_t>(i), PyUnicode_FromString(all[i]->name));
  return t;
}

PyObject* py_set_isa(PyObject*, PyObject* args) {
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  for (const Kernels* k : supported()) {
    if (std::string(k->name) == name) {
      g_kernels = k;
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "isa must be one this CPU supports (see isas()), got '%s'", name);
  return nullptr;
}

PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS, "encode(x, kind, rows, block, rin, rout, noise, codes, scales, fmt, threads)"},
    {"reduce", py_reduce, METH_VARARGS,
     "reduce(codes, cstride, scales, sstride, p, rows, block, rin, rout, noise, out_codes, out_scales, fmt, threads)"},
    {"decode", py_decode, METH_VARARGS, "decode(codes, scales, rows, block, out, kind, fmt, threads)"},
    {"decode_sum", py_decode_sum, METH_VARARGS,
     "decode_sum(codes, cstride, scales, sstride, p, rows, block, out, kind, divide, factor, fmt, threads)"},
    {"isa", py_isa, METH_NOARGS, "The instruction set the kernels use now."},
    {"isas", py_isas, METH_NOARGS, "The instruction sets this CPU can run, fastest first."},
    {"set_isa", py_set_isa, METH_VARARGS, "Use the kernels of another supported instruction set (for tests)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "gradcomp's native exchange kernels (see native.py).", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) {
  g_kernels = best_kernels();
  return PyModule_Create(&module);
}
