/* cmd_export.c — `moontune export`: a trained model as a PEFT adapter, a merged Hugging
 * Face directory or a GGUF file, from a run directory, a checkpoint or a PEFT adapter,
 * without writing a recipe.
 *
 * A checkpoint records its adapter plugin and that adapter's validated options
 * (store/checkpoint.h), so the adapter is rebuilt as it was trained, attached to the
 * base model, and the checkpoint's weights loaded onto it (the checkpoint verifies its
 * files and that the base model is the one it was trained from). Checkpoints written
 * before the options were recorded need them again as --adapter-option. */
#include "cli/cmd_export.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "cli/cli_args.h"
#include "store/checkpoint.h"
#include "store/export_gguf.h"
#include "store/export_hf.h"
#include "store/session.h"


static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune export --model PATH [--run DIR | --checkpoint DIR | --adapter DIR]\n"
            "                       --to peft|merged|gguf [options] OUT\n"
            "\n"
            "Writes a trained model where other tools load it:\n"
            "  peft    a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)\n"
            "  merged  a transformers model directory with the adapter merged in\n"
            "  gguf    one GGUF file with the adapter merged in, tokenizer and chat template\n"
            "\n"
            "  --model PATH          the base model the run trained (.gguf or Hugging Face dir)\n"
            "  --run DIR             a run directory: its newest checkpoint\n"
            "  --checkpoint DIR      one checkpoint (DIR/checkpoints/step-N)\n"
            "  --adapter DIR         a PEFT adapter directory\n"
            "                        (none of the three: the base model itself, converted)\n"
            "  --adapter-option K=V  an option of the checkpoint's adapter, for checkpoints\n"
            "                        that do not record them (repeatable)\n"
            "  --to FORMAT           peft | merged | gguf\n"
            "  --type T              GGUF weights: f32 | f16 | bf16 | q8_0 (default f16)\n"
            "  --name NAME           GGUF general.name (default: the model type)\n"
            "  --device D            cpu | cuda\n"
            "  --threads N           CPU threads\n");
}

enum { OPT_MODEL = 256, OPT_RUN, OPT_CHECKPOINT, OPT_ADAPTER, OPT_ADAPTER_OPTION, OPT_TO,
       OPT_TYPE, OPT_NAME, OPT_THREADS };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"model", required_argument, NULL, OPT_MODEL},
    {"run", required_argument, NULL, OPT_RUN},
    {"checkpoint", required_argument, NULL, OPT_CHECKPOINT},
    {"adapter", required_argument, NULL, OPT_ADAPTER},
    {"adapter-option", required_argument, NULL, OPT_ADAPTER_OPTION},
    {"to", required_argument, NULL, OPT_TO},
    {"type", required_argument, NULL, OPT_TYPE},
    {"name", required_argument, NULL, OPT_NAME},
    {"threads", required_argument, NULL, OPT_THREADS},
    MT_CLI_DEVICE_OPTION,
    {NULL, 0, NULL, 0},
};

typedef enum { TO_NONE, TO_PEFT, TO_MERGED, TO_GGUF } export_format;

/* The adapter a checkpoint was trained with: its name and options, the recorded ones
 * first, then those of the command line (which replace a recorded key). */
typedef struct adapter_spec {
    char name[64];
    mt_kv kv[MT_CLI_MAX_ADAPTER_OPTIONS];
    size_t n;
    json_t *recorded; /* owns the recorded options' strings */
    const char **lists[MT_CLI_MAX_ADAPTER_OPTIONS];
} adapter_spec;

static void adapter_spec_free(adapter_spec *a) {
    for (size_t i = 0; i < MT_CLI_MAX_ADAPTER_OPTIONS; i++) free(a->lists[i]);
    json_decref(a->recorded);
}

static mt_status add_option(adapter_spec *a, const mt_kv *kv, mt_error *err) {
    for (size_t i = 0; i < a->n; i++)
        if (!strcmp(a->kv[i].key, kv->key)) {
            a->kv[i] = *kv;
            return MT_OK;
        }
    if (a->n == MT_CLI_MAX_ADAPTER_OPTIONS)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "at most %d adapter options",
                            MT_CLI_MAX_ADAPTER_OPTIONS);
    a->kv[a->n++] = *kv;
    return MT_OK;
}

