/* cmd_generate.c — `moontune generate --model PATH --prompt TEXT [options]`. */
#include "cli/cmd_generate.h"

#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/generate.h"
#include "base/internal.h"
#include "base/numparse.h"
#include "lua/lua_state.h"
#include "store/peft.h"
#include "lua/chat_render.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune generate --model PATH --prompt TEXT [options]\n"
            "\n"
            "Loads a model, renders the prompt as a user turn with the chat template and\n"
            "streams the generated text to stdout (statistics go to stderr).\n"
            "\n"
            "  --model PATH           a .gguf file or a Hugging Face model directory\n"
            "  --adapter DIR          a PEFT LoRA adapter directory (adapter_config.json +\n"
            "                         adapter_model.safetensors) applied on top of --model\n"
            "  --prompt TEXT          the user message (or the raw text with --template none)\n"
            "  --system TEXT          a system message before it\n"
            "  --template NAME        chatml | smollm2 | qwen2 | llama3 | llama2 | mistral |\n"
            "                         alpaca | auto (detect from the tokenizer; default) |\n"
            "                         none (the prompt is tokenized as it is, with BOS)\n"
            "  --max-new-tokens N     (default 256)\n"
            "  --temperature T        0 = greedy (default 0)\n"
            "  --top-k K              0 = off (default 0)\n"
            "  --top-p P              1 = off (default 1)\n"
            "  --seed S               sampling seed (default 42)\n"
            "  --stop STR             stop before this text (repeatable, up to 8)\n"
            "  --threads N            CPU threads (default: OpenMP's)\n");
}

typedef struct gen_args {
    const char *model, *adapter, *prompt, *system, *template_name;
    const char *stops[8];
    int n_stops;
    int max_new_tokens, threads;
    mt_sampling sampling;
} gen_args;

/* The chat template renders {system?, user} with the generation prompt. */
static mt_status render_prompt(const mt_tokenizer *tok, const gen_args *a, char **text,
                               size_t *len, char *resolved_out, size_t resolved_size,
                               mt_error *err) {
    lua_State *L = mt_lua_open(err);
    if (!L) return err ? err->status : MT_ERR_NOMEM;
    const char *resolved = NULL;
    mt_status st = mt_chat_template_push(L, tok, a->template_name, &resolved, err);
    if (st) goto done;
    /* the name lives in the Lua state, which closes below */
    snprintf(resolved_out, resolved_size, "%s", resolved ? resolved : "(unnamed)");
    int n = 0;
    lua_newtable(L); /* messages */
    if (a->system) {
        lua_createtable(L, 0, 2);
        lua_pushstring(L, "system");
        lua_setfield(L, -2, "role");
        lua_pushstring(L, a->system);
        lua_setfield(L, -2, "content");
        lua_rawseti(L, -2, ++n);
    }
    lua_createtable(L, 0, 2);
    lua_pushstring(L, "user");
    lua_setfield(L, -2, "role");
    lua_pushstring(L, a->prompt);
    lua_setfield(L, -2, "content");
    lua_rawseti(L, -2, ++n);
    lua_createtable(L, 0, 3); /* opts */
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "add_generation_prompt");
    int32_t bos = mt_tokenizer_bos(tok), eos = mt_tokenizer_eos(tok);
    if (bos >= 0) {
        lua_pushstring(L, mt_tokenizer_token_text(tok, bos));
        lua_setfield(L, -2, "bos");
    }
    if (eos >= 0) {
        lua_pushstring(L, mt_tokenizer_token_text(tok, eos));
        lua_setfield(L, -2, "eos");
    }
    if ((st = mt_lua_pcall(L, 2, 2, err))) goto done;
    size_t n_text;
    const char *s = lua_tolstring(L, -2, &n_text);
    if (!s) {
        st = mt_error_set(err, MT_ERR_INVALID_ARG, "the chat template returned no text");
        goto done;
    }
    if (!(*text = mt_malloc(n_text + 1, "prompt text", err))) {
        st = MT_ERR_NOMEM;
        goto done;
    }
    memcpy(*text, s, n_text + 1);
    *len = n_text;
done:
    lua_close(L);
    return st;
}

static int stream(void *user, const char *piece, size_t len) {
    (void)user;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0;
}

