/* gguf.h — reader for GGUF files (versions 2 and 3): metadata of every type and the
 * tensor directory, memory-mapped, validated as strictly as safetensors (bounded
 * string and array lengths, n_dims <= 4, overflow-checked sizes and offsets, an
 * alignment that is a power of two, tensor data inside the file). Every error names
 * the file and the field. Tensor data of types F32, F16, BF16, Q8_0, Q4_0, Q4_1,
 * Q4_K and Q6_K dequantizes to fp32. */
#ifndef MT_CORE_GGUF_H
#define MT_CORE_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

typedef enum mt_gguf_type {
    MT_GGUF_UINT8 = 0, MT_GGUF_INT8 = 1, MT_GGUF_UINT16 = 2, MT_GGUF_INT16 = 3,
    MT_GGUF_UINT32 = 4, MT_GGUF_INT32 = 5, MT_GGUF_FLOAT32 = 6, MT_GGUF_BOOL = 7,
    MT_GGUF_STRING = 8, MT_GGUF_ARRAY = 9, MT_GGUF_UINT64 = 10, MT_GGUF_INT64 = 11,
    MT_GGUF_FLOAT64 = 12,
} mt_gguf_type;

/* ggml tensor types (the ones moontune reads; others are refused by name) */
typedef enum mt_ggml_type {
    MT_GGML_F32 = 0, MT_GGML_F16 = 1, MT_GGML_Q4_0 = 2, MT_GGML_Q4_1 = 3, MT_GGML_Q8_0 = 8,
    MT_GGML_Q4_K = 12, MT_GGML_Q6_K = 14, MT_GGML_BF16 = 30,
} mt_ggml_type;

typedef struct mt_gguf mt_gguf;

/* One metadata value. Strings are not NUL-terminated in the file: use str/str_len.
 * Arrays hold arr_len elements of arr_type (nested arrays are refused). */
typedef struct mt_gguf_value {
    mt_gguf_type type;
    union {
        uint64_t u64;
        int64_t i64;
        double f64;
        int boolean;
    } num; /* every numeric type widened; bool in boolean */
    const char *str;
    uint64_t str_len;
    mt_gguf_type arr_type;
    uint64_t arr_len;
    const void *arr_data; /* raw little-endian elements; for strings use mt_gguf_array_string */
} mt_gguf_value;

typedef struct mt_gguf_tensor {
    const char *name; /* NUL-terminated copy */
    int n_dims;
    int64_t ne[4];    /* ggml order: ne[0] is the contiguous (innermost) dimension */
    uint32_t type;    /* mt_ggml_type */
    const void *data; /* inside the mapping */
    size_t nbytes;
} mt_gguf_tensor;

mt_status mt_gguf_open(const char *path, mt_gguf **out, mt_error *err);
void mt_gguf_close(mt_gguf *g);
const char *mt_gguf_path(const mt_gguf *g);
uint32_t mt_gguf_version(const mt_gguf *g);

/* Metadata: NULL when the key is absent. */
const mt_gguf_value *mt_gguf_get(const mt_gguf *g, const char *key);
size_t mt_gguf_kv_count(const mt_gguf *g);
const char *mt_gguf_kv_key(const mt_gguf *g, size_t index);
/* Element i of a string array (pointer into the mapping, *len bytes). */
const char *mt_gguf_array_string(const mt_gguf *g, const mt_gguf_value *v, uint64_t i,
                                 uint64_t *len);
/* Typed getters that fail with a message naming the file and key on a missing key or
 * a type that does not convert (integers of any width to int64, float32/64 to double). */
mt_status mt_gguf_get_int(const mt_gguf *g, const char *key, int64_t *out, mt_error *err);
mt_status mt_gguf_get_float(const mt_gguf *g, const char *key, double *out, mt_error *err);
/* A fresh NUL-terminated copy of a string value (the caller frees it). */
mt_status mt_gguf_get_string(const mt_gguf *g, const char *key, char **out, mt_error *err);

size_t mt_gguf_tensor_count(const mt_gguf *g);
const mt_gguf_tensor *mt_gguf_tensor_at(const mt_gguf *g, size_t index);
const mt_gguf_tensor *mt_gguf_find_tensor(const mt_gguf *g, const char *name);
/* Dequantizes a tensor into dst (numel floats, ggml order = row-major with ne[0]
 * contiguous); unsupported types are refused naming the file, tensor and type. */
mt_status mt_gguf_dequantize(const mt_gguf *g, const mt_gguf_tensor *t, float *dst,
                             mt_error *err);
/* "Q4_1" etc.; NULL for an unknown type. */
const char *mt_ggml_type_name(uint32_t type);

#endif
