/* session.h — what every command and mt.model set up before they compute: the backend
 * of the chosen device, the model (loaded from a path or created from a config), its
 * tokenizer, and an adapter (a PEFT directory, or a plugin by name with options).
 *
 * One function does it, so that `moontune eval`, `generate`, `bench` and the Lua
 * binding choose the device, bind the backend (model/device.h) and release everything
 * in the same order. It lives in core/store, not core/model, because loading a PEFT
 * adapter directory (store/peft.h) is part of it and store is the lowest layer that
 * may include both.
 *
 * The device is chosen by name as model/device_select.h says: "cpu", "cuda", or NULL/""
 * for the default (CUDA where it starts, else the CPU). */
#ifndef MT_CORE_STORE_SESSION_H
#define MT_CORE_STORE_SESSION_H

#include <stddef.h>
#include <stdint.h>

#include "model/device_select.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "text/tokenizer.h"

typedef struct mt_session_options {
    const char *device;        /* "cpu", "cuda", or NULL/"" for the default */
    const char *device_origin; /* how the user named it, for messages: "--device" (the
                                  default), "mt.model: device" */
    int threads;               /* CPU threads; <= 0 uses OpenMP's default */
    /* the model: a .gguf file or a Hugging Face directory, or (model_path NULL) a config
     * whose weights are drawn at random (normal(0, random_std) from random_seed) */
    const char *model_path;
    const mt_model_config *config;
    uint64_t random_seed;
    float random_std;
    int with_tokenizer; /* load the tokenizer of model_path (a config has none) */
    /* at most one adapter: a PEFT LoRA directory, or a plugin found by name on the plugin
     * search path and instantiated with these options */
    const char *adapter_dir;
    const char *adapter;
    const mt_kv *adapter_options;
    size_t n_adapter_options;
} mt_session_options;

typedef struct mt_session {
    mt_backend be;               /* bound to its device while the session is open */
    char device[8];              /* "cpu" or "cuda": the device in use */
    char cuda_unavailable[256];  /* why the default is not CUDA ("" when it is, or when
                                    the device was named) */
    mt_tokenizer *tok;           /* NULL unless with_tokenizer */
    mt_model *model;
    mt_registry *registry;       /* NULL unless an adapter was attached */
    mt_plugin_instance *adapter; /* NULL when none */
    int have_be;
} mt_session;

/* Opens everything opt asks for into a new session (*out). On failure *out is NULL,
 * everything opened so far is released and err names what failed. */
mt_status mt_session_open(const mt_session_options *opt, mt_session **out, mt_error *err);

/* Attaches an adapter plugin by name to the session's model (which must have none from
 * the session yet). mt_session_open does this for opt->adapter; bench calls it itself to
 * measure memory before and after. */
mt_status mt_session_attach_adapter(mt_session *s, const char *name, const mt_kv *options,
                                    size_t n_options, mt_error *err);

/* Frees the model, then the session's adapter (which the model calls into), keeping the
 * backend: for an owner whose own adapters must go after the model and before the
 * backend (the Lua Model). mt_session_close does it when the owner has not. */
void mt_session_release_model(mt_session *s);

/* Releases the model, the adapter, its registry, the tokenizer, then unbinds and shuts
 * the backend down. NULL is accepted. */
void mt_session_close(mt_session *s);

#endif /* MT_CORE_STORE_SESSION_H */
