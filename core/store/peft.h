/* peft.h — loading a PEFT adapter directory (what peft's save_pretrained and
 * mt_export_peft write) onto a model, through an adapter plugin's vtable.
 *
 * The core reads the directory's format (store/adapter_dir.h: adapter_config.json as a
 * JSON object whose task_type, when given, is "CAUSAL_LM"; adapter_model.safetensors
 * with every tensor under "base_model.model." and no NaN or infinity) and checks that
 * every tensor belongs to a module of this model (a prefix of its name is a module with
 * a weight). What the keys and tensors mean, and what is refused, is the adapter's: its
 * import_options reads the config and sets the options an instance needs, its load
 * reads the tensors into the attached instance. For LoRA: plugins/adapter/lora_peft.h
 * and docs/plugins.md, "Loading PEFT adapters". */
#ifndef MT_CORE_PEFT_H
#define MT_CORE_PEFT_H

#include "model/model.h"
#include "plugin/registry.h"

/* Loads the adapter directory `dir` onto m (which must have no adapter yet) with the
 * adapter plugin `adapter` of reg, or, when adapter is NULL, with the first adapter
 * plugin in the registry's order whose vtable can load a "peft" directory and whose
 * import_options accepts this one. The instance is in evaluation mode; *out_instance
 * receives it, which must outlive the model (free the model first, then the instance;
 * the registry last).
 *
 * The directory's format, its config (import_options) and the tensors' modules are
 * checked before anything is attached: a refusal there leaves *out_instance NULL and
 * the model as it was. The adapter's load runs after the attach (ABI 2 has no detach):
 * a refusal there (a tensor missing or of the wrong shape for this model) leaves the
 * adapter attached with its initial weights and *out_instance set: the caller frees
 * the model, then the instance. Errors of the adapter's are prefixed with `dir`. */
mt_status mt_peft_attach(mt_model *m, const mt_registry *reg, const char *adapter,
                         const char *dir, mt_plugin_instance **out_instance, mt_error *err);

/* For the commands (--adapter DIR): opens the plugin registry into *reg (the build's or
 * installed plugins) and calls mt_peft_attach with no adapter named. Whatever it
 * returns, the caller frees the model, then mt_plugin_instance_free(*inst), then
 * mt_registry_close(*reg) (both accept NULL). */
mt_status mt_peft_load(mt_model *m, const char *dir, mt_registry **reg,
                       mt_plugin_instance **inst, mt_error *err);

#endif /* MT_CORE_PEFT_H */
