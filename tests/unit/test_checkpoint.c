/* test_checkpoint.c — SHA-256 against FIPS 180-4's vectors; checkpoints that restore the
 * weights, the optimizer state and the scalar state bit for bit; a resumed run whose
 * losses equal the uninterrupted run's exactly; refusal of corrupted or mismatched
 * checkpoints; and the atomic-rename protocol (leftovers ignored, latest, prune). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store/checkpoint.h"
#include "model/model_identity.h"
#include "base/internal.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "formats/sha256.h"
#include "testutil.h"
#include "model/train.h"

#define GQA_DIR MT_FIXTURE_DIR "/tiny_gqa"
#define ROWS 2
#define LEN 12

/* ---- SHA-256 ---- */

static void expect_hex(const void *data, size_t n, const char *want) {
    char hex[MT_SHA256_HEX];
    mt_sha256_hex(data, n, hex);
    assert_string_equal(hex, want);
}

static void test_sha256_vectors(void **state) {
    (void)state;
    /* FIPS 180-4 examples (NIST CSRC "SHA256.pdf") and the classic million-'a' vector */
    expect_hex("abc", 3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    expect_hex("", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    expect_hex(m448, strlen(m448),
               "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    const char *m896 =
        "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
        "klmnopqrlmnopqrsmnopqrstnopqrstu";
    expect_hex(m896, strlen(m896),
               "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    size_t n = 1000000;
    char *a = malloc(n);
    assert_non_null(a);
    memset(a, 'a', n);
    expect_hex(a, n, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* streaming in uneven pieces gives the same digest */
    mt_sha256_ctx ctx;
    mt_sha256_init(&ctx);
    size_t off = 0, piece = 1;
    while (off < n) {
        size_t k = piece < n - off ? piece : n - off;
        mt_sha256_update(&ctx, a + off, k);
        off += k;
        piece = piece * 3 % 1000 + 1;
    }
    uint8_t d[MT_SHA256_BYTES];
    char hex[MT_SHA256_HEX];
    mt_sha256_final(&ctx, d);
    mt_sha256_to_hex(d, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* and a file of it */
    char *dir = mt_test_tmpdir("sha");
    char *path = mt_path_join(dir, "a.bin", NULL);
    mt_test_write_file(path, a, n);
    uint64_t bytes = 0;
    mt_error err = {0};
    assert_int_equal(mt_sha256_file(path, hex, &bytes, &err), MT_OK);
    assert_int_equal(bytes, n);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(path);
    mt_test_rmtree(dir);
    free(dir);
    free(a);
}

/* ---- a tiny training rig ---- */

typedef struct rig {
    mt_backend be;
    mt_model *model;
    mt_plugin *plugins[3];
    mt_plugin_instance *loss, *opt, *adapter;
} rig;

static char *plugin_path(const char *name) {
    static char path[512];
    snprintf(path, sizeof path, "%s/plugins/%s.so", MT_BUILD_DIR, name);
    return path;
}

static int have_plugin(const char *name) { return access(plugin_path(name), R_OK) == 0; }

static mt_plugin *load_plugin(const char *name) {
    mt_plugin *p = NULL;
    mt_error err = {0};
    if (mt_plugin_load(plugin_path(name), &p, &err)) fail_msg("%s", err.msg);
    return p;
}

static void rig_up(rig *r, const char *adapter, const char *optimizer) {
    memset(r, 0, sizeof *r);
    mt_error err = {0};
    assert_int_equal(mt_backend_cpu_init(&r->be, 0, &err), MT_OK);
    if (mt_model_load_hf(GQA_DIR, &r->be, &r->model, &err)) fail_msg("%s", err.msg);
    r->plugins[0] = load_plugin("cross_entropy");
    r->plugins[1] = load_plugin(optimizer);
    r->plugins[2] = load_plugin(adapter);
    mt_kv wd = {.key = "weight_decay", .type = MT_KV_NUMBER, .number = 0.01};
    int is_adamw = !strcmp(optimizer, "adamw");
    if (mt_plugin_instantiate(r->plugins[0], NULL, 0, &r->loss, &err) ||
        mt_plugin_instantiate(r->plugins[1], is_adamw ? &wd : NULL, is_adamw, &r->opt, &err) ||
        mt_plugin_instantiate(r->plugins[2], NULL, 0, &r->adapter, &err) ||
        mt_model_attach_adapter(r->model, r->adapter->desc->vtable, r->adapter->state, &err) ||
        mt_model_plan(r->model, ROWS, LEN, 0, &err))
        fail_msg("%s", err.msg);
}

static void rig_down(rig *r) {
    mt_plugin_instance_free(r->loss);
    mt_plugin_instance_free(r->opt);
    mt_model_free(r->model); /* before the adapter: the model points into its state */
    mt_plugin_instance_free(r->adapter);
    for (int i = 0; i < 3; i++)
        mt_plugin_unload(r->plugins[i]);
    mt_backend_cpu_shutdown(&r->be);
}

/* The batch of step k (1-based): different tokens every step, as a data loader gives. */
static void batch_of_step(const rig *r, int64_t k, int32_t *tokens, int32_t *targets) {
    int V = r->model->cfg.vocab_size;
    for (int i = 0; i < ROWS * LEN; i++) {
        tokens[i] = (int32_t)((i * 29 + 3 + k * 7) % V);
        targets[i] = i % LEN < 3 ? -100 : (int32_t)((i * 17 + 5 + k * 11) % V);
    }
}

static double lr_of_step(int64_t k) { return 1e-2 * (1.0 - 0.1 * (double)k); }

/* Trains steps first..last (1-based), recording losses[k-1]. */
static void train(rig *r, int64_t first, int64_t last, double *losses) {
    int32_t tokens[ROWS * LEN], targets[ROWS * LEN];
    for (int64_t k = first; k <= last; k++) {
        batch_of_step(r, k, tokens, targets);
        mt_batch batch = {.B = ROWS, .T = LEN, .tokens = tokens, .targets = targets};
        mt_step_result res;
        mt_error err = {0};
        if (mt_train_step(r->model, r->loss, r->opt, &batch, 1, lr_of_step(k), k, 1.0, &res, &err))
            fail_msg("%s", err.msg);
        assert_false(res.skipped);
        losses[k - 1] = res.loss;
    }
}

static const char recipe_text[] = "-- recipe\nreturn { lr = 1e-2, steps = 6 }\n";

static void fill_state(rig *r, mt_ckpt_state *s, int64_t step) {
    memset(s, 0, sizeof *s);
    s->step = step;
    s->epoch = 0;
    s->cursor = (mt_cursor){.epoch = 0, .position = (uint64_t)step * ROWS};
    s->n_rng = 3;
    s->rng[0] = 0;
    s->rng[1] = UINT64_MAX;
    s->rng[2] = 0x9e3779b97f4a7c15ull;
    s->sched_step = step;
    s->total_steps = 6;
    s->lr = lr_of_step(step) / 3.0; /* not a short decimal */
    mt_error err = {0};
    assert_int_equal(mt_ckpt_state_set_metric(s, "eval_loss", 1.0 / 7.0, &err), MT_OK);
    assert_int_equal(mt_ckpt_state_set_metric(s, "train_loss", NAN, &err), MT_OK);
    assert_int_equal(mt_ckpt_state_set_metric(s, "best", -INFINITY, &err), MT_OK);
    s->recipe = recipe_text;
    s->recipe_len = sizeof recipe_text - 1;
    assert_int_equal(mt_ckpt_state_add_plugin(s, r->opt, &err), MT_OK);
    assert_int_equal(mt_ckpt_state_add_plugin(s, r->loss, &err), MT_OK);
    assert_int_equal(mt_ckpt_state_add_plugin(s, r->adapter, &err), MT_OK);
}

static char *save(rig *r, const char *run_dir, int64_t step) {
    mt_ckpt_state s;
    fill_state(r, &s, step);
    char *path = NULL;
    mt_error err = {0};
    if (mt_checkpoint_save(run_dir, r->model, r->opt, NULL, &s, &path, &err)) fail_msg("%s", err.msg);
    assert_non_null(path);
    return path;
}

/* ---- round trip ---- */

static void expect_same_params(mt_model *a, mt_model *b) {
    mt_param_view *pa, *pb;
    size_t na, nb;
    mt_error err = {0};
    assert_int_equal(mt_model_trainable_params(a, &pa, &na, &err), MT_OK);
    assert_int_equal(mt_model_trainable_params(b, &pb, &nb, &err), MT_OK);
    assert_int_equal(na, nb);
    assert_true(na > 0);
    for (size_t i = 0; i < na; i++) {
        assert_string_equal(pa[i].name, pb[i].name);
        assert_int_equal(mt_tensor_nbytes(&pa[i].value), mt_tensor_nbytes(&pb[i].value));
        if (memcmp(pa[i].value.data, pb[i].value.data, mt_tensor_nbytes(&pa[i].value)))
            fail_msg("parameter %s differs after the round trip", pa[i].name);
    }
    free(pa);
    free(pb);
}

static void expect_same_optimizer(mt_plugin_instance *a, mt_plugin_instance *b) {
    const mt_optimizer_vtable *vt = a->desc->vtable;
    size_t n = vt->state_count(a->state);
    assert_true(n > 0);
    assert_int_equal(n, vt->state_count(b->state));
    for (size_t i = 0; i < n; i++) {
        const char *name;
        mt_tensor ta;
        mt_error err = {0};
        assert_int_equal(vt->state_get(a->state, i, &name, &ta, &err), MT_OK);
        int found = 0;
        for (size_t j = 0; j < n && !found; j++) {
            const char *nb;
            mt_tensor tb;
            assert_int_equal(vt->state_get(b->state, j, &nb, &tb, &err), MT_OK);
            if (strcmp(name, nb)) continue;
            found = 1;
            assert_int_equal(mt_tensor_nbytes(&ta), mt_tensor_nbytes(&tb));
            if (memcmp(ta.data, tb.data, mt_tensor_nbytes(&ta)))
                fail_msg("optimizer state %s differs after the round trip", name);
        }
        if (!found) fail_msg("optimizer state %s is missing after the round trip", name);
    }
}

static int same_double(double a, double b) {
    return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b));
}

static void test_round_trip_is_exact(void **state) {
    (void)state;
    char *run = mt_test_tmpdir("ckpt-rt");
    rig a, b;
    rig_up(&a, "full", "adamw");
    double losses[2];
    train(&a, 1, 2, losses);
    char *path = save(&a, run, 2);
    printf("checkpoint: %s\n", path);
    assert_non_null(strstr(path, "/checkpoints/step-00000002"));

    rig_up(&b, "full", "adamw");
    mt_ckpt_state s;
    mt_error err = {0};
    if (mt_checkpoint_load(path, b.model, b.opt, NULL, &s, &err)) fail_msg("%s", err.msg);
    expect_same_params(a.model, b.model);
    expect_same_optimizer(a.opt, b.opt);

    mt_ckpt_state want;
    fill_state(&a, &want, 2);
    assert_int_equal(s.step, 2);
    assert_int_equal(s.epoch, want.epoch);
    assert_int_equal(s.cursor.epoch, want.cursor.epoch);
    assert_int_equal(s.cursor.position, want.cursor.position);
    assert_int_equal(s.n_rng, 3);
    for (int i = 0; i < 3; i++)
        assert_true(s.rng[i] == want.rng[i]);
    assert_int_equal(s.sched_step, 2);
    assert_int_equal(s.total_steps, 6);
    assert_true(same_double(s.lr, want.lr));
    assert_int_equal(s.n_metrics, 3);
    for (int i = 0; i < want.n_metrics; i++) {
        double v = 0;
        assert_true(mt_ckpt_state_get_metric(&s, want.metrics[i].name, &v));
        assert_true(same_double(v, want.metrics[i].value));
    }
    assert_int_equal(s.recipe_len, want.recipe_len);
    assert_memory_equal(s.recipe, recipe_text, want.recipe_len);
    char sha[MT_SHA256_HEX];
    mt_sha256_hex(recipe_text, sizeof recipe_text - 1, sha);
    assert_string_equal(s.recipe_sha256, sha);
    assert_int_equal(s.n_plugins, 3);
    assert_string_equal(s.plugins[0].kind, "optimizer");
    assert_string_equal(s.plugins[0].name, "adamw");
    assert_string_equal(s.plugins[0].version, a.opt->desc->version);
    assert_string_equal(s.plugins[1].kind, "loss");
    assert_string_equal(s.plugins[2].kind, "adapter");
    assert_string_equal(s.plugins[2].name, "full");
    /* each instance's validated options, defaults filled in: what `moontune export`
     * rebuilds an adapter from */
    assert_non_null(s.plugins[0].options);
    assert_non_null(strstr(s.plugins[0].options, "\"weight_decay\":0.01"));
    assert_non_null(strstr(s.plugins[0].options, "\"beta1\":0.9"));
    assert_non_null(s.plugins[1].options);
    mt_ckpt_state_clear(&s);

    /* the files of the layout are there and verify alone */
    const char *files[] = {"weights.safetensors", "optimizer.safetensors", "recipe.lua",
                           "plugin_state.safetensors", "state.json", "state.json.sha256"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char *f = mt_path_join(path, files[i], NULL);
        assert_int_equal(access(f, R_OK), 0);
        free(f);
    }
    assert_int_equal(mt_checkpoint_verify(path, &err), MT_OK);

    free(path);
    rig_down(&a);
    rig_down(&b);
    mt_test_rmtree(run);
    free(run);
}

/* ---- resume equivalence ---- */

static void resume_equivalence(const char *adapter) {
    enum { STEPS = 6, CUT = 3 };
    char *run = mt_test_tmpdir("ckpt-resume");
    double straight[STEPS], resumed[STEPS];

    rig r;
    rig_up(&r, adapter, "adamw");
    train(&r, 1, STEPS, straight);
    rig_down(&r);

    rig_up(&r, adapter, "adamw");
    train(&r, 1, CUT, resumed);
    char *saved = save(&r, run, CUT);
    free(saved);
    rig_down(&r);

    rig_up(&r, adapter, "adamw");
    char *latest = NULL;
    mt_error err = {0};
    assert_int_equal(mt_checkpoint_latest(run, &latest, &err), MT_OK);
    assert_non_null(latest);
    mt_ckpt_state s;
    if (mt_checkpoint_load(latest, r.model, r.opt, NULL, &s, &err)) fail_msg("%s", err.msg);
    assert_int_equal(s.step, CUT);
    train(&r, s.step + 1, STEPS, resumed);
    mt_ckpt_state_clear(&s);
    rig_down(&r);

    for (int k = 0; k < STEPS; k++) {
        printf("%s step %d: loss %.9g uninterrupted, %.9g %s\n", adapter, k + 1, straight[k],
               resumed[k], k < CUT ? "first run" : "resumed");
        if (!same_double(straight[k], resumed[k]))
            fail_msg("%s: step %d: resumed loss %.17g != uninterrupted %.17g", adapter, k + 1,
                     resumed[k], straight[k]);
    }
    assert_true(straight[STEPS - 1] != straight[CUT]); /* the run does train */
    free(latest);
    mt_test_rmtree(run);
    free(run);
}

static void test_resume_equals_uninterrupted_full(void **state) {
    (void)state;
    resume_equivalence("full");
}

static void test_resume_equals_uninterrupted_lora(void **state) {
    (void)state;
    if (!have_plugin("lora")) {
        printf("lora.so not built: skipped\n");
        skip();
    }
    resume_equivalence("lora");
}

/* ---- corruption and mismatches ---- */

static char *file_in(const char *dir, const char *name) { return mt_path_join(dir, name, NULL); }

static void rewrite_state(const char *ckpt, const char *from, const char *to, int fix_sum) {
    char *path = file_in(ckpt, "state.json");
    char *text;
    size_t len;
    assert_int_equal(mt_read_file(path, &text, &len, NULL), MT_OK);
    char *at = strstr(text, from);
    assert_non_null(at);
    size_t nlen = len - strlen(from) + strlen(to);
    char *out = malloc(nlen + 1);
    assert_non_null(out);
    size_t head = (size_t)(at - text);
    memcpy(out, text, head);
    memcpy(out + head, to, strlen(to));
    strcpy(out + head + strlen(to), at + strlen(from));
    mt_test_write_file(path, out, nlen);
    if (fix_sum) {
        char hex[MT_SHA256_HEX], line[128];
        mt_sha256_hex(out, nlen, hex);
        int n = snprintf(line, sizeof line, "%s  state.json\n", hex);
        char *sum = file_in(ckpt, "state.json.sha256");
        mt_test_write_file(sum, line, (size_t)n);
        free(sum);
    }
    free(out);
    free(text);
    free(path);
}

static void expect_refused(rig *r, const char *ckpt, const char *part1, const char *part2) {
    mt_error err = {0};
    mt_ckpt_state s;
    mt_status st = mt_checkpoint_load(ckpt, r->model, r->opt, NULL, &s, &err);
    printf("refused: %s\n", err.msg);
    assert_int_not_equal(st, MT_OK);
    if (part1 && !strstr(err.msg, part1)) fail_msg("'%s' does not mention '%s'", err.msg, part1);
    if (part2 && !strstr(err.msg, part2)) fail_msg("'%s' does not mention '%s'", err.msg, part2);
}

static float first_weight(mt_model *m) {
    return mt_model_find_param(m, "model.norm.weight")->data[0];
}

static void test_corruption_is_refused(void **state) {
    (void)state;
    rig r;
    rig_up(&r, "full", "adamw");
    double losses[1];
    train(&r, 1, 1, losses);
    const float before = first_weight(r.model);
    char *run = mt_test_tmpdir("ckpt-bad");

    /* a flipped byte in the weights */
    char *ck = save(&r, run, 1);
    char *w = file_in(ck, "weights.safetensors");
    {
        char *bytes;
        size_t len;
        assert_int_equal(mt_read_file(w, &bytes, &len, NULL), MT_OK);
        bytes[len - 5] ^= 0x10;
        mt_test_write_file(w, bytes, len);
        free(bytes);
    }
    expect_refused(&r, ck, "weights.safetensors", "SHA-256 mismatch: expected");
    assert_int_not_equal(mt_checkpoint_verify(ck, NULL), MT_OK);
    assert_true(first_weight(r.model) == before);
    /* the state alone reads without the data files (their check is the load's) */
    {
        mt_ckpt_state st = {0};
        mt_error e = {0};
        if (mt_checkpoint_read_state(ck, &st, &e)) fail_msg("%s", e.msg);
        assert_int_equal(st.step, 1);
        assert_int_equal(st.n_plugins, 3);
        assert_non_null(st.plugins[0].options);
        mt_ckpt_state_clear(&st);
    }
    free(w);
    free(ck);

    /* a truncated optimizer file */
    ck = save(&r, run, 1); /* replaces the corrupted step-1 */
    char *o = file_in(ck, "optimizer.safetensors");
    assert_int_equal(truncate(o, 100), 0);
    expect_refused(&r, ck, "optimizer.safetensors", "size mismatch");
    free(o);
    free(ck);

    /* an unknown format version (with state.json's checksum made to agree) */
    ck = save(&r, run, 1);
    rewrite_state(ck, "\"format_version\": 4", "\"format_version\": 5", 1);
    expect_refused(&r, ck, "format version 5", "expected 1 to 4");
    free(ck);

    /* state.json edited behind its checksum */
    ck = save(&r, run, 1);
    rewrite_state(ck, "\"step\": 1", "\"step\": 7", 0);
    expect_refused(&r, ck, "state.json", "SHA-256 mismatch");
    free(ck);

    /* a missing file */
    ck = save(&r, run, 1);
    char *recipe = file_in(ck, "recipe.lua");
    assert_int_equal(unlink(recipe), 0);
    expect_refused(&r, ck, "recipe.lua", "missing");
    free(recipe);
    free(ck);

    /* a duplicate key in state.json */
    ck = save(&r, run, 1);
    rewrite_state(ck, "\"step\": 1,", "\"step\": 1, \"step\": 2,", 1);
    expect_refused(&r, ck, "state.json", "duplicate");
    free(ck);

    /* another optimizer */
    ck = save(&r, run, 1);
    rig other;
    rig_up(&other, "full", "sgd");
    expect_refused(&other, ck, "optimizer 'adamw'", "'sgd'");
    rig_down(&other);

    /* a model with other trainable parameters: one fewer, then one more */
    rig_up(&other, "full", "adamw");
    mt_error err = {0};
    mt_param *norm = mt_model_find_param(other.model, "model.norm.weight");
    assert_int_equal(mt_model_set_trainable(other.model, norm, 0, &err), MT_OK);
    expect_refused(&other, ck, "model.norm.weight", "not a trainable parameter");
    free(ck);
    ck = save(&other, run, 2); /* written without model.norm.weight */
    expect_refused(&r, ck, "model.norm.weight", "missing");
    if (have_plugin("lora")) {
        rig lora;
        rig_up(&lora, "lora", "adamw");
        expect_refused(&lora, ck, "lora_A", "missing");
        rig_down(&lora);
    }
    rig_down(&other);
    free(ck);

    assert_true(first_weight(r.model) == before); /* no refusal changed the model */
    rig_down(&r);
    mt_test_rmtree(run);
    free(run);
}

/* ---- atomicity, latest, prune ---- */

static int exists(const char *run, const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/checkpoints/%s", run, name);
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void test_latest_leftovers_and_prune(void **state) {
    (void)state;
    char *run = mt_test_tmpdir("ckpt-keep");
    rig r;
    rig_up(&r, "full", "adamw");
    mt_error err = {0};
    char *latest = (char *)1;
    assert_int_equal(mt_checkpoint_latest(run, &latest, &err), MT_OK);
    assert_null(latest); /* no checkpoints directory yet */

    double losses[1];
    train(&r, 1, 1, losses);
    for (int64_t step = 1; step <= 5; step++)
        free(save(&r, run, step));

    /* an interrupted save: a .tmp- directory with a higher step, and a step directory
     * without state.json (which the protocol never leaves, but a copy might) */
    char path[1024];
    snprintf(path, sizeof path, "%s/checkpoints/.tmp-step-00000009", run);
    assert_int_equal(mkdir(path, 0755), 0);
    snprintf(path, sizeof path, "%s/checkpoints/.tmp-step-00000009/weights.safetensors", run);
    mt_test_write_file(path, "partial", 7);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000008", run);
    assert_int_equal(mkdir(path, 0755), 0);

    assert_int_equal(mt_checkpoint_latest(run, &latest, &err), MT_OK);
    assert_non_null(latest);
    printf("latest: %s\n", latest);
    assert_non_null(strstr(latest, "/step-00000005"));
    free(latest);

    /* keep the last 2 and the best (step 2) */
    int deleted = -1;
    assert_int_equal(mt_checkpoint_prune(run, 2, 2, &deleted, &err), MT_OK);
    assert_int_equal(deleted, 2);
    assert_false(exists(run, "step-00000001"));
    assert_true(exists(run, "step-00000002"));
    assert_false(exists(run, "step-00000003"));
    assert_true(exists(run, "step-00000004"));
    assert_true(exists(run, "step-00000005"));
    assert_true(exists(run, "step-00000008")); /* not a complete checkpoint: left alone */

    /* keep_last < 1 keeps everything, but removes what a killed save or prune left */
    snprintf(path, sizeof path, "%s/checkpoints/.tmp-del-step-00000003", run);
    assert_int_equal(mkdir(path, 0755), 0);
    assert_int_equal(mt_checkpoint_prune(run, 0, -1, &deleted, &err), MT_OK);
    assert_int_equal(deleted, 0);
    assert_false(exists(run, ".tmp-del-step-00000003"));
    assert_false(exists(run, ".tmp-step-00000009"));
    assert_true(exists(run, "step-00000004"));

    /* the next save cleans up the leftovers; step 10 becomes the latest */
    free(save(&r, run, 10));
    assert_false(exists(run, ".tmp-step-00000009"));
    assert_int_equal(mt_checkpoint_latest(run, &latest, &err), MT_OK);
    assert_non_null(strstr(latest, "/step-00000010"));
    assert_int_equal(mt_checkpoint_verify(latest, &err), MT_OK);
    free(latest);

    /* prune without a best keeps exactly the last K */
    assert_int_equal(mt_checkpoint_prune(run, 1, -1, &deleted, &err), MT_OK);
    assert_int_equal(deleted, 3);
    assert_false(exists(run, "step-00000002"));
    assert_true(exists(run, "step-00000010"));

    rig_down(&r);
    mt_test_rmtree(run);
    free(run);
}

/* state.run and state.trainer come back as they went in (as compact JSON); the base
 * model's fingerprint is recorded, and a checkpoint refuses to load onto a model with
 * another one, before it changes anything; a format-1 checkpoint (no run, no trainer,
 * no fingerprint) still loads. */
static void test_run_settings_and_model_identity(void **state) {
    (void)state;
    rig r;
    rig_up(&r, "full", "adamw");
    double losses[1];
    train(&r, 1, 1, losses);
    char *run = mt_test_tmpdir("ckpt-identity");
    assert_int_equal(mt_model_fingerprint(r.model, r.model->fingerprint, NULL), MT_OK);
    char own[65];
    memcpy(own, r.model->fingerprint, sizeof own);

    /* the fingerprint follows the weights: one sampled value changed changes it */
    char other[65];
    float *w0 = &r.model->params[0].data[0];
    const float keep = *w0;
    *w0 = keep + 1.0f;
    assert_int_equal(mt_model_fingerprint(r.model, other, NULL), MT_OK);
    *w0 = keep;
    assert_string_not_equal(own, other);
    char again[65];
    assert_int_equal(mt_model_fingerprint(r.model, again, NULL), MT_OK);
    assert_string_equal(own, again);

    mt_ckpt_state s;
    fill_state(&r, &s, 1);
    s.run = "{\"trainer\": {\"lr\": 0.001, \"total_steps\": 8}, \"config\": {\"seed\": 3}}";
    s.trainer = "{\"bad_evals\": 2, \"best\": {\"step\": 4, \"value\": 0.5, \"saved\": true}}";
    char *ck = NULL;
    mt_error err = {0};
    if (mt_checkpoint_save(run, r.model, r.opt, NULL, &s, &ck, &err)) fail_msg("%s", err.msg);
    mt_ckpt_state loaded;
    memset(&loaded, 0, sizeof loaded);
    if (mt_checkpoint_load(ck, r.model, r.opt, NULL, &loaded, &err)) fail_msg("%s", err.msg);
    assert_non_null(loaded.run);
    assert_string_equal(loaded.run, "{\"config\":{\"seed\":3},\"trainer\":{\"lr\":0.001,\"total_steps\":8}}");
    assert_non_null(loaded.trainer);
    assert_string_equal(loaded.trainer, "{\"bad_evals\":2,\"best\":{\"saved\":true,\"step\":4,\"value\":0.5}}");
    assert_string_equal(loaded.model_fingerprint, own);
    mt_ckpt_state_clear(&loaded);

    /* another base model of the same shapes */
    const float before = first_weight(r.model);
    memcpy(r.model->fingerprint, other, sizeof other);
    char own16[17];
    memcpy(own16, own, 16);
    own16[16] = '\0';
    expect_refused(&r, ck, "another base model", own16);
    assert_true(first_weight(r.model) == before);
    memcpy(r.model->fingerprint, own, sizeof own);

    /* a format-1 checkpoint (no run, no model): nothing to compare, it loads */
    free(ck);
    ck = NULL;
    mt_ckpt_state s1;
    fill_state(&r, &s1, 2);
    memset(r.model->fingerprint, 0, sizeof r.model->fingerprint);
    if (mt_checkpoint_save(run, r.model, r.opt, NULL, &s1, &ck, &err)) fail_msg("%s", err.msg);
    rewrite_state(ck, "\"format_version\": 4", "\"format_version\": 1", 1);
    memcpy(r.model->fingerprint, other, sizeof other);
    memset(&loaded, 0, sizeof loaded);
    if (mt_checkpoint_load(ck, r.model, r.opt, NULL, &loaded, &err)) fail_msg("%s", err.msg);
    assert_null(loaded.run);
    assert_null(loaded.trainer);
    assert_string_equal(loaded.model_fingerprint, "");
    mt_ckpt_state_clear(&loaded);
    free(ck);

    /* run must be a JSON object */
    fill_state(&r, &s, 3);
    s.run = "[1, 2]";
    assert_int_not_equal(mt_checkpoint_save(run, r.model, r.opt, NULL, &s, NULL, &err), MT_OK);
    assert_non_null(strstr(err.msg, "state.run must be a JSON object"));
    /* so must trainer */
    fill_state(&r, &s, 3);
    s.trainer = "3";
    assert_int_not_equal(mt_checkpoint_save(run, r.model, r.opt, NULL, &s, NULL, &err), MT_OK);
    assert_non_null(strstr(err.msg, "state.trainer must be a JSON object"));

    rig_down(&r);
    mt_test_rmtree(run);
    free(run);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_run_settings_and_model_identity),
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_round_trip_is_exact),
        cmocka_unit_test(test_resume_equals_uninterrupted_full),
        cmocka_unit_test(test_resume_equals_uninterrupted_lora),
        cmocka_unit_test(test_corruption_is_refused),
        cmocka_unit_test(test_latest_leftovers_and_prune),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