/* The recorded options (a JSON object of booleans, numbers, strings and string lists) as
 * key/values for the plugin's schema to check. */
static mt_status recorded_options(adapter_spec *a, const char *text, const char *dir,
                                  mt_error *err) {
    json_error_t jerr;
    if (!(a->recorded = json_loads(text, 0, &jerr)) || !json_is_object(a->recorded))
        return mt_error_set(err, MT_ERR_FORMAT, "%s/state.json: the adapter's options are not "
                            "a JSON object", dir);
    const char *key;
    json_t *v;
    mt_status st = MT_OK;
    json_object_foreach (a->recorded, key, v) {
        if (a->n == MT_CLI_MAX_ADAPTER_OPTIONS)
            return mt_error_set(err, MT_ERR_FORMAT, "%s/state.json: more than %d adapter options",
                                dir, MT_CLI_MAX_ADAPTER_OPTIONS);
        mt_kv kv = {.key = key};
        if (json_is_boolean(v)) {
            kv.type = MT_KV_BOOL;
            kv.boolean = json_is_true(v);
        } else if (json_is_number(v)) {
            kv.type = MT_KV_NUMBER;
            kv.number = json_number_value(v);
        } else if (json_is_string(v)) {
            kv.type = MT_KV_STRING;
            kv.string = json_string_value(v);
        } else if (json_is_array(v)) {
            size_t n = json_array_size(v);
            const char **list = mt_calloc(n ? n : 1, sizeof *list, "adapter option", err);
            if (!list) return MT_ERR_NOMEM;
            a->lists[a->n] = list;
            for (size_t i = 0; i < n; i++)
                if (!(list[i] = json_string_value(json_array_get(v, i))))
                    return mt_error_set(err, MT_ERR_FORMAT,
                                        "%s/state.json: adapter option '%s': a list of strings "
                                        "expected", dir, key);
            kv.type = MT_KV_LIST;
            kv.list = list;
            kv.list_len = (int)n;
        } else {
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s/state.json: adapter option '%s' has a value of no option type",
                                dir, key);
        }
        if ((st = add_option(a, &kv, err))) return st;
    }
    return MT_OK;
}

/* Reads the checkpoint's state: which adapter, with which options (its data files are
 * checked when the checkpoint is loaded onto the model). */
static mt_status checkpoint_adapter(const char *dir, adapter_spec *a, mt_error *err) {
    mt_ckpt_state state = {0};
    mt_status st = mt_checkpoint_read_state(dir, &state, err);
    if (st) return st;
    const mt_ckpt_plugin *p = NULL;
    for (int i = 0; i < state.n_plugins; i++)
        if (!strcmp(state.plugins[i].kind, "adapter")) p = &state.plugins[i];
    if (!p) {
        st = mt_error_set(err, MT_ERR_UNSUPPORTED,
                          "%s: the checkpoint records no adapter plugin, so its weights cannot "
                          "be placed on the base model", dir);
    } else {
        snprintf(a->name, sizeof a->name, "%s", p->name);
        if (p->options) st = recorded_options(a, p->options, dir, err);
        else if (!a->n)
            fprintf(stderr,
                    "moontune export: %s records no options of adapter '%s' (written before "
                    "they were recorded): using its defaults and any --adapter-option\n",
                    dir, a->name);
    }
    mt_ckpt_state_clear(&state);
    return st;
}

