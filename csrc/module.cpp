// hp_fast._C: the Python module and the schemas of every operator in torch.ops.hp_fast.
//
// The kernels register their implementations per dispatch key (TORCH_LIBRARY_IMPL) in their own
// files: head_gain.cpp (CPU), cuda/head_gain.cu (CUDA, when built), somp_small.cpp (CPU). The
// Python side (fake kernels, autograd, fallbacks) is hp_fast/ops.py.

#include <Python.h>

#include <torch/library.h>

// `import hp_fast._C` loads this shared library, which runs the TORCH_LIBRARY
// registration below and the kernels' TORCH_LIBRARY_IMPL ones. The module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "hp_fast compiled operators (registered under torch.ops.hp_fast)",
      -1,       // no per-module state
      nullptr,  // methods
      nullptr,  // slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  return PyModule_Create(&module_def);
}
}

namespace hp_fast {

TORCH_LIBRARY(hp_fast, m) {
  // head_gain.cpp: out (B, T, H*dh) = attn with each head scaled by its gain.
  m.def(
      "head_gain(Tensor attn, Tensor gains, Tensor? mask, bool heads_first) -> Tensor");
  // somp_small.cpp: atom-space SOMP over a small dictionary; returns support (B, k) long,
  // evr (B, k), MQ (B, k, r), T (B, k, k).
  m.def("somp_small(Tensor E, Tensor Gd, Tensor G, Tensor L, Tensor atom_sq, Tensor total, "
        "int k, bool ormp, bool normalize, float rtol, float span_tol, float refresh_drop) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace hp_fast
