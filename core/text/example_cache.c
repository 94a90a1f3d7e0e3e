/* example_cache.c — tokenized examples saved and verified (see example_cache.h). */
#include "text/example_cache.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/internal.h"

#define MAGIC "MTEXAMP1"
#define MSG_BYTES 512
#define HEADER_WORDS 8

typedef mt_bytebuf wbuf;
static void put(wbuf *b, const void *data, size_t n) { mt_bytebuf_put(b, data, n); }
static void put_i64(wbuf *b, int64_t v) { put(b, &v, 8); }
static void put_i32(wbuf *b, int32_t v) { put(b, &v, 4); }


mt_status mt_example_cache_hash_tokenizer(mt_sha256_ctx *ctx, const mt_tokenizer *tok,
                                          mt_error *err) {
    const int V = mt_tokenizer_vocab_size(tok);
    mt_sha256_update_i64(ctx, mt_tokenizer_get_family(tok));
    mt_sha256_update_i64(ctx, V);
    for (int i = 0; i < V; i++) {
        size_t len = 0;
        const char *t = mt_tokenizer_token_bytes(tok, i, &len);
        mt_sha256_update_i64(ctx, t ? (int64_t)len : -1);
        if (t && len) mt_sha256_update(ctx, t, len);
        mt_sha256_update_i64(ctx, t ? mt_tokenizer_gguf_token_type(tok, i) : -1);
    }
    int32_t *pairs = NULL;
    size_t n_merges = 0;
    mt_status st = mt_tokenizer_merge_list(tok, &pairs, &n_merges, err);
    if (st) return st;
    mt_sha256_update_i64(ctx, (int64_t)n_merges);
    if (n_merges) mt_sha256_update(ctx, pairs, 2 * n_merges * sizeof *pairs);
    free(pairs);
    const int64_t ids[] = {mt_tokenizer_bos(tok), mt_tokenizer_eos(tok), mt_tokenizer_pad(tok),
                           mt_tokenizer_unk(tok), mt_tokenizer_adds_bos(tok),
                           mt_tokenizer_adds_eos(tok), mt_tokenizer_adds_space_prefix(tok)};
    for (size_t i = 0; i < sizeof ids / sizeof *ids; i++) mt_sha256_update_i64(ctx, ids[i]);
    mt_sha256_update_str(ctx, mt_tokenizer_pre_name(tok));
    mt_sha256_update_str(ctx, mt_tokenizer_chat_template(tok));
    /* the probe: what the tables above do not show (pre-tokenizer splits, normalisation) */
    static const char probe[] =
        "Hello,  world!\n\n\t  It's 2026-12-04: 3.14159 x 1000000 -- don't; we'll "
        "I'M   ok\r\n  caf\xC3\xA9 na\xC3\xAFve \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x99\x82 "
        "e\xCC\x81 \xEF\xAC\x81 <|im_start|>assistant<|im_end|> </s> <s> [INST] ";
    mt_token_list list = {0};
    for (int special = 0; special <= 1 && !st; special++) {
        list.n = 0;
        if (!(st = mt_tokenizer_encode(tok, probe, sizeof probe - 1, special, &list, err))) {
            mt_sha256_update_i64(ctx, (int64_t)list.n);
            if (list.n) {
                mt_sha256_update(ctx, list.ids, list.n * sizeof *list.ids);
                mt_sha256_update(ctx, list.offsets, list.n * sizeof *list.offsets);
            }
        }
    }
    mt_token_list_free(&list);
    return st;
}

static char *cache_path(const char *dir, const uint8_t key[MT_SHA256_BYTES], mt_error *err) {
    char hex[MT_SHA256_HEX], name[MT_SHA256_HEX + 8];
    mt_sha256_to_hex(key, hex);
    snprintf(name, sizeof name, "%s.mtex", hex);
    return mt_path_join(dir, name, err);
}

mt_status mt_example_cache_save(const mt_example_set *set, const char *dir,
                                const uint8_t key[MT_SHA256_BYTES], mt_error *err) {
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return mt_error_set(err, MT_ERR_IO, "%s: cannot create the example cache: %s", dir,
                            strerror(errno));
    wbuf b = {0};
    put(&b, MAGIC, 8);
    put(&b, key, MT_SHA256_BYTES);
    const int64_t header[HEADER_WORDS] = {
        (int64_t)set->n,          set->paired,
        set->n_truncated_prompt,  set->n_truncated_response,
        set->n_dropped_too_long,  set->n_dropped_no_target,
        set->n_skipped_kept,      set->opt.seq_len};
    for (int i = 0; i < HEADER_WORDS; i++) put_i64(&b, header[i]);
    for (int i = 0; i < set->n_skipped_kept; i++) {
        char msg[MSG_BYTES] = {0};
        snprintf(msg, sizeof msg, "%s", set->skipped[i].msg);
        put_i32(&b, set->skipped[i].file);
        put_i64(&b, set->skipped[i].line);
        put(&b, msg, sizeof msg);
    }
    for (size_t i = 0; i < set->n; i++) {
        const mt_example *e = &set->ex[i];
        put_i32(&b, e->n);
        put_i32(&b, e->file);
        put_i64(&b, e->line);
        put(&b, e->ids, (size_t)e->n * sizeof *e->ids);
        put(&b, e->trainable, (size_t)e->n);
    }
    uint8_t sum[MT_SHA256_BYTES];
    if (!b.oom) mt_sha256_digest(b.p, b.n, sum);
    put(&b, sum, sizeof sum);
    mt_status st;
    char *path = NULL;
    if (b.oom) st = mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory for the example cache", dir);
    else if (!(path = cache_path(dir, key, err))) st = MT_ERR_NOMEM;
    else st = mt_write_file_atomic(path, b.p, b.n, err);
    free(path);
    free(b.p);
    return st;
}

