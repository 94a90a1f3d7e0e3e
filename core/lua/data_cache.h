/* data_cache.h — where the tokenized-example cache lives and what its key covers
 * (the files of text/example_cache.h). It lives in core/lua because the key includes
 * the chat template, whose code is Lua (lua/moontune/chat.lua). */
#ifndef MT_CORE_LUA_DATA_CACHE_H
#define MT_CORE_LUA_DATA_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "formats/sha256.h"
#include "text/dataset.h"
#include "text/tokenizer.h"

/* The cache directory: $MOONTUNE_CACHE_DIR, else $XDG_CACHE_HOME/moontune/examples,
 * else $HOME/.cache/moontune/examples, created when missing. Returns 0 and fills buf, or
 * -1 when none can be named or made (the cache is then off). "off" in
 * $MOONTUNE_CACHE_DIR turns it off. */
int mt_data_cache_dir(char *buf, size_t cap);

/* One data file of a mixture, with the SHA-256 of the bytes its records were read
 * from (mt_records_load_digest fills it as it reads). */
typedef struct mt_data_file {
    const char *path;
    double weight;
    uint8_t sha256[MT_SHA256_BYTES];
} mt_data_file;

/* The key of a set of examples: a SHA-256 over the cache format, every file's digest
 * (of the bytes that were parsed, not read again) and weight in order, mix_seed, the reading options (format, field names,
 * bad-record policy), the example options (seq_len, truncation, train_on_inputs,
 * add_special, pad id), the tokenizer (text/example_cache.h), the template as
 * requested and as resolved, and the source of the template modules
 * (moontune/chat.lua, moontune/jinja.lua under the Lua directory). Any change to one
 * of them changes the key. */
mt_status mt_data_cache_key(const mt_data_file *files, int n_files, uint64_t mix_seed,
                            const mt_jsonl_options *jsonl, const mt_example_options *ex,
                            const mt_tokenizer *tok, const char *template_requested,
                            const char *template_resolved, uint8_t key[MT_SHA256_BYTES],
                            mt_error *err);

#endif
