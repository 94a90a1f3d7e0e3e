/* fuzz_config.c — libFuzzer target for config.json: arbitrary bytes through
 * mt_config_parse; an accepted config must pass mt_config_validate, and its parameter
 * count (computed in 64 bits) must be within the bound the validator promises, so a
 * lying config can never plan a huge allocation. Refusals must name the file. Built by
 * scripts/fuzz; seeds in tests/fuzz/corpus/fuzz_config. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mt_model_config cfg;
    mt_error err = {MT_OK, ""};
    if (mt_config_parse((const char *)data, size, "fuzz/config.json", &cfg, &err) != MT_OK) {
        if (!strstr(err.msg, "fuzz/config.json")) abort();
        return 0;
    }
    if (mt_config_validate(&cfg, "fuzz/config.json", &err) != MT_OK) abort();
    if (cfg.hidden_size <= 0 || cfg.num_heads <= 0 || cfg.num_kv_heads <= 0 || cfg.head_dim <= 0 ||
        cfg.num_heads % cfg.num_kv_heads != 0 || cfg.head_dim % 2 != 0 || cfg.vocab_size <= 0)
        abort();
    const int64_t C = cfg.hidden_size, F = cfg.intermediate_size, HD = (int64_t)cfg.num_heads * cfg.head_dim;
    const int64_t per_layer = C * HD * 2 + 2 * C * (int64_t)cfg.num_kv_heads * cfg.head_dim + 3 * C * F;
    if (per_layer * cfg.num_layers + 2 * (int64_t)cfg.vocab_size * C > ((int64_t)1 << 41)) abort();
    /* the rotary frequencies for any accepted config */
    float *inv = malloc((size_t)cfg.head_dim / 2 * sizeof *inv);
    if (!inv) abort();
    mt_rope_inv_freq(&cfg, inv);
    free(inv);
    return 0;
}
