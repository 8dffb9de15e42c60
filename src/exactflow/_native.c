/* Compiled forward and backward passes for RealNVP, batch-norm and planar stacks on the CPU.
 *
 * The Python side (exactflow.native) describes a flow as a program: one Record per layer,
 * holding the addresses of its parameters, their gradients and its buffers, all tensors of one
 * dtype that it keeps alive. These functions read the weights in place, write the gradients in
 * place and use a workspace the caller allocates, so a training step costs one call.
 *
 * The matrix products are blocked for registers (tiles of MR rows by two vectors) and GCC
 * compiles each hot function for AVX-512, AVX2 with FMA and baseline x86-64, picking one at
 * load time; elsewhere the plain C is compiled for the machine's baseline.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* The vector helpers are always inlined, so no call passes a vector across the ABI. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* Rows of one tile of a matrix product, and rows per block when scoring many rows. */
#define MR 6
#define BLOCK 256

enum { OP_COUPLING = 1, OP_BATCHNORM = 2, OP_PLANAR = 3 };
enum { PLAIN, BIAS_LEAKY, LEAKY_GRAD };

/* Parameters of the largest layer: a coupling's two nets of three linear layers. */
#define PARAMETERS 12
#define BUFFERS 4

/* One layer, as exactflow.native.Program writes it: 44 int64 values. Couplings list their
 * parameters net by net (scale, then shift), each as W1, b1, W2, b2, W3, b3; batch norm as
 * log_gamma, beta; planar as w, u, b. Buffers: batch norm's running mean and variance, then
 * the last batch's. Unused entries are 0. */
typedef struct {
    int64_t op, dim, hidden, parity;
    int64_t value[PARAMETERS], grad[PARAMETERS], numel[PARAMETERS];
    int64_t buffer[BUFFERS];
} Record;

/* A bump allocator over the caller's workspace; with no base it only measures. */
typedef struct {
    char *base;
    int64_t used, capacity;
} Arena;

static void *arena_take(Arena *arena, int64_t bytes)
{
    int64_t start = (arena->used + 63) & ~(int64_t)63;
    arena->used = start + bytes;
    return arena->base ? arena->base + start : NULL;
}

#define REAL float
#define INTEGER int32_t
#define VL 8
#define SUFFIX _f32
#define R_TANH tanhf
#define R_EXP expf
#define R_LOG logf
#define R_SQRT sqrtf
#include "_native_kernels.h"
#undef REAL
#undef INTEGER
#undef VL
#undef SUFFIX
#undef R_TANH
#undef R_EXP
#undef R_LOG
#undef R_SQRT

#define REAL double
#define INTEGER int64_t
#define VL 4
#define SUFFIX _f64
#define R_TANH tanh
#define R_EXP exp
#define R_LOG log
#define R_SQRT sqrt
#include "_native_kernels.h"

/* The arguments every entry point shares. */
typedef struct {
    int dtype64;
    const Record *program;
    const double *constants;
    Py_ssize_t segments;
    const void *x;
    Py_ssize_t n;
    void *workspace;
    Py_ssize_t workspace_bytes;
    int training;
} Call;

static int check_workspace(const Call *call, int64_t needed)
{
    if (call->workspace_bytes < needed) {
        PyErr_Format(PyExc_ValueError, "workspace of %zd bytes, need %lld",
                     call->workspace_bytes, (long long)needed);
        return 0;
    }
    return 1;
}

static int64_t log_prob_bytes(const Call *c, void *out, void *workspace)
{
    if (c->dtype64)
        return log_prob_f64(c->program, c->constants, c->segments, c->x, c->n, out, workspace,
                            c->workspace_bytes, c->training);
    return log_prob_f32(c->program, c->constants, c->segments, c->x, c->n, out, workspace,
                        c->workspace_bytes, c->training);
}

static int64_t loss_backward_bytes(const Call *c, void *workspace, double clip, double *result)
{
    if (c->dtype64)
        return loss_backward_f64(c->program, c->constants, c->segments, c->x, c->n, workspace,
                                 c->workspace_bytes, c->training, clip, result);
    return loss_backward_f32(c->program, c->constants, c->segments, c->x, c->n, workspace,
                             c->workspace_bytes, c->training, clip, result);
}