static int run(const gen_args *a) {
    mt_error err = {0};
    mt_backend be;
    int have_be = 0, rc = 1;
    mt_model *m = NULL;
    mt_registry *reg = NULL;
    mt_plugin_instance *adapter = NULL;
    mt_tokenizer *tok = NULL;
    char *text = NULL;
    mt_token_list ids = {0};
    mt_generation gen = {0};
    mt_status st;
    if ((st = mt_backend_cpu_init(&be, a->threads, &err))) goto done;
    have_be = 1;
    double t0 = mt_now_seconds();
    if ((st = mt_tokenizer_load(a->model, &tok, &err)) ||
        (st = mt_model_load(a->model, &be, &m, &err)))
        goto done;
    if (a->adapter && (st = mt_peft_load(m, a->adapter, &reg, &adapter, &err))) goto done;
    double t_load = mt_now_seconds() - t0;
    char resolved[64] = "none";
    size_t len = 0;
    if (!strcmp(a->template_name, "none")) {
        if (a->system) {
            st = mt_error_set(&err, MT_ERR_INVALID_ARG, "--system needs a chat template");
            goto done;
        }
        if ((st = mt_tokenizer_encode(tok, a->prompt, strlen(a->prompt), 1, &ids, &err))) goto done;
    } else {
        if ((st = render_prompt(tok, a, &text, &len, resolved, sizeof resolved, &err))) goto done;
        if ((st = mt_tokenizer_encode(tok, text, len, 0, &ids, &err))) goto done;
    }
    /* generation ends at EOS and at the end-of-turn markers chat models emit */
    int32_t stop_ids[MT_CHAT_STOP_IDS_MAX];
    int n_stop_ids = mt_chat_stop_ids(tok, stop_ids);
    mt_generate_options opt = {.max_new_tokens = a->max_new_tokens,
                               .sampling = a->sampling,
                               .stop_ids = stop_ids,
                               .n_stop_ids = n_stop_ids,
                               .stop_strings = a->stops,
                               .n_stop_strings = a->n_stops,
                               .skip_special = 1,
                               .on_text = stream};
    fprintf(stderr, "moontune generate: %s%s%s (%s, %zu parameters, loaded in %.1f s), template %s, "
            "%zu prompt tokens, %d threads\n",
            a->model, a->adapter ? " + adapter " : "", a->adapter ? a->adapter : "",
            m->cfg.model_type, mt_config_num_params(&m->cfg), t_load, resolved, ids.n,
            be.num_threads);
    if ((st = mt_generate(m, tok, ids.ids, (int)ids.n, &opt, &gen, &err))) goto done;
    static const char *const reasons[] = {"length", "eos", "stop string", "callback", "context"};
    printf("\n");
    fflush(stdout);
    fprintf(stderr,
            "moontune generate: %d tokens (stop: %s); prefill %.1f tokens/s, generation "
            "%.1f tokens/s\n",
            gen.n_ids, reasons[gen.reason], gen.prefill_seconds > 0 ? ids.n / gen.prefill_seconds : 0.0,
            gen.n_ids > 1 && gen.decode_seconds > 0 ? (gen.n_ids - 1) / gen.decode_seconds : 0.0);
    rc = 0;
done:
    if (rc) fprintf(stderr, "moontune generate: %s\n", err.msg);
    mt_generation_free(&gen);
    mt_token_list_free(&ids);
    free(text);
    mt_tokenizer_free(tok);
    mt_model_free(m); /* before the adapter its projections point into */
    mt_plugin_instance_free(adapter);
    mt_registry_close(reg);
    if (have_be) mt_backend_cpu_shutdown(&be);
    return rc;
}

int mt_cmd_generate(int argc, char **argv) {
    gen_args a = {.template_name = "auto", .max_new_tokens = 256};
    a.sampling = (mt_sampling){.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 42};
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        mt_error perr = {0};
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) {
            usage(stdout);
            return 0;
        } else if (!v) {
            fprintf(stderr, "moontune generate: %s needs a value\n", o);
            return 2;
        } else if (!strcmp(o, "--model")) {
            a.model = v;
        } else if (!strcmp(o, "--adapter")) {
            a.adapter = v;
        } else if (!strcmp(o, "--prompt")) {
            a.prompt = v;
        } else if (!strcmp(o, "--system")) {
            a.system = v;
        } else if (!strcmp(o, "--template")) {
            a.template_name = v;
        } else if (!strcmp(o, "--stop") && a.n_stops < 8 && *v) {
            a.stops[a.n_stops++] = v;
        } else if (!strcmp(o, "--max-new-tokens")) {
            if (mt_parse_int_into(o, v, &MT_LIMIT_MAX_NEW_TOKENS, &a.max_new_tokens, &perr)) goto refused;
        } else if (!strcmp(o, "--threads")) {
            if (mt_parse_int_into(o, v, &MT_LIMIT_THREADS, &a.threads, &perr)) goto refused;
        } else if (!strcmp(o, "--top-k")) {
            if (mt_parse_int_into(o, v, &MT_LIMIT_TOP_K, &a.sampling.top_k, &perr)) goto refused;
        } else if (!strcmp(o, "--temperature")) {
            if (mt_parse_float_into(o, v, &MT_LIMIT_TEMPERATURE, &a.sampling.temperature, &perr)) goto refused;
        } else if (!strcmp(o, "--top-p")) {
            if (mt_parse_float_into(o, v, &MT_LIMIT_TOP_P, &a.sampling.top_p, &perr)) goto refused;
        } else if (!strcmp(o, "--seed")) {
            if (mt_parse_u64(o, v, &a.sampling.seed, &perr)) goto refused;
        } else {
            goto bad;
        }
        i++;
        continue;
    bad:
        fprintf(stderr, "moontune generate: bad option or value: %s %s\n", o, v ? v : "");
        usage(stderr);
        return 2;
    refused:
        fprintf(stderr, "moontune generate: %s\n", perr.msg);
        return 2;
    }
    if (!a.model || !a.prompt) {
        fprintf(stderr, "moontune generate: give --model and --prompt\n");
        usage(stderr);
        return 2;
    }
    return run(&a);
}
