/* session.c — backend, model, tokenizer and adapter, set up and released in one place. */
#include "store/session.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "store/peft.h"

mt_status mt_session_attach_adapter(mt_session *s, const char *name, const mt_kv *options,
                                    size_t n_options, mt_error *err) {
    if (!s || !s->model || !name)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "attach adapter: no model or no adapter name");
    if (s->adapter)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "attach adapter %s: the session already has an adapter", name);
    mt_status st;
    if (!s->registry && (st = mt_registry_open(NULL, 0, &s->registry, err))) return st;
    const mt_plugin *p = mt_registry_find(s->registry, MT_PLUGIN_ADAPTER, name, err);
    if (!p) return err && err->status ? err->status : MT_ERR_INVALID_ARG;
    if ((st = mt_plugin_instantiate(p, options, n_options, &s->adapter, err))) return st;
    /* the instance stays the session's whatever the attach says: a refused attach left
     * nothing on the model, and one that failed halfway must still go after the model */
    return mt_model_attach_adapter(s->model, s->adapter->desc->vtable, s->adapter->state, err);
}

static mt_status open_model(mt_session *s, const mt_session_options *opt, mt_error *err) {
    mt_status st;
    if (opt->model_path) return mt_model_load(opt->model_path, &s->be, &s->model, err);
    if (!opt->config)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "open session: give a model path or a config");
    if ((st = mt_model_create(opt->config, &s->be, &s->model, err))) return st;
    return mt_model_init_random(s->model, opt->random_seed, opt->random_std, err);
}

mt_status mt_session_open(const mt_session_options *opt, mt_session **out, mt_error *err) {
    *out = NULL;
    if (opt->adapter_dir && opt->adapter)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "give an adapter directory or an adapter plugin, not both "
                            "(%s and %s)", opt->adapter_dir, opt->adapter);
    if (opt->with_tokenizer && !opt->model_path)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "a tokenizer needs a model path (a config carries none)");
    mt_session *s = mt_calloc(1, sizeof *s, "the session", err);
    if (!s) return MT_ERR_NOMEM;
    mt_status st = mt_device_backend_start(opt->device_origin, opt->device, opt->threads, &s->be,
                                           s->cuda_unavailable, sizeof s->cuda_unavailable, err);
    if (st) {
        free(s);
        return st;
    }
    s->have_be = 1;
    snprintf(s->device, sizeof s->device, "%s", s->be.name ? s->be.name : "?");
    /* the tokenizer first: it is cheap, and a model directory without one is refused
     * before its weights are read */
    if ((opt->with_tokenizer && (st = mt_tokenizer_load(opt->model_path, &s->tok, err))) ||
        (st = open_model(s, opt, err)) ||
        (opt->adapter_dir && (st = mt_peft_load(s->model, opt->adapter_dir, &s->registry,
                                                &s->adapter, err))) ||
        (opt->adapter && (st = mt_session_attach_adapter(s, opt->adapter, opt->adapter_options,
                                                         opt->n_adapter_options, err)))) {
        mt_session_close(s);
        return st;
    }
    *out = s;
    return MT_OK;
}

void mt_session_release_model(mt_session *s) {
    if (!s) return;
    mt_model_free(s->model); /* before the adapter its projections call into */
    s->model = NULL;
    mt_plugin_instance_free(s->adapter);
    s->adapter = NULL;
}

void mt_session_close(mt_session *s) {
    if (!s) return;
    mt_session_release_model(s);
    mt_registry_close(s->registry); /* after every instance of its plugins */
    mt_tokenizer_free(s->tok);
    /* last: the model, the adapter and their device memory are gone */
    if (s->have_be) mt_device_backend_stop(&s->be);
    free(s);
}
