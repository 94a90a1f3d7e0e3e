/* example_cache.h — tokenized examples saved under a key, so that a second run on the
 * same data, tokenizer and template skips rendering and tokenizing.
 *
 * The key is the caller's: a SHA-256 over everything the examples depend on (the data
 * files' bytes, the reading and example options, the tokenizer, the template; see
 * core/lua/bind_data.c). This file only stores and verifies.
 *
 * File <dir>/<key hex>.mtex, written atomically (temporary file, fsync, rename):
 *   "MTEXAMP1"              magic and format version
 *   key                     32 bytes
 *   header                  int64 n, paired, n_truncated_prompt, n_truncated_response,
 *                           n_dropped_too_long, n_dropped_no_target, n_skipped_kept,
 *                           seq_len (little-endian)
 *   skipped[n_skipped_kept] int32 file, int64 line, 512 bytes of message
 *   n examples              int32 n_tokens, int32 file, int64 line,
 *                           int32 ids[n_tokens], uint8 trainable[n_tokens]
 *   SHA-256 of everything above
 *
 * Loading checks all of it (magic, key, checksum, every count and id within bounds)
 * and reports any mismatch as MT_ERR_FORMAT, so the caller tokenizes again. */
#ifndef MT_CORE_TEXT_EXAMPLE_CACHE_H
#define MT_CORE_TEXT_EXAMPLE_CACHE_H

#include <stdint.h>

#include "formats/sha256.h"
#include "text/dataset.h"
#include "text/tokenizer.h"

/* Adds what a tokenizer's encoding depends on to a key: its family, vocabulary (every
 * token's bytes and type), merges, special ids and flags, chat template, and the ids of
 * a probe text (whitespace runs, digits, contractions, punctuation, non-ASCII, the
 * special tokens' own text) that a pre-tokenizer or normaliser difference changes. */
mt_status mt_example_cache_hash_tokenizer(mt_sha256_ctx *ctx, const mt_tokenizer *tok,
                                          mt_error *err);

/* Saves the examples of `set` (not its files, options or reference log-probabilities)
 * as <dir>/<key hex>.mtex, creating dir (one level) when missing. */
mt_status mt_example_cache_save(const mt_example_set *set, const char *dir,
                                const uint8_t key[MT_SHA256_BYTES], mt_error *err);

/* Loads <dir>/<key hex>.mtex into `set` (initialised with the options the key covers,
 * empty). MT_ERR_IO when there is no such file, MT_ERR_FORMAT when it does not verify
 * (set is left empty then); ids must lie below vocab_size, files below n_files. */
mt_status mt_example_cache_load(mt_example_set *set, const char *dir,
                                const uint8_t key[MT_SHA256_BYTES], int32_t vocab_size,
                                int32_t n_files, mt_error *err);

#endif