/* A reader over the file's bytes: every read is bounds-checked. */
typedef struct rbuf {
    const unsigned char *p;
    size_t n, pos;
} rbuf;

static int take(rbuf *r, void *out, size_t n) {
    if (r->n - r->pos < n) return 0;
    memcpy(out, r->p + r->pos, n);
    r->pos += n;
    return 1;
}

static mt_status corrupt(const char *path, const char *what, mt_error *err) {
    return mt_error_set(err, MT_ERR_FORMAT, "%s: %s", path, what);
}

mt_status mt_example_cache_load(mt_example_set *set, const char *dir,
                                const uint8_t key[MT_SHA256_BYTES], int32_t vocab_size,
                                int32_t n_files, mt_error *err) {
    char *path = cache_path(dir, key, err);
    if (!path) return MT_ERR_NOMEM;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        mt_status st = mt_error_set(err, MT_ERR_IO, "%s: no cached examples", path);
        free(path);
        return st;
    }
    char *data = NULL;
    size_t len = 0;
    mt_status st = mt_read_file(path, &data, &len, err);
    if (st) {
        free(path);
        return st;
    }
    rbuf r = {(const unsigned char *)data, len, 0};
    char magic[8];
    uint8_t k[MT_SHA256_BYTES], sum[MT_SHA256_BYTES];
    int64_t h[HEADER_WORDS];
    if (len < 8 + MT_SHA256_BYTES * 2 || !take(&r, magic, 8) || memcmp(magic, MAGIC, 8)) {
        st = corrupt(path, "not a moontune example cache (magic)", err);
        goto done;
    }
    mt_sha256_digest(data, len - MT_SHA256_BYTES, sum);
    if (memcmp(sum, data + len - MT_SHA256_BYTES, MT_SHA256_BYTES)) {
        st = corrupt(path, "checksum mismatch (a damaged or partial file)", err);
        goto done;
    }
    r.n = len - MT_SHA256_BYTES;
    if (!take(&r, k, sizeof k) || memcmp(k, key, sizeof k)) {
        st = corrupt(path, "written for another key", err);
        goto done;
    }
    for (int i = 0; i < HEADER_WORDS; i++)
        if (!take(&r, &h[i], 8) || h[i] < 0) {
            st = corrupt(path, "bad header", err);
            goto done;
        }
    const int64_t n = h[0];
    if (h[1] > 1 || h[6] > MT_BAD_RECORDS_KEPT || h[7] != set->opt.seq_len ||
        (uint64_t)n > (r.n - r.pos) / 16 || (h[1] && n % 2)) {
        st = corrupt(path, "bad header", err);
        goto done;
    }
    set->paired = (int)h[1];
    set->n_truncated_prompt = h[2];
    set->n_truncated_response = h[3];
    set->n_dropped_too_long = h[4];
    set->n_dropped_no_target = h[5];
    set->n_skipped_kept = (int)h[6];
    for (int i = 0; i < set->n_skipped_kept; i++) {
        char msg[MSG_BYTES];
        if (!take(&r, &set->skipped[i].file, 4) || !take(&r, &set->skipped[i].line, 8) ||
            !take(&r, msg, sizeof msg) || !memchr(msg, '\0', sizeof msg)) {
            st = corrupt(path, "bad skipped-pair entry", err);
            goto done;
        }
        snprintf(set->skipped[i].msg, sizeof set->skipped[i].msg, "%s", msg);
    }
    if (n && !(set->ex = mt_calloc((size_t)n, sizeof *set->ex, "cached examples", err))) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    set->cap = (size_t)n;
    for (int64_t i = 0; i < n; i++) {
        mt_example *e = &set->ex[i];
        int32_t ntok;
        if (!take(&r, &ntok, 4) || !take(&r, &e->file, 4) || !take(&r, &e->line, 8) ||
            ntok < 1 || ntok > set->opt.seq_len || e->file < -1 || e->file >= n_files ||
            r.n - r.pos < (size_t)ntok * 5) {
            st = corrupt(path, "bad example entry", err);
            goto done;
        }
        e->n = ntok;
        e->ids = mt_malloc((size_t)ntok * sizeof *e->ids, "cached examples", err);
        e->trainable = e->ids ? mt_malloc((size_t)ntok, "cached examples", err) : NULL;
        set->n = (size_t)i + 1; /* owned from here on: freed with the set on failure */
        if (!e->trainable) {
            st = MT_ERR_NOMEM;
            goto done;
        }
        take(&r, e->ids, (size_t)ntok * sizeof *e->ids);
        take(&r, e->trainable, (size_t)ntok);
        for (int32_t t = 0; t < ntok; t++)
            if (e->ids[t] < 0 || e->ids[t] >= vocab_size || e->trainable[t] > 1) {
                st = corrupt(path, "a token id or flag out of range", err);
                goto done;
            }
    }
    if (r.pos != r.n) st = corrupt(path, "trailing bytes", err);
done:
    if (st) {
        /* leave the set as it came: empty, options kept */
        for (size_t i = 0; i < set->n; i++) {
            free(set->ex[i].ids);
            free(set->ex[i].trainable);
        }
        free(set->ex);
        mt_example_options opt = set->opt;
        char **files = set->files;
        int nf = set->n_files;
        memset(set, 0, sizeof *set);
        set->opt = opt;
        set->files = files;
        set->n_files = nf;
    }
    free(data);
    free(path);
    return st;
}
