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

#include "moontune/types.h"

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

/* Returns a short constant name for a status ("io error", ...). */
MT_API const char *mt_status_name(mt_status status);

/* "F32", "F16", ... as safetensors spells them; NULL for an invalid dtype. */
MT_API const char *mt_dtype_name(mt_dtype dtype);

/* Half-precision conversions used on load and export (round to nearest even). */
MT_API float mt_f16_to_f32(uint16_t h);
MT_API uint16_t mt_f32_to_f16(float f);
MT_API float mt_bf16_to_f32(uint16_t b);
MT_API uint16_t mt_f32_to_bf16(float f);

#ifdef __cplusplus
}
#endif
#endif /* MOONTUNE_H */
