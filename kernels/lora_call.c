/* The CPU LoRA kernel's per-call entry (lora_step_f32 / lora_step_bf16 of lora_cpu.c) as a
 * CPython function, built and loaded by kernels/lora_cpu.py when Python's headers are there.
 * Why: ctypes converts every argument through its generic machinery, ~4 us a call inside a
 * decode step (measured; ~30 calls a step); this parses seven ints, ~2 us less.
 *
 * call(fn, x, ldx, y, ldy, step, layer_group) -> int: fn is the kernel entry's address, the
 * rest its arguments (addresses and strides as Python ints). The GIL is released while the
 * kernel runs, as ctypes does, so other Python threads (the server's event loop) go on. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*step_fn)(const void *x, int64_t ldx, void *y, int64_t ldy, const void *step,
                       int32_t layer_group);

static PyObject *call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    long long v[7];
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "call(fn, x, ldx, y, ldy, step, layer_group)");
        return NULL;
    }
    for (int i = 0; i < 7; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
    }
    if (v[0] == 0 || v[1] == 0 || v[3] == 0 || v[5] == 0) {
        PyErr_SetString(PyExc_ValueError, "null kernel, x, y or step address");
        return NULL;
    }
    const step_fn fn = (step_fn)(intptr_t)v[0];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fn((const void *)(intptr_t)v[1], (int64_t)v[2], (void *)(intptr_t)v[3], (int64_t)v[4],
            (const void *)(intptr_t)v[5], (int32_t)v[6]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL, "Run one CPU LoRA kernel call."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lora_call", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lora_call(void) { return PyModule_Create(&module); }
