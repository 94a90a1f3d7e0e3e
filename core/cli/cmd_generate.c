/* cmd_generate.c — `moontune generate --model PATH --prompt TEXT [options]`. */
#include "cli/cmd_generate.h"

#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/generate.h"
#include "base/internal.h"
#include "base/numparse.h"
#include "cli/cli_args.h"
#include "lua/lua_state.h"
#include "lua/chat_render.h"
#include "store/session.h"

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
            "  --template NAME        auto (the model's own chat template; default) | jinja (it,\n"
            "                         always through the Jinja engine) | chatml | smollm2 |\n"
            "                         qwen2 | llama3 | llama2 | mistral | alpaca |\n"
            "                         none (the prompt is tokenized as it is, with BOS)\n"
            "  --max-new-tokens N     (default 256)\n"
            "  --temperature T        0 = greedy (default 0)\n"
            "  --top-k K              0 = off (default 0)\n"
            "  --top-p P              1 = off (default 1)\n"
            "  --seed S               sampling seed (default 42)\n"
            "  --stop STR             stop before this text (repeatable, up to 8)\n"
            "  --fp32                 every product in fp32 (default: the weights in int8 where\n"
            "                         the CPU has AVX512-VNNI or AVX2, inputs quantised to 8\n"
            "                         bits)\n"
            "  --device D             cpu | cuda (default: cuda where a CUDA device is usable,\n"
            "                         else cpu)\n"
            "  --threads N            CPU threads (default: OpenMP's)\n");
}

typedef struct gen_args {
    const char *model, *adapter, *prompt, *system, *template_name, *device;
    const char *stops[8];
    int n_stops;
    int max_new_tokens, threads;
    int fp32;
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
    int rc = 1;
    mt_session *ses = NULL;
    char *text = NULL;
    mt_token_list ids = {0};
    mt_generation gen = {0};
    mt_status st;
    double t0 = mt_now_seconds();
    const mt_session_options so = {.device = a->device, .threads = a->threads,
                                   .model_path = a->model, .with_tokenizer = 1,
                                   .adapter_dir = a->adapter};
    if ((st = mt_session_open(&so, &ses, &err))) goto done;
    const mt_tokenizer *tok = ses->tok;
    mt_model *m = ses->model;
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
                               .on_text = stream,
                               .fp32 = a->fp32};
    fprintf(stderr, "moontune generate: %s%s%s (%s, %zu parameters, loaded in %.1f s), template %s, "
            "%zu prompt tokens, on %s",
            a->model, a->adapter ? " + adapter " : "", a->adapter ? a->adapter : "",
            m->cfg.model_type, mt_config_num_params(&m->cfg), t_load, resolved, ids.n,
            ses->device);
    if (ses->be.device == MT_DEVICE_CPU) fprintf(stderr, " (%d threads)", ses->be.num_threads);
    fputc('\n', stderr);
    if ((st = mt_generate(m, tok, ids.ids, (int)ids.n, &opt, &gen, &err))) goto done;
    static const char *const reasons[MT_STOP_REASONS] = {"length",   "eos",     "stop string",
                                                         "callback", "context", "mismatch"};
    printf("\n");
    fflush(stdout);
    fprintf(stderr,
            "moontune generate: %d tokens (stop: %s); prefill %.1f tokens/s, generation "
            "%.1f tokens/s; %d projections in int8\n",
            gen.n_ids, reasons[gen.reason], gen.prefill_seconds > 0 ? ids.n / gen.prefill_seconds : 0.0,
            gen.n_ids > 1 && gen.decode_seconds > 0 ? (gen.n_ids - 1) / gen.decode_seconds : 0.0,
            gen.int8);
    rc = 0;
done:
    if (rc) fprintf(stderr, "moontune generate: %s\n", err.msg);
    mt_generation_free(&gen);
    mt_token_list_free(&ids);
    free(text);
    mt_session_close(ses);
    return rc;
}

enum { OPT_MODEL = 256, OPT_ADAPTER, OPT_PROMPT, OPT_SYSTEM, OPT_TEMPLATE, OPT_STOP,
       OPT_MAX_NEW_TOKENS, OPT_THREADS, OPT_TOP_K, OPT_TEMPERATURE, OPT_TOP_P, OPT_SEED,
       OPT_FP32 };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"model", required_argument, NULL, OPT_MODEL},
    {"adapter", required_argument, NULL, OPT_ADAPTER},
    {"prompt", required_argument, NULL, OPT_PROMPT},
    {"system", required_argument, NULL, OPT_SYSTEM},
    {"template", required_argument, NULL, OPT_TEMPLATE},
    {"stop", required_argument, NULL, OPT_STOP},
    {"fp32", no_argument, NULL, OPT_FP32},
    {"max-new-tokens", required_argument, NULL, OPT_MAX_NEW_TOKENS},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"top-k", required_argument, NULL, OPT_TOP_K},
    {"temperature", required_argument, NULL, OPT_TEMPERATURE},
    {"top-p", required_argument, NULL, OPT_TOP_P},
    {"seed", required_argument, NULL, OPT_SEED},
    MT_CLI_DEVICE_OPTION,
    {NULL, 0, NULL, 0},
};

int mt_cmd_generate(int argc, char **argv) {
    gen_args a = {.template_name = "auto", .max_new_tokens = 256};
    a.sampling = (mt_sampling){.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 42};
    const mt_cli_number numbers[] = {
        {OPT_MAX_NEW_TOKENS, MT_CLI_INT, &MT_LIMIT_MAX_NEW_TOKENS, &a.max_new_tokens},
        {OPT_THREADS, MT_CLI_INT, &MT_LIMIT_THREADS, &a.threads},
        {OPT_TOP_K, MT_CLI_INT, &MT_LIMIT_TOP_K, &a.sampling.top_k},
        {OPT_TEMPERATURE, MT_CLI_FLOAT, &MT_LIMIT_TEMPERATURE, &a.sampling.temperature},
        {OPT_TOP_P, MT_CLI_FLOAT, &MT_LIMIT_TOP_P, &a.sampling.top_p},
        {OPT_SEED, MT_CLI_SEED, NULL, &a.sampling.seed},
    };
    const mt_cli cli = {"moontune generate", options, usage, numbers, sizeof numbers / sizeof *numbers};
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: return 0;
        case MT_CLI_REFUSED: return 2;
        case MT_CLI_POSITIONAL:
            fprintf(stderr, "moontune generate: unexpected argument '%s' (the prompt goes after --prompt)\n", v);
            usage(stderr);
            return 2;
        case OPT_MODEL: a.model = v; break;
        case OPT_ADAPTER: a.adapter = v; break;
        case MT_CLI_DEVICE: a.device = v; break;
        case OPT_PROMPT: a.prompt = v; break;
        case OPT_SYSTEM: a.system = v; break;
        case OPT_TEMPLATE: a.template_name = v; break;
        case OPT_FP32: a.fp32 = 1; break;
        case OPT_STOP:
            if (!*v || a.n_stops == 8) {
                fprintf(stderr, "moontune generate: --stop takes a non-empty string, at most 8 times\n");
                return 2;
            }
            a.stops[a.n_stops++] = v;
            break;
        }
    }
    if (!a.model || !a.prompt) {
        fprintf(stderr, "moontune generate: give --model and --prompt\n");
        usage(stderr);
        return 2;
    }
    return run(&a);
}
