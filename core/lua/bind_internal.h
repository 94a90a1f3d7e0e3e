/* bind_internal.h — what the parts of moontune.core (core/lua/bind_*.c) share: the
 * userdata types and class names, option-table readers, the plugin registries, and each
 * part's opener. Not a public header: only core/lua includes it. */
#ifndef MT_LUA_BIND_INTERNAL_H
#define MT_LUA_BIND_INTERNAL_H

#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>

#include "base/numparse.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "text/dataset.h"
#include "text/tokenizer.h"

#define MODEL_MT "moontune.Model"
#define TOKENIZER_MT "moontune.Tokenizer"
#define PLUGIN_MT "moontune.Plugin"
#define EXAMPLES_MT "moontune.Examples"
#define BATCHER_MT "moontune.Batcher"
#define BATCH_MT "moontune.Batch"
#define RECORDS_MT "moontune.Records"
#define SENTINEL_MT "moontune.Registries"
#define SENTINEL_KEY "moontune.registries"

typedef struct registries {
    mt_registry **regs;
    char **keys; /* the extra directories joined by '\n' ("" for none) */
    int n;
} registries;

typedef struct lplugin {
    mt_plugin_instance *inst; /* NULL once closed (or freed by the model it was attached to) */
    int attached;             /* owned by a Model */
} lplugin;

struct mt_session;

typedef struct lmodel {
    mt_model *m;
    struct mt_session *session; /* owns the model and its backend (store/session.h) */
    lplugin **adapters; /* attached adapter Plugins (kept alive by the uservalue table) */
    int n_adapters;
} lmodel;

typedef struct ltok {
    mt_tokenizer *tok;
} ltok;

typedef struct lexamples {
    int open;
    mt_example_set set;
    mt_record_set records;
    int has_records; /* records were read (stats count them) */
    int from_cache;  /* the examples came from the tokenized-example cache */
    int users;       /* open Batchers pointing at the set */
} lexamples;

typedef struct lbatch {
    int B, T;
    int pairs;         /* rows 2i, 2i+1 are preference pairs */
    int has_ref_logps; /* ref_logps holds the examples' reference log-probabilities */
    double *ref_logps; /* (B), inside this userdata, after data */
    /* a batch of sampled completions (mt.rl_batch), else NULL: inside this userdata,
     * after ref_logps */
    float *advantages; /* (B) */
    float *old_logps;  /* (B,T), aligned with the targets */
    int32_t data[];    /* tokens, positions, segments, targets: each (B,T) */
} lbatch;

/* The mt_batch view of a Batch userdata (step_items 0). */
mt_batch bind_batch_view(const lbatch *x);

/* ---- bind_common.c: errors, option tables, bind_scratch memory, result fields, registries, classes ---- */
lua_Integer bind_arg_int_in(lua_State *L, int idx, const char *name, const mt_int_limit *lim);
void bind_check_opts(lua_State *L, int idx);
mt_registry *bind_get_registry(lua_State *L, registries *r, const char *const *dirs, int n_dirs);
int bind_raise(lua_State *L, const mt_error *err);
int bind_noop(lua_State *L);
void bind_new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc, lua_CFunction tostring);
int bind_opt_bool(lua_State *L, int opts, const char *key, int def);
int bind_opt_field(lua_State *L, int opts, const char *key);
float bind_opt_float_in(lua_State *L, int opts, const char *key, float def, const mt_real_limit *lim);
lua_Integer bind_opt_int(lua_State *L, int opts, const char *key, lua_Integer def);
lua_Integer bind_opt_int_in(lua_State *L, int opts, const char *key, lua_Integer def, const mt_int_limit *lim);
double bind_opt_num(lua_State *L, int opts, const char *key, double def);
uint64_t bind_opt_seed(lua_State *L, int opts, const char *key, uint64_t def);
const char *bind_opt_str(lua_State *L, int opts, const char *key, const char *def);
registries *bind_push_sentinel(lua_State *L);
void *bind_scratch(lua_State *L, size_t bytes);
/* The strings of the list at index `list` (option `key`), held by the list, in
 * bind_scratch memory left on the stack; *n is the list's length. With allow_false an
 * item may be false (NULL here); any other item raises an error naming it. */
const char **bind_string_list(lua_State *L, int list, const char *key, int allow_false, int *n);
uint64_t bind_seed_at(lua_State *L, int idx, const char *name);
void bind_set_bool(lua_State *L, const char *k, int v);
void bind_set_int(lua_State *L, const char *k, lua_Integer v);
void bind_set_num(lua_State *L, const char *k, double v);
void bind_set_str(lua_State *L, const char *k, const char *v);
/* mt.isatty(stream): "stdout", "stderr", "stdin" or a Lua file handle */
int bind_isatty(lua_State *L);

/* ---- bind_model.c: Plugin, Model, Tokenizer and exports ---- */
lmodel *bind_check_model(lua_State *L, int idx);
lplugin *bind_check_plugin(lua_State *L, int idx);
ltok *bind_check_tok(lua_State *L, int idx);
int32_t *bind_read_ids(lua_State *L, int idx, size_t *n, const char *what);

/* ---- bind_data.c: Examples, Records, Batcher, Batch ---- */
lexamples *bind_check_examples(lua_State *L, int idx);

/* Each part creates its classes and adds its functions to the library table on top of
 * the stack. */
void mt_bind_model_open(lua_State *L);
void mt_bind_data_open(lua_State *L);
void mt_bind_train_open(lua_State *L);
void mt_bind_generate_open(lua_State *L);
void mt_bind_tensorboard_open(lua_State *L); /* bind_tensorboard.c */
void mt_bind_dist_open(lua_State *L);        /* bind_dist.c */
/* bind_dist.c: calls `work` (a binding returning one string: a path it wrote) on rank 0
 * of a data-parallel job only; the other ranks wait for its outcome, and every rank then
 * returns rank 0's string or raises rank 0's error. One process: calls it. */
int bind_on_rank0(lua_State *L, lua_CFunction work);

#endif /* MT_LUA_BIND_INTERNAL_H */
