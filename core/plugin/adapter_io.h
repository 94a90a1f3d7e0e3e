/* adapter_io.h — the core side of mt_adapter_io (moontune/plugin.h): an adapter
 * directory being written or read. The host table's io_* slots call these operations;
 * core/store implements them for a PEFT directory (adapter_config.json and
 * adapter_model.safetensors), so the plugin layer knows no file format. */
#ifndef MT_CORE_PLUGIN_ADAPTER_IO_H
#define MT_CORE_PLUGIN_ADAPTER_IO_H

#include "moontune/plugin.h"

typedef struct mt_adapter_io_ops {
    mt_status (*put_config)(mt_adapter_io *io, const char *key, const char *json, mt_error *err);
    mt_status (*put_tensor)(mt_adapter_io *io, const char *name, const mt_tensor *t,
                            mt_error *err);
    const char *(*get_config)(const mt_adapter_io *io, const char *key);
    const char *(*config_key)(const mt_adapter_io *io, int index);
    const char *(*tensor_name)(const mt_adapter_io *io, int index);
    mt_status (*get_tensor)(mt_adapter_io *io, const char *name, mt_tensor *out, mt_error *err);
    mt_status (*set_option)(mt_adapter_io *io, const char *name, const char *value,
                            mt_error *err);
} mt_adapter_io_ops;

/* Implementations embed this as their first member. An operation the io's direction
 * does not offer (put_* while reading) is NULL: the host refuses the call by name. */
struct mt_adapter_io {
    const mt_adapter_io_ops *ops;
};

#endif
