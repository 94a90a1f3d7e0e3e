/* data_cache.c — the example cache's directory and key (see data_cache.h). */
#include "lua/data_cache.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/internal.h"
#include "lua/lua_state.h"
#include "text/example_cache.h"

#define KEY_FORMAT "moontune example cache 1"

/* mkdir -p for the few levels under a home or cache directory. */
static int make_dirs(char *path) {
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        int rc = mkdir(path, 0755);
        *p = '/';
        if (rc != 0 && errno != EEXIST) return -1;
    }
    return mkdir(path, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

int mt_data_cache_dir(char *buf, size_t cap) {
    const char *env = getenv("MOONTUNE_CACHE_DIR");
    const char *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    int n;
    if (env && !strcmp(env, "off")) return -1;
    if (env && *env) n = snprintf(buf, cap, "%s", env);
    else if (xdg && *xdg == '/') n = snprintf(buf, cap, "%s/moontune/examples", xdg);
    else if (home && *home == '/') n = snprintf(buf, cap, "%s/.cache/moontune/examples", home);
    else return -1;
    if (n <= 0 || (size_t)n >= cap) return -1;
    return make_dirs(buf);
}

static void hash_f64(mt_sha256_ctx *ctx, double v) { mt_sha256_update(ctx, &v, sizeof v); }

/* A Lua module's source under the Lua directory (absent: hashed as absent). */
static mt_status hash_module(mt_sha256_ctx *ctx, const char *relative, mt_error *err) {
    char *path = mt_path_join(mt_lua_dir(), relative, err);
    if (!path) return MT_ERR_NOMEM;
    char hex[MT_SHA256_HEX] = "";
    uint64_t bytes = 0;
    struct stat sb;
    mt_status st = MT_OK;
    if (stat(path, &sb) == 0) st = mt_sha256_file(path, hex, &bytes, err);
    free(path);
    mt_sha256_update_str(ctx, relative);
    mt_sha256_update_str(ctx, hex);
    return st;
}

mt_status mt_data_cache_key(const mt_data_file *files, int n_files, uint64_t mix_seed,
                            const mt_jsonl_options *jsonl, const mt_example_options *ex,
                            const mt_tokenizer *tok, const char *template_requested,
                            const char *template_resolved, uint8_t key[MT_SHA256_BYTES],
                            mt_error *err) {
    mt_sha256_ctx ctx;
    mt_sha256_init(&ctx);
    mt_sha256_update_str(&ctx, KEY_FORMAT);
    mt_sha256_update_i64(&ctx, n_files);
    for (int i = 0; i < n_files; i++) {
        mt_sha256_update(&ctx, files[i].sha256, MT_SHA256_BYTES);
        hash_f64(&ctx, files[i].weight);
    }
    mt_status st;
    mt_sha256_update_i64(&ctx, (int64_t)mix_seed);
    mt_sha256_update_i64(&ctx, jsonl->format);
    mt_sha256_update_i64(&ctx, jsonl->on_bad_record);
    const mt_data_fields none = {0}, *f = jsonl->fields ? jsonl->fields : &none;
    const char *names[] = {f->instruction, f->input, f->output, f->messages, f->role, f->content,
                           f->prompt, f->completion, f->text, f->chosen, f->rejected};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) mt_sha256_update_str(&ctx, names[i]);
    const int64_t opts[] = {ex->seq_len, ex->truncation, ex->train_on_inputs, ex->add_special,
                            ex->pad_id, ex->on_bad_record, ex->rejected_to_difference};
    for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) mt_sha256_update_i64(&ctx, opts[i]);
    if ((st = mt_example_cache_hash_tokenizer(&ctx, tok, err))) return st;
    mt_sha256_update_str(&ctx, template_requested);
    mt_sha256_update_str(&ctx, template_resolved);
    if ((st = hash_module(&ctx, "moontune/chat.lua", err)) ||
        (st = hash_module(&ctx, "moontune/jinja.lua", err)))
        return st;
    mt_sha256_final(&ctx, key);
    return MT_OK;
}
