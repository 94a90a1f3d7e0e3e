/* export_gguf.h — writes a model (and optionally its tokenizer) as a GGUF v3 file that
 * llama.cpp runs and moontune's own GGUF loader (mt_model_load_gguf,
 * mt_tokenizer_load_gguf) reads back.
 *
 * Architecture "llama" (Llama, Mistral: q/k rows permuted as llama.cpp's converter
 * does) or "qwen2"; 2-D weights in F32 or F16, norms and biases always F32; output.weight
 * only when the embeddings are untied; Llama 3.1 rope scaling as rope_freqs.weight, as
 * llama.cpp writes it. Base weights only: adapters attached to the model are not merged.
 * The file is written atomically: a temporary file next to it, fsync'd, renamed. */
#ifndef MT_CORE_EXPORT_GGUF_H
#define MT_CORE_EXPORT_GGUF_H

#include "model/model.h"
#include "moontune/moontune.h"
#include "text/tokenizer.h"

/* dtype: MT_F32 or MT_F16 for 2-D weights. name: general.name (NULL: the model type).
 * tok: NULL writes no tokenizer.* metadata; otherwise its vocabulary must not exceed the
 * model's (fewer tokens are padded with unused "[PADn]" entries, as llama.cpp does). */
mt_status mt_export_gguf(const mt_model *m, const mt_tokenizer *tok, const char *path,
                         mt_dtype dtype, const char *name, mt_error *err);

#endif
