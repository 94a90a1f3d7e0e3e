/* types.h — the value types moontune's two public headers share: status and errors,
 * data types, devices and tensor views, with the helpers on them that are inline.
 *
 * Everything here is callable without linking the core, so a plugin (plugin.h) and
 * a program embedding libmoontune (moontune.h) both include it. */
#ifndef MOONTUNE_TYPES_H
#define MOONTUNE_TYPES_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status and errors ------------------------------------------------ */

typedef enum mt_status {
    MT_OK = 0,
    MT_ERR_IO,          /* a file could not be opened, read, written or mapped */
    MT_ERR_FORMAT,      /* a file's content is malformed or inconsistent */
    MT_ERR_UNSUPPORTED, /* valid input that this build does not handle */
    MT_ERR_INVALID_ARG, /* a caller passed something out of range */
    MT_ERR_NOMEM,       /* an allocation failed */
    MT_ERR_BACKEND,     /* a compute backend failed (e.g. a CUDA call) */
    MT_ERR_NUMERIC,     /* a NaN or infinity where a finite number was needed */
} mt_status;

#define MT_ERROR_MSG_MAX 512

typedef struct mt_error {
    mt_status status;
    char msg[MT_ERROR_MSG_MAX];
} mt_error;

/* ---- tensors ---------------------------------------------------------- */

typedef enum mt_dtype {
    MT_F32 = 0,
    MT_F16,
    MT_BF16,
    MT_I32,
    MT_I64,
    MT_U8,
    MT_DTYPE_COUNT
} mt_dtype;

typedef enum mt_device {
    MT_DEVICE_CPU = 0,
    MT_DEVICE_CUDA,
} mt_device;

#define MT_MAX_DIMS 8

/* A tensor is a view: it names memory it may or may not own. Shapes are
 * row-major (the last dimension is contiguous), as in PyTorch and safetensors. */
typedef struct mt_tensor {
    mt_dtype dtype;
    mt_device device;
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    void *data;
} mt_tensor;

/* "[576, 49152]" into buf (always NUL-terminated, truncated if it must be): the shape
 * for a message; returns buf. Inline, so plugins use it without linking the core. */
static inline const char *mt_shape_format(char *buf, size_t size, int ndim, const int64_t *shape) {
    if (!size) return buf;
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && len < size; i++)
        len += (size_t)snprintf(buf + len, size - len, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (len < size) snprintf(buf + len, size - len, "]");
    return buf;
}

/* Size in bytes of one element; 0 for an invalid dtype. */
static inline size_t mt_dtype_size(mt_dtype dtype) {
    static const size_t sizes[MT_DTYPE_COUNT] = {4, 2, 2, 4, 8, 1};
    return (unsigned)dtype < MT_DTYPE_COUNT ? sizes[dtype] : 0;
}

/* Number of elements (product of the shape); 1 for ndim 0. */
static inline int64_t mt_tensor_numel(const mt_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static inline size_t mt_tensor_nbytes(const mt_tensor *t) {
    return (size_t)mt_tensor_numel(t) * mt_dtype_size(t->dtype);
}

#ifdef __cplusplus
}
#endif
#endif /* MOONTUNE_TYPES_H */
