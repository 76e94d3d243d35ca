// Python module init of moe_kernels._C. The ops register themselves with the dispatcher
// (TORCH_LIBRARY_FRAGMENT in each file) when the shared library is loaded; the module itself is empty.
#include <Python.h>

static struct PyModuleDef cumo_cpu_module = {PyModuleDef_HEAD_INIT, "_C", "cumo-moe CPU ops (torch.ops.cumo)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cumo_cpu_module); }
