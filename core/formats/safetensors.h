/* safetensors.h — reader and writer for the safetensors format
 * (single files and sharded checkpoints with model.safetensors.index.json).
 *
 * Files are memory-mapped read-only. Validation follows the reference
 * implementation: an 8-byte little-endian header length bounded by 100 MB and
 * by the file, a UTF-8 JSON object header, known dtypes, shapes whose element
 * count times the dtype size equals the byte range, and byte ranges that tile
 * the data buffer exactly (no gap, no overlap, nothing left over), all with
 * overflow-checked arithmetic. Every error names the file and the tensor. */
#ifndef MT_CORE_SAFETENSORS_H
#define MT_CORE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

#define MT_ST_MAX_HEADER_BYTES (100u * 1000u * 1000u)

/* Every dtype the reference implementation knows. Only F32, F16 and BF16 convert
 * to the compute dtype; the others load as raw bytes. */
typedef enum mt_st_dtype {
    MT_ST_BOOL, MT_ST_U8, MT_ST_I8, MT_ST_F8_E5M2, MT_ST_F8_E4M3, MT_ST_I16, MT_ST_U16,
    MT_ST_F16, MT_ST_BF16, MT_ST_I32, MT_ST_U32, MT_ST_F32, MT_ST_F64, MT_ST_I64, MT_ST_U64,
    MT_ST_DTYPE_COUNT
} mt_st_dtype;

typedef struct mt_st_tensor {
    const char *name;
    mt_st_dtype dtype;
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    const void *data; /* inside the mapping; valid until mt_st_close */
    size_t nbytes;
    const char *file; /* the path of the file that holds it */
} mt_st_tensor;

typedef struct mt_safetensors mt_safetensors;

/* Opens `path`: a .safetensors file, a model.safetensors.index.json, or a
 * directory holding model.safetensors or model.safetensors.index.json. */
mt_status mt_st_open(const char *path, mt_safetensors **out, mt_error *err);
void mt_st_close(mt_safetensors *st);

size_t mt_st_count(const mt_safetensors *st);
/* The file the set was read from (for errors), or a description of a sharded set. */
const char *mt_st_source(const mt_safetensors *st);
const mt_st_tensor *mt_st_at(const mt_safetensors *st, size_t index); /* sorted by name */
const mt_st_tensor *mt_st_find(const mt_safetensors *st, const char *name);
/* A value of the __metadata__ object (string to string), NULL when absent. */
const char *mt_st_metadata(const mt_safetensors *st, const char *key);

const char *mt_st_dtype_name(mt_st_dtype dtype);
size_t mt_st_dtype_size(mt_st_dtype dtype);

/* Converts an F32/F16/BF16 tensor to fp32 into dst (numel floats). Any other
 * dtype is refused with an error naming the file and the tensor. */
mt_status mt_st_read_f32(const mt_st_tensor *t, float *dst, mt_error *err);
/* As mt_st_read_f32, and refuses a tensor holding NaN or an infinity with an error
 * naming the file, the tensor, how many values are not finite, and the index (and
 * coordinates) of the first. The check runs inside the conversion, block by block, so
 * it costs no extra pass over memory. Model weights are read with it: a NaN there
 * would otherwise only show up later as NaN losses or garbage text. */
mt_status mt_st_read_f32_finite(const mt_st_tensor *t, float *dst, mt_error *err);

/* ---- writing ---- */

typedef struct mt_st_entry {
    const char *name;
    mt_st_dtype dtype;
    int ndim;
    int64_t shape[MT_MAX_DIMS];
    const void *data; /* numel * dtype size bytes, already in the target dtype */
} mt_st_entry;

/* Writes one .safetensors file atomically (temporary file, fsync, rename).
 * metadata: NULL or a NULL-terminated list of key, value, key, value, ... strings.
 * Entries are stored sorted by name, data aligned to 8 bytes (header padded with spaces). */
mt_status mt_st_write(const char *path, const mt_st_entry *entries, size_t count,
                      const char *const *metadata, mt_error *err);

/* Writes a sharded checkpoint into directory dir (created if needed):
 * model-00001-of-0000N.safetensors ... and model.safetensors.index.json, each shard at
 * most max_shard_bytes of tensor data (a larger tensor gets a shard of its own). When
 * everything fits in one shard, writes dir/model.safetensors and no index. */
mt_status mt_st_write_sharded(const char *dir, const mt_st_entry *entries, size_t count,
                              const char *const *metadata, size_t max_shard_bytes, mt_error *err);

#endif /* MT_CORE_SAFETENSORS_H */
