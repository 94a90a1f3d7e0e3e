/* moontune.h — the public embedding API of libmoontune.
 *
 * Everything here is C11 and safe to include from C++ (extern "C").
 * Naming: public symbols start with mt_ (functions) or MT_ (constants).
 * A function that can fail returns an mt_status and, when given an mt_error,
 * fills it with a message that names the file, the tensor or the key, and says
 * what was expected and what was found. */
#ifndef MOONTUNE_H
#define MOONTUNE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MT_VERSION_MAJOR 0
#define MT_VERSION_MINOR 1
#define MT_VERSION_PATCH 0
#define MT_VERSION_STRING "0.1.0"

#if defined(__GNUC__)
#define MT_API __attribute__((visibility("default")))
#else
#define MT_API
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

/* Returns a short constant name for a status ("io error", ...). */
MT_API const char *mt_status_name(mt_status status);

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
MT_API size_t mt_dtype_size(mt_dtype dtype);
/* "F32", "F16", ... as safetensors spells them; NULL for an invalid dtype. */
MT_API const char *mt_dtype_name(mt_dtype dtype);
/* Number of elements (product of the shape); 1 for ndim 0. */
MT_API int64_t mt_tensor_numel(const mt_tensor *t);
MT_API size_t mt_tensor_nbytes(const mt_tensor *t);

/* Half-precision conversions used on load and export (round to nearest even). */
MT_API float mt_f16_to_f32(uint16_t h);
MT_API uint16_t mt_f32_to_f16(float f);
MT_API float mt_bf16_to_f32(uint16_t b);
MT_API uint16_t mt_f32_to_bf16(float f);

#ifdef __cplusplus
}
#endif
#endif /* MOONTUNE_H */