static int parse(PyObject *args, Call *call, void **extra, double *clip)
{
    unsigned long long program, constants, x, workspace, out = 0;
    int ok;
    if (clip)
        ok = PyArg_ParseTuple(args, "pKKnKnKnpd", &call->dtype64, &program, &constants,
                              &call->segments, &x, &call->n, &workspace, &call->workspace_bytes,
                              &call->training, clip);
    else
        ok = PyArg_ParseTuple(args, "pKKnKnKKnp", &call->dtype64, &program, &constants,
                              &call->segments, &x, &call->n, &out, &workspace,
                              &call->workspace_bytes, &call->training);
    if (!ok)
        return 0;
    if (call->segments < 1 || call->n < 1) {
        PyErr_SetString(PyExc_ValueError, "need at least one layer and one row");
        return 0;
    }
    call->program = (const Record *)(uintptr_t)program;
    call->constants = (const double *)(uintptr_t)constants;
    call->x = (const void *)(uintptr_t)x;
    call->workspace = (void *)(uintptr_t)workspace;
    if (extra)
        *extra = (void *)(uintptr_t)out;
    return 1;
}

static PyObject *py_log_prob_workspace(PyObject *self, PyObject *args)
{
    Call call;
    void *out;
    (void)self;
    if (!parse(args, &call, &out, NULL))
        return NULL;
    return PyLong_FromLongLong(log_prob_bytes(&call, out, NULL));
}

static PyObject *py_log_prob(PyObject *self, PyObject *args)
{
    Call call;
    void *out;
    (void)self;
    if (!parse(args, &call, &out, NULL))
        return NULL;
    if (!check_workspace(&call, log_prob_bytes(&call, out, NULL)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    log_prob_bytes(&call, out, call.workspace);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_loss_backward_workspace(PyObject *self, PyObject *args)
{
    Call call;
    double clip;
    (void)self;
    if (!parse(args, &call, NULL, &clip))
        return NULL;
    return PyLong_FromLongLong(loss_backward_bytes(&call, NULL, clip, NULL));
}

static PyObject *py_loss_backward(PyObject *self, PyObject *args)
{
    Call call;
    double clip, result[2] = {0, 0};
    (void)self;
    if (!parse(args, &call, NULL, &clip))
        return NULL;
    if (!check_workspace(&call, loss_backward_bytes(&call, NULL, clip, NULL)))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    loss_backward_bytes(&call, call.workspace, clip, result);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("dd", result[0], result[1]);
}

static PyObject *py_adam(PyObject *self, PyObject *args)
{
    unsigned long long param, grad, exp_avg, exp_avg_sq;
    Py_ssize_t numel, step;
    double lr, beta1, beta2, eps, weight_decay;
    int dtype64;
    (void)self;
    if (!PyArg_ParseTuple(args, "pKKKKnnddddd", &dtype64, &param, &grad, &exp_avg, &exp_avg_sq,
                          &numel, &step, &lr, &beta1, &beta2, &eps, &weight_decay))
        return NULL;
    if (numel < 0 || step < 1) {
        PyErr_SetString(PyExc_ValueError, "need a count of values and a step of at least 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (dtype64)
        adam_f64((double *)(uintptr_t)param, (const double *)(uintptr_t)grad,
                 (double *)(uintptr_t)exp_avg, (double *)(uintptr_t)exp_avg_sq, numel, step, lr,
                 beta1, beta2, eps, weight_decay);
    else
        adam_f32((float *)(uintptr_t)param, (const float *)(uintptr_t)grad,
                 (float *)(uintptr_t)exp_avg, (float *)(uintptr_t)exp_avg_sq, numel, step, lr,
                 beta1, beta2, eps, weight_decay);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"log_prob", py_log_prob, METH_VARARGS,
     "log_prob(dtype64, program, constants, segments, x, n, out, workspace, bytes, training)"},
    {"log_prob_workspace", py_log_prob_workspace, METH_VARARGS,
     "The workspace bytes log_prob needs, for the same arguments."},
    {"loss_backward", py_loss_backward, METH_VARARGS,
     "loss_backward(dtype64, program, constants, segments, x, n, workspace, bytes, training, "
     "clip) -> (loss, gradient norm before clipping)"},
    {"loss_backward_workspace", py_loss_backward_workspace, METH_VARARGS,
     "The workspace bytes loss_backward needs, for the same arguments."},
    {"adam", py_adam, METH_VARARGS,
     "adam(dtype64, param, grad, exp_avg, exp_avg_sq, numel, step, lr, beta1, beta2, eps, "
     "weight_decay)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "Compiled passes of exactflow.native; see that module.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