int mt_cmd_export(int argc, char **argv) {
    const char *model_path = NULL, *run_dir = NULL, *checkpoint = NULL, *adapter_dir = NULL;
    const char *out = NULL, *device = NULL, *gguf_name = NULL;
    export_format to = TO_NONE;
    mt_ggml_type type = MT_GGML_F16;
    int threads = 0;
    static mt_cli_adapter_options cli_options; /* static: 2.5 KiB, off the stack */
    cli_options.n = 0;
    const mt_cli_number numbers[] = {{OPT_THREADS, MT_CLI_INT, &MT_LIMIT_THREADS, &threads}};
    const mt_cli cli = {"moontune export", options, usage, numbers, 1};
    mt_error err = {0};
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: return 0;
        case MT_CLI_REFUSED: return 2;
        case MT_CLI_POSITIONAL:
            if (out) {
                fprintf(stderr, "moontune export: one output path, got \"%s\" and \"%s\"\n", out, v);
                return 2;
            }
            out = v;
            break;
        case OPT_MODEL: model_path = v; break;
        case OPT_RUN: run_dir = v; break;
        case OPT_CHECKPOINT: checkpoint = v; break;
        case OPT_ADAPTER: adapter_dir = v; break;
        case OPT_NAME: gguf_name = v; break;
        case MT_CLI_DEVICE: device = v; break;
        case OPT_ADAPTER_OPTION:
            if (mt_cli_adapter_option(&cli_options, flag, v, &err)) {
                fprintf(stderr, "moontune export: %s\n", err.msg);
                return 2;
            }
            break;
        case OPT_TO:
            if (!strcmp(v, "peft")) to = TO_PEFT;
            else if (!strcmp(v, "merged")) to = TO_MERGED;
            else if (!strcmp(v, "gguf")) to = TO_GGUF;
            else {
                fprintf(stderr, "moontune export: --to expects peft, merged or gguf, got \"%s\"\n", v);
                return 2;
            }
            break;
        case OPT_TYPE:
            if (mt_export_gguf_type_parse(v, &type)) {
                fprintf(stderr, "moontune export: --type expects f32, f16, bf16 or q8_0, got \"%s\"\n", v);
                return 2;
            }
            break;
        }
    }
    if (!model_path || !out || to == TO_NONE) {
        fprintf(stderr, "moontune export: give --model, --to and the output path\n");
        usage(stderr);
        return 2;
    }
    if ((run_dir != NULL) + (checkpoint != NULL) + (adapter_dir != NULL) > 1) {
        fprintf(stderr, "moontune export: give one of --run, --checkpoint and --adapter\n");
        return 2;
    }
    if (cli_options.n && !run_dir && !checkpoint) {
        fprintf(stderr, "moontune export: --adapter-option is for a checkpoint's adapter "
                        "(--run or --checkpoint)\n");
        return 2;
    }
    if (to == TO_PEFT && !run_dir && !checkpoint && !adapter_dir) {
        fprintf(stderr, "moontune export: --to peft needs an adapter: --run, --checkpoint or "
                        "--adapter\n");
        return 2;
    }

    int rc = 1;
    char *latest = NULL;
    adapter_spec spec = {0};
    mt_session *ses = NULL;
    mt_status st = MT_OK;
    if (run_dir) {
        if ((st = mt_checkpoint_latest(run_dir, &latest, &err))) goto done;
        if (!latest) {
            st = mt_error_set(&err, MT_ERR_IO, "%s: no checkpoint under %s/checkpoints",
                              run_dir, run_dir);
            goto done;
        }
        checkpoint = latest;
    }
    if (checkpoint) {
        if ((st = checkpoint_adapter(checkpoint, &spec, &err))) goto done;
        for (size_t i = 0; i < cli_options.n; i++)
            if ((st = add_option(&spec, &cli_options.kv[i], &err))) goto done;
    }
    const mt_session_options so = {
        .device = device, .threads = threads, .model_path = model_path,
        .with_tokenizer = to != TO_PEFT, /* merged and GGUF exports carry the tokenizer */
        .adapter_dir = adapter_dir, .adapter = checkpoint ? spec.name : NULL,
        .adapter_options = spec.kv, .n_adapter_options = spec.n};
    if ((st = mt_session_open(&so, &ses, &err))) goto done;
    if (checkpoint) {
        if ((st = mt_checkpoint_load(checkpoint, ses->model, NULL, NULL, NULL, &err))) goto done;
        printf("moontune export: %s (adapter %s) on %s\n", checkpoint, spec.name, model_path);
    }
    switch (to) {
    case TO_PEFT:
        st = mt_export_peft(ses->model, ses->adapter, model_path, out, &err);
        break;
    case TO_MERGED:
        st = mt_export_merged_hf(ses->model, ses->adapter, ses->tok, out, &err);
        break;
    case TO_GGUF:
        st = mt_export_gguf_merged(ses->model, ses->adapter, ses->tok, out, type, gguf_name, &err);
        break;
    case TO_NONE: break;
    }
    if (!st) {
        printf("moontune export: wrote %s\n", out);
        rc = 0;
    }
done:
    if (st) fprintf(stderr, "moontune export: %s\n", err.msg);
    mt_session_close(ses);
    adapter_spec_free(&spec);
    free(latest);
    return rc;
}
