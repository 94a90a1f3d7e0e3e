/* export_hf.h — exporting a model in Hugging Face formats.
 *
 * mt_export_peft writes an attached adapter as a PEFT adapter directory, loadable with
 * peft.PeftModel.from_pretrained(base, dir), through the adapter's vtable (ABI 2's
 * format "peft" and save): the adapter says which config keys and tensors it has
 * (store/adapter_dir.h writes them); LoRA and QLoRA write PEFT's LoRA format
 * (plugins/adapter/lora_peft.h). An adapter without save (full fine-tuning: the
 * trained weights are the model) is exported merged instead.
 *
 * mt_export_merged_hf writes a plain transformers model directory (LlamaForCausalLM,
 * Qwen2ForCausalLM or MistralForCausalLM): the adapter (optional) is merged into the base
 * weights for the write and unmerged afterwards, so the model in memory is unchanged.
 *   config.json, generation_config.json, model.safetensors (F32, every base parameter by
 *   its transformers name; tied models without lm_head.weight; sharded with an index
 *   above 2 GB), and with a tokenizer: tokenizer.json + tokenizer_config.json, copied
 *   when the tokenizer was loaded from a tokenizer.json, else written from memory
 *   (mt_tokenizer_save_json). bos/eos ids come from the tokenizer. */
#ifndef MT_CORE_EXPORT_HF_H
#define MT_CORE_EXPORT_HF_H

#include "model/model.h"
#include "plugin/registry.h"
#include "text/tokenizer.h"

/* adapter: an instance attached to model whose vtable saves the "peft" format.
 * base_model_name_or_path: written into adapter_config.json (may be NULL: null). */
mt_status mt_export_peft(mt_model *model, const mt_plugin_instance *adapter,
                         const char *base_model_name_or_path, const char *out_dir, mt_error *err);

/* adapter: an attached adapter instance to merge, or NULL. tokenizer: or NULL (no
 * tokenizer files, no bos/eos ids). */
mt_status mt_export_merged_hf(mt_model *model, const mt_plugin_instance *adapter,
                              const mt_tokenizer *tokenizer, const char *out_dir, mt_error *err);

/* Calls write(ctx) with the adapter (an attached instance, or NULL: none) merged into
 * the base weights, and unmerges it afterwards whatever write returned, so the model in
 * memory is unchanged: the merged GGUF export goes through here. */
mt_status mt_with_merged_adapter(const mt_plugin_instance *adapter,
                                 mt_status (*write)(void *ctx, mt_error *err), void *ctx,
                                 mt_error *err);

/* The config.json text for a model configuration (fresh string, caller frees);
 * bos/eos < 0 are written as null. */
char *mt_export_hf_config_json(const mt_model_config *cfg, int32_t bos, int32_t eos,
                               mt_error *err);

#endif /* MT_CORE_EXPORT_HF_H */
