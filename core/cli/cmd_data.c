/* cmd_data.c — `moontune data FILE.jsonl --tokenizer PATH ...`. */
#include "cli/cmd_data.h"

#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/dataset.h"
#include "base/internal.h"
#include "lua/lua_state.h"
#include "base/numparse.h"
#include "cli/cli_args.h"
#include "lua/chat_render.h"
#include "text/tokenizer.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune data FILE.jsonl [FILE.jsonl ...] --tokenizer PATH [options]\n"
            "\n"
            "Reads the records, renders them with the chat template, tokenizes them with the\n"
            "loss mask and prints the statistics a training run would start from.\n"
            "\n"
            "  --tokenizer PATH       a model directory (tokenizer.json) or a .gguf file\n"
            "  --template NAME        auto (the model's own chat template; default) | jinja (it,\n"
            "                         always through the Jinja engine) | chatml | smollm2 |\n"
            "                         qwen2 | llama3 | llama2 | mistral | alpaca\n"
            "  --format F             auto | alpaca | chat | prompt_completion | text (default auto)\n"
            "  --seq N                sequence length (default 512)\n"
            "  --truncation P         left (drop prompt tokens, keep the response) | drop\n"
            "  --on-bad-record P      error | skip (default error)\n"
            "  --heldout FRACTION     held-out fraction of the records (default 0)\n"
            "  --heldout-file FILE    held-out records from their own file instead\n"
            "  --seed N               shuffling and split seed (default 42)\n"
            "  --train-on-inputs      train on every token, not just the responses\n"
            "  --batch B              rows per batch, to count packed batches (default 8)\n");
}

typedef struct data_args {
    const char *files[16];
    int n_files;
    const char *tokenizer, *template_name, *heldout_file;
    mt_jsonl_options jsonl;
    mt_example_options ex;
    double heldout;
    uint64_t seed;
    int batch;
} data_args;

/* The columns an epoch of packed batches computes (rows times their longest row), and
 * with the prompt prefix their examples share laid out once per row (the trainer's
 * default, mt_batch_share_prefix). */
static mt_status print_shared_columns(mt_batcher *b, int B, int T, mt_error *err) {
    const size_t n = (size_t)B * (size_t)T;
    int32_t *buf = mt_malloc(4 * n * sizeof *buf, "batch", err);
    if (!buf) return MT_ERR_NOMEM;
    int32_t *tok = buf, *pos = buf + n, *seg = buf + 2 * n, *tgt = buf + 3 * n;
    int64_t packed = 0, shared = 0;
    mt_status st = MT_OK;
    for (mt_batch_info info = {0}; !info.epoch_end;) {
        if ((st = mt_batcher_next(b, tok, pos, seg, tgt, NULL, &info, err))) break;
        const int width = mt_batch_narrow(tok, pos, seg, tgt, B, T, info.longest);
        int rows, cols;
        if ((st = mt_batch_share_prefix(tok, pos, seg, tgt, B, width, 1, &rows, &cols, err))) break;
        packed += (int64_t)B * width;
        shared += (int64_t)rows * cols;
    }
    if (!st && packed > 0)
        printf("  columns per epoch         %lld packed, %lld with the shared prompt prefix "
               "(%.1f%%)\n", (long long)packed, (long long)shared, 100.0 * (double)shared / (double)packed);
    free(buf);
    return st;
}

/* Examples of one record set, statistics printed under `title`. */
static mt_status report(lua_State *L, const mt_tokenizer *tok, const data_args *a,
                        const mt_record_set *records, const char *title, mt_error *err) {
    mt_example_set examples;
    mt_status st = mt_example_set_init(&examples, &a->ex, err);
    if (st) return st;
    if (!(st = mt_examples_from_records(L, tok, records, &examples, err))) {
        mt_dataset_stats stats;
        mt_dataset_stats_compute(records, &examples, &stats);
        mt_dataset_stats_print(&stats, title, stdout);
        mt_batcher *b = NULL;
        if (examples.n > 0 &&
            !(st = mt_batcher_create(&examples, a->batch, a->ex.seq_len, 1, a->seed, 1, &b, err))) {
            int64_t packed = mt_batcher_batches_per_epoch(b, 0);
            printf("  packed batches per epoch  %lld of %d x %d (unpacked: %lld)\n",
                   (long long)packed, a->batch, a->ex.seq_len,
                   (long long)((examples.n + (size_t)a->batch - 1) / (size_t)a->batch));
            st = print_shared_columns(b, a->batch, a->ex.seq_len, err);
            mt_batcher_free(b);
        }
    }
    mt_example_set_free(&examples);
    return st;
}

