/* sha256.c — SHA-256 as FIPS 180-4 specifies it (sections 4.1.2, 4.2.2, 5.1.1, 5.3.3,
 * 6.2): 64-byte blocks, big-endian words, a 64-round compression per block. */
#include "formats/sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/internal.h"

/* 4.2.2: the first 32 bits of the fractional parts of the cube roots of the first 64 primes */
static const uint32_t K[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u,
    0xab1c5ed5u, 0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu,
    0x9bdc06a7u, 0xc19bf174u, 0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu,
    0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau, 0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u,
    0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u, 0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu,
    0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u, 0xa2bfe8a1u, 0xa81a664bu,
    0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u, 0x19a4c116u,
    0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u,
    0xc67178f2u,
};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* 6.2.2: one block into the chaining state */
static void compress(uint32_t h[8], const uint8_t *p) {
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 |
               (uint32_t)p[4 * t + 2] << 8 | (uint32_t)p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = k + S1 + ch + K[t] + w[t];
        uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
        uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
        uint32_t t2 = S0 + maj;
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

void mt_sha256_init(mt_sha256_ctx *ctx) {
    /* 5.3.3: the first 32 bits of the fractional parts of the square roots of the first 8 primes */
    static const uint32_t H0[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                   0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    memcpy(ctx->h, H0, sizeof H0);
    ctx->bytes = 0;
    ctx->fill = 0;
}

void mt_sha256_update(mt_sha256_ctx *ctx, const void *data, size_t n) {
    const uint8_t *p = data;
    ctx->bytes += n;
    if (ctx->fill > 0) {
        size_t take = 64 - ctx->fill < n ? 64 - ctx->fill : n;
        memcpy(ctx->block + ctx->fill, p, take);
        ctx->fill += take;
        p += take;
        n -= take;
        if (ctx->fill < 64) return;
        compress(ctx->h, ctx->block);
        ctx->fill = 0;
    }
    for (; n >= 64; p += 64, n -= 64) compress(ctx->h, p);
    if (n > 0) memcpy(ctx->block, p, n);
    ctx->fill = n;
}

void mt_sha256_final(mt_sha256_ctx *ctx, uint8_t digest[MT_SHA256_BYTES]) {
    /* 5.1.1: a one bit, zeros to 56 mod 64 bytes, the length in bits as 64-bit big-endian */
    uint64_t bits = ctx->bytes * 8;
    ctx->block[ctx->fill++] = 0x80;
    if (ctx->fill > 56) {
        memset(ctx->block + ctx->fill, 0, 64 - ctx->fill);
        compress(ctx->h, ctx->block);
        ctx->fill = 0;
    }
    memset(ctx->block + ctx->fill, 0, 56 - ctx->fill);
    for (int i = 0; i < 8; i++) ctx->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    compress(ctx->h, ctx->block);
    for (int i = 0; i < 8; i++) {
        digest[4 * i] = (uint8_t)(ctx->h[i] >> 24);
        digest[4 * i + 1] = (uint8_t)(ctx->h[i] >> 16);
        digest[4 * i + 2] = (uint8_t)(ctx->h[i] >> 8);
        digest[4 * i + 3] = (uint8_t)ctx->h[i];
    }
    memset(ctx, 0, sizeof *ctx);
}

void mt_sha256_digest(const void *data, size_t n, uint8_t digest[MT_SHA256_BYTES]) {
    mt_sha256_ctx ctx;
    mt_sha256_init(&ctx);
    mt_sha256_update(&ctx, data, n);
    mt_sha256_final(&ctx, digest);
}

void mt_sha256_to_hex(const uint8_t digest[MT_SHA256_BYTES], char hex[MT_SHA256_HEX]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < MT_SHA256_BYTES; i++) {
        hex[2 * i] = digits[digest[i] >> 4];
        hex[2 * i + 1] = digits[digest[i] & 15];
    }
    hex[2 * MT_SHA256_BYTES] = '\0';
}

void mt_sha256_hex(const void *data, size_t n, char hex[MT_SHA256_HEX]) {
    uint8_t d[MT_SHA256_BYTES];
    mt_sha256_digest(data, n, d);
    mt_sha256_to_hex(d, hex);
}

mt_status mt_sha256_file(const char *path, char hex[MT_SHA256_HEX], uint64_t *bytes,
                         mt_error *err) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return mt_error_set(err, MT_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    enum { CHUNK = 1 << 20 };
    uint8_t *buf = mt_malloc(CHUNK, "checksum buffer", err);
    if (!buf) {
        close(fd);
        return MT_ERR_NOMEM;
    }
    mt_sha256_ctx ctx;
    mt_sha256_init(&ctx);
    mt_status st = MT_OK;
    for (;;) {
        ssize_t got = read(fd, buf, CHUNK);
        if (got < 0) {
            if (errno == EINTR) continue;
            st = mt_error_set(err, MT_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            break;
        }
        if (got == 0) break;
        mt_sha256_update(&ctx, buf, (size_t)got);
    }
    free(buf);
    close(fd);
    if (st) return st;
    if (bytes) *bytes = ctx.bytes;
    uint8_t d[MT_SHA256_BYTES];
    mt_sha256_final(&ctx, d);
    mt_sha256_to_hex(d, hex);
    return MT_OK;
}

void mt_sha256_update_i64(mt_sha256_ctx *ctx, int64_t v) { mt_sha256_update(ctx, &v, sizeof v); }

void mt_sha256_update_str(mt_sha256_ctx *ctx, const char *s) {
    const size_t n = s ? strlen(s) : 0;
    mt_sha256_update_i64(ctx, s ? (int64_t)n : -1);
    if (n) mt_sha256_update(ctx, s, n);
}
