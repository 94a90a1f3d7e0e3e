/* sha256.h — SHA-256 (FIPS 180-4), for the checksums of checkpoint files and of the
 * recipe text. Streaming: init, update any number of times, final. */
#ifndef MT_CORE_SHA256_H
#define MT_CORE_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

#define MT_SHA256_BYTES 32
#define MT_SHA256_HEX 65 /* 64 lowercase hex digits and a NUL */

typedef struct mt_sha256_ctx {
    uint32_t h[8];      /* the chaining state */
    uint64_t bytes;     /* message length so far */
    uint8_t block[64];  /* a partial block */
    size_t fill;        /* bytes in block */
} mt_sha256_ctx;

void mt_sha256_init(mt_sha256_ctx *ctx);
void mt_sha256_update(mt_sha256_ctx *ctx, const void *data, size_t n);
/* Pads, writes the digest and leaves ctx unusable until the next init. */
void mt_sha256_final(mt_sha256_ctx *ctx, uint8_t digest[MT_SHA256_BYTES]);

/* Keys built from several fields (the example cache's): a 64-bit integer as its 8
 * bytes, and a string as its length then its bytes (NULL as length -1), so that
 * "ab" + "c" and "a" + "bc" hash apart. */
void mt_sha256_update_i64(mt_sha256_ctx *ctx, int64_t v);
void mt_sha256_update_str(mt_sha256_ctx *ctx, const char *s);

/* One-shot digest of a buffer. */
void mt_sha256_digest(const void *data, size_t n, uint8_t digest[MT_SHA256_BYTES]);
/* Lowercase hex of a digest into hex (MT_SHA256_HEX bytes, NUL-terminated). */
void mt_sha256_to_hex(const uint8_t digest[MT_SHA256_BYTES], char hex[MT_SHA256_HEX]);
/* Hex digest of a buffer in one call. */
void mt_sha256_hex(const void *data, size_t n, char hex[MT_SHA256_HEX]);
/* Streams a file through SHA-256: its hex digest and (optionally) its size in bytes.
 * The error names the file. */
mt_status mt_sha256_file(const char *path, char hex[MT_SHA256_HEX], uint64_t *bytes,
                         mt_error *err);

#endif /* MT_CORE_SHA256_H */
