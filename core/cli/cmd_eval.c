/* cmd_eval.c — `moontune eval --model PATH FILE.jsonl ...`. */
#include "cli/cmd_eval.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/evaluate.h"
#include "base/internal.h"
#include "base/numparse.h"
#include "cli/cli_args.h"
#include "lua/chat_render.h"
#include "store/session.h"
#include "text/tokenizer.h"

static void usage(FILE *out) {
    fprintf(out,
            "usage: moontune eval --model PATH FILE.jsonl [FILE.jsonl ...] [options]\n"
            "\n"
            "Mean cross-entropy per trained token and perplexity of the model on the records\n"
            "(responses only for conversations; every token for plain text).\n"
            "\n"
            "  --model PATH      a .gguf file or a Hugging Face model directory\n"
            "  --adapter DIR     a PEFT LoRA adapter directory (adapter_config.json +\n"
            "                    adapter_model.safetensors) applied on top of --model\n"
            "  --template NAME   chat template (default auto: the model's own; docs/chat_templates.md)\n"
            "  --format F        auto | alpaca | chat | prompt_completion | text (default auto)\n"
            "  --seq N           sequence length (default 512)\n"
            "  --batch B         rows per batch (default 4)\n"
            "  --int8            the frozen base's products in int8, as int8 training's forward\n"
            "                    (train_int8) computes them, where the CPU has them (default:\n"
            "                    fp32; docs/speed.md)\n"
            "  --device D        cpu | cuda (default: cuda where a CUDA device is usable,\n"
            "                    else cpu)\n"
            "  --threads N       CPU threads\n");
}

enum { OPT_MODEL = 256, OPT_ADAPTER, OPT_TEMPLATE, OPT_FORMAT, OPT_SEQ, OPT_BATCH, OPT_THREADS, OPT_INT8 };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"model", required_argument, NULL, OPT_MODEL},
    {"adapter", required_argument, NULL, OPT_ADAPTER},
    {"template", required_argument, NULL, OPT_TEMPLATE},
    {"format", required_argument, NULL, OPT_FORMAT},
    {"seq", required_argument, NULL, OPT_SEQ},
    {"batch", required_argument, NULL, OPT_BATCH},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"int8", no_argument, NULL, OPT_INT8},
    MT_CLI_DEVICE_OPTION,
    {NULL, 0, NULL, 0},
};

int mt_cmd_eval(int argc, char **argv) {
    const char *files[16], *model_path = NULL, *adapter_dir = NULL, *template_name = "auto";
    const char *device = NULL;
    int n_files = 0, seq = 512, batch = 4, threads = 0, int8 = 0;
    const mt_cli_number numbers[] = {
        {OPT_SEQ, MT_CLI_INT, &MT_LIMIT_SEQ_LEN, &seq},
        {OPT_BATCH, MT_CLI_INT, &MT_LIMIT_BATCH, &batch},
        {OPT_THREADS, MT_CLI_INT, &MT_LIMIT_THREADS, &threads},
    };
    const mt_cli cli = {"moontune eval", options, usage, numbers, sizeof numbers / sizeof *numbers};
    mt_jsonl_options jsonl = {.format = MT_DATA_AUTO, .on_bad_record = MT_BAD_RECORD_ERROR};
    const char *v, *flag;
    int c;
    mt_cli_begin();
    while ((c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: return 0;
        case MT_CLI_REFUSED: return 2;
        case MT_CLI_POSITIONAL:
            if (n_files == 16) {
                fprintf(stderr, "moontune eval: at most 16 files\n");
                return 2;
            }
            files[n_files++] = v;
            break;
        case OPT_MODEL: model_path = v; break;
        case OPT_ADAPTER: adapter_dir = v; break;
        case OPT_INT8: int8 = 1; break;
        case MT_CLI_DEVICE: device = v; break;
        case OPT_TEMPLATE: template_name = v; break;
        case OPT_FORMAT:
            if (mt_data_format_parse(v) < 0) {
                fprintf(stderr, "moontune eval: unknown --format %s\n", v);
                return 2;
            }
            jsonl.format = (mt_data_format)mt_data_format_parse(v);
            break;
        }
    }
    if (!model_path || !n_files) {
        fprintf(stderr, "moontune eval: give --model and at least one FILE.jsonl\n");
        usage(stderr);
        return 2;
    }
    mt_error err = {0};
    mt_session *ses = NULL;
    mt_example_set examples;
    mt_example_options ex_opt = {.seq_len = seq, .truncation = MT_TRUNCATE_LEFT};
    int rc = 1, have_examples = 0;
    mt_status st;
    const mt_session_options so = {.device = device, .threads = threads, .model_path = model_path,
                                   .with_tokenizer = 1, .adapter_dir = adapter_dir};
    if ((st = mt_session_open(&so, &ses, &err)) ||
        (st = mt_example_set_init(&examples, &ex_opt, &err)))
        goto done;
    have_examples = 1;
    mt_tokenizer *tok = ses->tok;
    mt_model *m = ses->model;
    if (jsonl.format == MT_DATA_TEXT) examples.opt.add_special = 1; /* plain text: BOS/EOS */
    if ((st = mt_examples_from_files(files, n_files, &jsonl, tok, template_name, &examples, NULL,
                                     &err)) ||
        (st = mt_model_plan(m, batch, seq, 0, &err)))
        goto done;
    mt_eval_result r;
    if ((st = mt_evaluate(m, &examples, batch, seq, int8, &r, &err))) goto done;
    printf("moontune eval: %s%s%s on %d file(s): %lld examples, %lld trained tokens\n",
           model_path, adapter_dir ? " + adapter " : "", adapter_dir ? adapter_dir : "", n_files, (long long)r.examples, (long long)r.tokens);
    printf("  loss %.4f  perplexity %.3f  (%.1f s, %.0f tokens/s on %s%s)\n", r.loss,
           r.perplexity, r.seconds, r.tokens_per_second, ses->device,
           !int8 ? "" : r.int8 > 0 ? ", frozen products in int8" : ", fp32: no int8 products here");
    rc = 0;
done:
    if (rc) fprintf(stderr, "moontune eval: %s\n", err.msg);
    if (have_examples) mt_example_set_free(&examples);
    mt_session_close(ses);
    return rc;
}
