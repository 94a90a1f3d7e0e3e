/* export_gguf.h — writes a model (and optionally its tokenizer) as a GGUF v3 file that
 * llama.cpp runs and moontune's own GGUF loader (mt_model_load_gguf,
 * mt_tokenizer_load_gguf) reads back.
 *
 * Architecture "llama" (Llama, Mistral: q/k rows permuted as llama.cpp's converter
 * does) or "qwen2"; 2-D weights in F32, F16, BF16 or Q8_0 (blocks of 32: an F16 scale,
 * amax / 127, and 32 int8, rounded to nearest as llama.cpp's reference quantizer does; a
 * weight whose rows are not a multiple of 32 is written F16, as llama.cpp's converter
 * falls back), norms and biases always F32; output.weight
 * only when the embeddings are untied; Llama 3.1 rope scaling as rope_freqs.weight, as
 * llama.cpp writes it. Base weights only: adapters attached to the model are not merged.
 * The file is written atomically: a temporary file next to it, fsync'd, renamed. */
#ifndef MT_CORE_EXPORT_GGUF_H
#define MT_CORE_EXPORT_GGUF_H

#include "formats/gguf.h"
#include "model/model.h"
#include "moontune/moontune.h"
#include "plugin/registry.h"
#include "text/tokenizer.h"

/* The types an export writes, by name: "f32", "f16", "bf16", "q8_0". Returns 0 and sets
 * *out, or -1 for any other name. */
int mt_export_gguf_type_parse(const char *name, mt_ggml_type *out);

/* type: MT_GGML_F32, F16, BF16 or Q8_0 for 2-D weights. name: general.name (NULL: the
 * model type).
 * tok: NULL writes no tokenizer.* metadata; otherwise its vocabulary must not exceed the
 * model's (fewer tokens are padded with unused "[PADn]" entries, as llama.cpp does). */
mt_status mt_export_gguf(const mt_model *m, const mt_tokenizer *tok, const char *path,
                         mt_ggml_type type, const char *name, mt_error *err);

/* mt_export_gguf with the adapter (an attached instance, or NULL) merged into the
 * weights for the write and unmerged afterwards (store/export_hf.h's
 * mt_with_merged_adapter): `model:export_gguf` and `moontune export --to gguf`. */
mt_status mt_export_gguf_merged(const mt_model *m, const mt_plugin_instance *adapter,
                                const mt_tokenizer *tok, const char *path, mt_ggml_type type,
                                const char *name, mt_error *err);

#endif
