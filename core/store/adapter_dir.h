/* adapter_dir.h — a PEFT adapter directory as an mt_adapter_io (plugin/adapter_io.h):
 * what an adapter's save writes and what its import_options and load read.
 *
 *   adapter_config.json        one JSON object, keys sorted (as PEFT's save_pretrained
 *                              writes it): the adapter's own keys (its peft_type
 *                              included) and the core's: base_model_name_or_path,
 *                              task_type "CAUSAL_LM", inference_mode true, auto_mapping
 *                              and revision null
 *   adapter_model.safetensors  the adapter's tensors under "base_model.model.<name>"
 *                              (PEFT's prefix: the host adds it on write and strips it
 *                              on read, so adapters name tensors as the model does),
 *                              metadata {"format": "pt"}
 *
 * The directory knows PEFT's layout, never an adapter's keys: what the keys and tensors
 * mean is the adapter's (plugins/adapter/lora_peft.h for LoRA). */
#ifndef MT_CORE_STORE_ADAPTER_DIR_H
#define MT_CORE_STORE_ADAPTER_DIR_H

#include <stddef.h>

#include "plugin/adapter_io.h"
#include "plugin/options.h"

#define MT_PEFT_TENSOR_PREFIX "base_model.model."

/* Whether an adapter's vtable has the ABI 2 slot `field` (its size reaches past it) and
 * fills it: a plugin's vtable is read no further than it reaches. */
#define MT_ADAPTER_VT_HAS(vt, field)                                                          \
    ((vt)->size >= offsetof(mt_adapter_vtable, field) + sizeof((vt)->field) && (vt)->field)

typedef struct mt_adapter_dir mt_adapter_dir;

/* The io an adapter's save, import_options or load receives (valid until close). */
mt_adapter_io *mt_adapter_dir_io(mt_adapter_dir *d);
/* The directory, for messages. */
const char *mt_adapter_dir_path(const mt_adapter_dir *d);
void mt_adapter_dir_close(mt_adapter_dir *d);

/* ---- writing ---- */

/* A directory to be written to `dir`; base_model_name_or_path may be NULL (null).
 * Nothing touches the disk before commit. */
mt_status mt_adapter_dir_create(const char *dir, const char *base_model_name_or_path,
                                mt_adapter_dir **out, mt_error *err);
/* Writes adapter_model.safetensors, then adapter_config.json, each atomically, into the
 * directory (which must exist). */
mt_status mt_adapter_dir_commit(mt_adapter_dir *d, mt_error *err);

/* ---- reading ---- */

/* Parses dir/adapter_config.json (a JSON object; task_type, when given, "CAUSAL_LM")
 * and maps dir/adapter_model.safetensors: every tensor under PEFT's prefix, and every
 * F32/F16/BF16 one finite (checked now, before any adapter sees the directory). */
mt_status mt_adapter_dir_open(const char *dir, mt_adapter_dir **out, mt_error *err);
size_t mt_adapter_dir_tensor_count(const mt_adapter_dir *d);

/* import_options: the plugin whose options set_option sets (its schema names and types
 * them); forgets the options set before, so that several plugins can be asked in turn. */
void mt_adapter_dir_begin_options(mt_adapter_dir *d, const mt_plugin_descriptor *desc);
/* The options set since begin_options, as key/values for mt_plugin_instantiate. */
const mt_kv *mt_adapter_dir_options(const mt_adapter_dir *d, size_t *count);

#endif
