/* peft.h — loading a PEFT LoRA adapter directory (what peft's save_pretrained and
 * mt_export_peft write) onto a model.
 *
 * <dir>/adapter_config.json must say peft_type "LORA"; r, lora_alpha, target_modules
 * and use_rslora are applied (lora_dropout is ignored: loading is for inference, the
 * instance gets dropout 0). target_modules: a list of module names or paths whose last
 * component is one of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (PEFT
 * saves "all-linear" expanded to full paths), or the string "all-linear" or one such
 * name. Refused, with the file and the key named, because the lora plugin cannot apply
 * them: bias other than "none", fan_in_fan_out, modules_to_save, rank_pattern,
 * alpha_pattern, layers_to_transform, use_dora, lora_bias, layer_replication,
 * trainable_token_indices, target_parameters, exclude_modules, alora_invocation_tokens,
 * use_qalora, use_bdlora, megatron_config (any value but null/false/empty), a
 * target_modules regular expression, other modules. Keys PEFT added that change
 * nothing at inference are ignored.
 *
 * <dir>/adapter_model.safetensors must hold "base_model.model.<name>" for every LoRA
 * parameter the lora plugin registers (<proj>.lora_A.weight (r,in), .lora_B.weight
 * (out,r)), F32, F16 or BF16, and nothing else; every projection the targets name in
 * every layer must be there (the plugin cannot wrap some layers only). */
#ifndef MT_CORE_PEFT_H
#define MT_CORE_PEFT_H

#include "model/model.h"
#include "plugin/registry.h"

/* Instantiates the "lora" plugin of reg with the directory's options, attaches it to
 * m (which must have no adapter yet) and loads the weights; *out_instance receives the
 * instance, which must outlive the model (free the model first, then the instance; the
 * registry last).
 *
 * Everything in the directory is checked against the model before the adapter is
 * attached, so an error leaves *out_instance NULL and the model as it was. Only a
 * failure after the attach (out of memory, a plugin registering other parameters than
 * the checks predicted) leaves the adapter attached with partial weights: then
 * *out_instance is set anyway and the caller must free the model, then the instance. */
mt_status mt_peft_attach(mt_model *m, const mt_registry *reg, const char *dir,
                         mt_plugin_instance **out_instance, mt_error *err);

/* For the commands (--adapter DIR): opens the plugin registry into *reg (the build's or
 * installed plugins) and calls mt_peft_attach. Whatever it returns, the caller frees the
 * model, then mt_plugin_instance_free(*inst), then mt_registry_close(*reg) (both
 * accept NULL). */
mt_status mt_peft_load(mt_model *m, const char *dir, mt_registry **reg,
                       mt_plugin_instance **inst, mt_error *err);

#endif /* MT_CORE_PEFT_H */