static int run(const data_args *a) {
    mt_error err = {0};
    mt_tokenizer *tok = NULL;
    lua_State *L = NULL;
    mt_record_set all, train, heldout;
    mt_record_set_init(&all);
    mt_record_set_init(&train);
    mt_record_set_init(&heldout);
    int rc = 1;
    mt_status st = mt_tokenizer_load(a->tokenizer, &tok, &err);
    for (int i = 0; !st && i < a->n_files; i++) st = mt_records_load(a->files[i], &a->jsonl, &all, &err);
    if (!st && a->heldout_file) st = mt_records_load(a->heldout_file, &a->jsonl, &heldout, &err);
    if (st) goto done;
    mt_record_set_print_bad(&all, stderr);
    if (!(L = mt_lua_open(&err))) goto done;
    const char *resolved = NULL;
    if ((st = mt_chat_template_push(L, tok, a->template_name, &resolved, &err))) goto done;
    printf("moontune data: %d file(s), tokenizer %s, template %s, sequence length %d\n",
           a->n_files, a->tokenizer, resolved ? resolved : "(recipe function)", a->ex.seq_len);
    if (!a->heldout_file && a->heldout > 0.0) {
        if ((st = mt_record_set_split(&all, a->heldout, a->seed, &train, &heldout, &err))) goto done;
        if ((st = report(L, tok, a, &train, "training", &err)) ||
            (st = report(L, tok, a, &heldout, "held-out", &err)))
            goto done;
    } else {
        if ((st = report(L, tok, a, &all, "training", &err))) goto done;
        if (a->heldout_file && (st = report(L, tok, a, &heldout, "held-out", &err))) goto done;
    }
    rc = 0;
done:
    if (rc) fprintf(stderr, "moontune data: %s\n", err.msg);
    if (L) lua_close(L);
    mt_record_set_free(&all);
    mt_record_set_free(&train);
    mt_record_set_free(&heldout);
    mt_tokenizer_free(tok);
    return rc;
}

enum { OPT_TRAIN_ON_INPUTS = 256, OPT_TOKENIZER, OPT_TEMPLATE, OPT_HELDOUT_FILE, OPT_FORMAT,
       OPT_TRUNCATION, OPT_ON_BAD_RECORD, OPT_SEQ, OPT_BATCH, OPT_SEED, OPT_HELDOUT };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"train-on-inputs", no_argument, NULL, OPT_TRAIN_ON_INPUTS},
    {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
    {"template", required_argument, NULL, OPT_TEMPLATE},
    {"heldout-file", required_argument, NULL, OPT_HELDOUT_FILE},
    {"format", required_argument, NULL, OPT_FORMAT},
    {"truncation", required_argument, NULL, OPT_TRUNCATION},
    {"on-bad-record", required_argument, NULL, OPT_ON_BAD_RECORD},
    {"seq", required_argument, NULL, OPT_SEQ},
    {"batch", required_argument, NULL, OPT_BATCH},
    {"seed", required_argument, NULL, OPT_SEED},
    {"heldout", required_argument, NULL, OPT_HELDOUT},
    {NULL, 0, NULL, 0},
};

int mt_cmd_data(int argc, char **argv) {
    data_args a = {.template_name = "auto", .seed = 42, .batch = 8};
    const mt_cli_number numbers[] = {
        {OPT_SEQ, MT_CLI_INT, &MT_LIMIT_SEQ_LEN, &a.ex.seq_len},
        {OPT_BATCH, MT_CLI_INT, &MT_LIMIT_BATCH, &a.batch},
        {OPT_SEED, MT_CLI_SEED, NULL, &a.seed},
        {OPT_HELDOUT, MT_CLI_DOUBLE, &MT_LIMIT_FRACTION, &a.heldout},
    };
    const mt_cli cli = {"moontune data", options, usage, numbers, sizeof numbers / sizeof *numbers};
    a.jsonl.format = MT_DATA_AUTO;
    a.jsonl.on_bad_record = MT_BAD_RECORD_ERROR;
    a.ex.seq_len = 512;
    a.ex.truncation = MT_TRUNCATE_LEFT;
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: return 0;
        case MT_CLI_REFUSED: return 2;
        case MT_CLI_POSITIONAL:
            if (a.n_files == 16) {
                fprintf(stderr, "moontune data: at most 16 files\n");
                return 2;
            }
            a.files[a.n_files++] = v;
            break;
        case OPT_TRAIN_ON_INPUTS: a.ex.train_on_inputs = 1; break;
        case OPT_TOKENIZER: a.tokenizer = v; break;
        case OPT_TEMPLATE: a.template_name = v; break;
        case OPT_HELDOUT_FILE: a.heldout_file = v; break;
        case OPT_FORMAT: {
            int f = mt_data_format_parse(v);
            if (f < 0) {
                fprintf(stderr, "moontune data: unknown --format %s\n", v);
                return 2;
            }
            a.jsonl.format = (mt_data_format)f;
            break;
        }
        case OPT_TRUNCATION:
            if (strcmp(v, "left") && strcmp(v, "drop")) {
                fprintf(stderr, "moontune data: --truncation expects left or drop, got \"%s\"\n", v);
                return 2;
            }
            a.ex.truncation = !strcmp(v, "left") ? MT_TRUNCATE_LEFT : MT_TRUNCATE_DROP;
            break;
        case OPT_ON_BAD_RECORD:
            if (strcmp(v, "error") && strcmp(v, "skip")) {
                fprintf(stderr, "moontune data: --on-bad-record expects error or skip, got \"%s\"\n", v);
                return 2;
            }
            a.jsonl.on_bad_record = !strcmp(v, "skip") ? MT_BAD_RECORD_SKIP : MT_BAD_RECORD_ERROR;
            break;
        }
    }
    if (!a.n_files || !a.tokenizer) {
        fprintf(stderr, "moontune data: give at least one FILE.jsonl and --tokenizer\n");
        usage(stderr);
        return 2;
    }
    return run(&a);
}
