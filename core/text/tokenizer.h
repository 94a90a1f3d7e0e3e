/* tokenizer.h — tokenizers from Hugging Face tokenizer.json (byte-level BPE as in
 * GPT-2, SmolLM2, Llama 3, Qwen2; SentencePiece-style BPE as in Llama 2 and Mistral)
 * or from a GGUF file's tokenizer.ggml.* metadata. Encoding matches the `tokenizers`
 * library id for id; decode(encode(x)) == x. */
#ifndef MT_CORE_TOKENIZER_H
#define MT_CORE_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

typedef struct mt_tokenizer mt_tokenizer;

typedef enum mt_tokenizer_family {
    MT_TOK_BYTE_LEVEL_BPE = 1, /* GPT-2 byte-to-unicode alphabet, regex pre-splitting */
    MT_TOK_SENTENCEPIECE_BPE,  /* metaspace '▁', byte fallback <0xNN> */
} mt_tokenizer_family;

/* tokenizer_json: path of tokenizer.json. tokenizer_config: path of
 * tokenizer_config.json or NULL (BOS/EOS settings and chat_template come from it). */
mt_status mt_tokenizer_load_json(const char *tokenizer_json, const char *tokenizer_config,
                                 mt_tokenizer **out, mt_error *err);
/* Loads tokenizer.json (+ tokenizer_config.json when present) from a model directory. */
mt_status mt_tokenizer_load_dir(const char *dir, mt_tokenizer **out, mt_error *err);
/* Builds the tokenizer from a GGUF file's tokenizer.ggml.* metadata. */
mt_status mt_tokenizer_load_gguf(const char *gguf_path, mt_tokenizer **out, mt_error *err);
/* A .gguf file (its metadata) or a model directory (tokenizer.json). */
mt_status mt_tokenizer_load(const char *path, mt_tokenizer **out, mt_error *err);
void mt_tokenizer_free(mt_tokenizer *tok);

mt_tokenizer_family mt_tokenizer_get_family(const mt_tokenizer *tok);
int mt_tokenizer_vocab_size(const mt_tokenizer *tok);
/* -1 when the tokenizer has none */
int32_t mt_tokenizer_bos(const mt_tokenizer *tok);
int32_t mt_tokenizer_eos(const mt_tokenizer *tok);
int32_t mt_tokenizer_pad(const mt_tokenizer *tok);
/* Whether encode with add_special adds BOS / EOS (tokenizer_config's add_bos_token /
 * add_eos_token, or the post-processor of tokenizer.json, or GGUF's add_bos_token). */
int mt_tokenizer_adds_bos(const mt_tokenizer *tok);
int mt_tokenizer_adds_eos(const mt_tokenizer *tok);
/* The chat template string (Jinja) from tokenizer_config.json or GGUF; NULL if none. */
const char *mt_tokenizer_chat_template(const mt_tokenizer *tok);
/* The id of a token string ("<|im_end|>"), -1 if absent; and the string of an id. */
int32_t mt_tokenizer_token_id(const mt_tokenizer *tok, const char *token);
const char *mt_tokenizer_token_text(const mt_tokenizer *tok, int32_t id);
/* Whether an id is a special (added, special=true) token. */
int mt_tokenizer_is_special(const mt_tokenizer *tok, int32_t id);

/* A growable list of ids with, per id, the byte offset in the input where the
 * token's text starts (offsets[i] <= offsets[i+1]; special tokens added by
 * add_special, like BOS, sit at offset 0 or at the end for EOS). */
typedef struct mt_token_list {
    int32_t *ids;
    int32_t *offsets;
    size_t n, cap;
} mt_token_list;

void mt_token_list_free(mt_token_list *list);

/* Appends the encoding of text[0, len) to list. Added/special tokens written in the
 * text are matched before pre-splitting (as the tokenizers library does). add_special
 * adds BOS/EOS as the tokenizer's configuration says. Invalid UTF-8 is an error
 * naming the byte offset. */
mt_status mt_tokenizer_encode(const mt_tokenizer *tok, const char *text, size_t len,
                              int add_special, mt_token_list *list, mt_error *err);
/* Decodes ids into a fresh NUL-terminated string (*len excludes the NUL). With
 * skip_special, special tokens are left out (as tokenizers' skip_special_tokens). */
mt_status mt_tokenizer_decode(const mt_tokenizer *tok, const int32_t *ids, size_t n,
                              int skip_special, char **text, size_t *len, mt_error *err);

#endif

/* ---- accessors for the GGUF exporter (core/store/export_gguf.c) ------------------------ */
#ifndef MT_TOKENIZER_EXPORT_ACCESSORS
#define MT_TOKENIZER_EXPORT_ACCESSORS
/* The unknown token's id, -1 when none. */
int32_t mt_tokenizer_unk(const mt_tokenizer *tok);
/* A token's text (the vocabulary's form: GPT-2 alphabet for byte-level BPE, '▁' for
 * SentencePiece) and its length in bytes; NULL for an id out of range. */
const char *mt_tokenizer_token_bytes(const mt_tokenizer *tok, int32_t id, size_t *len);
/* The token's type as GGUF's tokenizer.ggml.token_type states it: 1 normal, 2 unknown,
 * 3 control (special), 4 user defined (added, not special), 6 byte (<0xNN>). */
int mt_tokenizer_gguf_token_type(const mt_tokenizer *tok, int32_t id);
/* Whether a SentencePiece tokenizer prepends '▁' to the text (add_space_prefix). */
int mt_tokenizer_adds_space_prefix(const mt_tokenizer *tok);
/* The merges, best rank first, as pairs of ids (pairs[2i], pairs[2i+1]); the caller
 * frees *pairs. SentencePiece vocabularies without a merge list give derived merges. */
mt_status mt_tokenizer_merge_list(const mt_tokenizer *tok, int32_t **pairs, size_t *count,
                                  mt_error *err);
/* llama.cpp's name for the byte-level pre-tokenizer (tokenizer.ggml.pre): "smollm",
 * "gpt-2", "llama-bpe" or "qwen2", recognized from the pre-tokenizer's splits; NULL
 * when it is none of these (or for SentencePiece). */
const char *mt_tokenizer_pre_name(const mt_tokenizer *tok);

/* Writes the tokenizer as a Hugging Face tokenizer.json (BPE model, vocab, merges, added
 * tokens, normalizer, pre-tokenizer, post-processor and decoder as configured) and, when
 * tokenizer_config_path is not NULL, a tokenizer_config.json (bos/eos/pad/unk tokens,
 * add_bos_token / add_eos_token, chat_template). Both written atomically. A tokenizer
 * loaded back from them encodes and decodes as this one does. */
mt_status mt_tokenizer_save_json(const mt_tokenizer *tok, const char *tokenizer_json_path,
                                 const char *tokenizer_config_path, mt_error *err);
/* The file the tokenizer was loaded from (tokenizer.json or a .gguf). */
const char *mt_tokenizer_source(const mt_tokenizer *tok);

#endif
