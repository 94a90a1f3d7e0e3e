/* fuzz_config.c — libFuzzer target for config.json: arbitrary bytes through
 * mt_config_parse (the parser the loader uses). A refusal must name the file. An
 * accepted config must pass mt_config_validate, its parameter count (computed in 64
 * bits) must be within the bound the validator promises — so a lying config can never
 * plan a huge allocation — and its rotary frequencies must be finite. Then the model
 * is planned: when the config is small (at most 2^18 parameters, so that each run
 * stays fast) the parameters are created on the CPU backend and activations planned
 * for a short sequence; larger accepted configs only get their table of names and
 * shapes (no parameter memory), which is what the loaders build before checking the
 * weights on disk. Built by scripts/fuzz; seeds in tests/fuzz/corpus/fuzz_config. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "model/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static mt_backend cpu;
static int cpu_ready;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mt_model_config cfg;
    mt_error err = {MT_OK, ""};
    if (mt_config_parse((const char *)data, size, "fuzz/config.json", &cfg, &err) != MT_OK) {
        if (!strstr(err.msg, "fuzz/config.json")) abort();
        return 0;
    }
    if (mt_config_validate(&cfg, "fuzz/config.json", &err) != MT_OK) abort();
    if (cfg.hidden_size <= 0 || cfg.num_heads <= 0 || cfg.num_kv_heads <= 0 || cfg.head_dim <= 0 ||
        cfg.num_heads % cfg.num_kv_heads != 0 || cfg.head_dim % 2 != 0 || cfg.vocab_size <= 0 ||
        cfg.num_layers <= 0 || cfg.intermediate_size <= 0 || cfg.max_position_embeddings <= 0)
        abort();
    const int64_t C = cfg.hidden_size, F = cfg.intermediate_size, HD = (int64_t)cfg.num_heads * cfg.head_dim;
    const int64_t per_layer = C * HD * 2 + 2 * C * (int64_t)cfg.num_kv_heads * cfg.head_dim + 3 * C * F;
    if (per_layer * cfg.num_layers + 2 * (int64_t)cfg.vocab_size * C > ((int64_t)1 << 41)) abort();
    const size_t params = mt_config_num_params(&cfg);
    if (params > ((size_t)1 << 41)) abort();
    double linear = 0, attention = 0;
    mt_model_forward_flops(&cfg, 1, 4, &linear, &attention);
    if (!isfinite(linear) || !isfinite(attention)) abort();

    /* the rotary frequencies for any accepted config: finite (computed in fp32) */
    float *inv = malloc((size_t)cfg.head_dim / 2 * sizeof *inv);
    if (!inv) abort();
    mt_rope_inv_freq(&cfg, inv);
    for (int i = 0; i < cfg.head_dim / 2; i++)
        if (!isfinite(inv[i]) || inv[i] < 0.0f) abort();
    free(inv);

    if (!cpu_ready) {
        if (mt_backend_cpu_init(&cpu, 1, &err) != MT_OK) abort();
        cpu_ready = 1;
    }
    mt_model *m = NULL;
    if (params > ((size_t)1 << 18)) {
        /* names and shapes only: what a loader checks the weights against */
        if (mt_model_create_table(&cfg, &cpu, &m, &err) != MT_OK) abort();
        size_t numel = 0;
        for (size_t i = 0; i < m->num_params; i++) {
            if (m->params[i].data) abort(); /* nothing allocated yet */
            numel += m->params[i].numel;
        }
        /* the table and mt_config_num_params count the same parameters */
        if (numel != params) abort();
        mt_model_free(m);
        return 0;
    }
    if (mt_model_create(&cfg, &cpu, &m, &err) != MT_OK) abort();
    const int T = cfg.max_position_embeddings < 4 ? cfg.max_position_embeddings : 4;
    if (mt_model_plan(m, 1, T, 0, &err) != MT_OK) abort();
    /* a sequence past max_position_embeddings is refused, not planned */
    if (cfg.max_position_embeddings < (1 << 20) &&
        mt_model_plan(m, 1, cfg.max_position_embeddings + 1, 0, &err) == MT_OK)
        abort();
    mt_model_free(m);
    return 0;
}
