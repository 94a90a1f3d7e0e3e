/* bind_data.c — moontune.core's data objects: Examples, Records, Batcher and Batch. */
#include "lua/bind_internal.h"
#include "dist/dist.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua/chat_render.h"
#include "lua/data_cache.h"
#include "text/example_cache.h"

/* ---- Examples ------------------------------------------------------------------ */

lexamples *bind_check_examples(lua_State *L, int idx) {
    lexamples *e = luaL_checkudata(L, idx, EXAMPLES_MT);
    if (!e->open) luaL_error(L, "the examples are closed");
    return e;
}

static void examples_free(lexamples *e) {
    if (!e->open) return;
    mt_example_set_free(&e->set);
    mt_record_set_free(&e->records);
    e->open = 0;
}

static int examples_gc(lua_State *L) {
    examples_free(luaL_checkudata(L, 1, EXAMPLES_MT));
    return 0;
}

static int examples_close(lua_State *L) {
    lexamples *e = luaL_checkudata(L, 1, EXAMPLES_MT);
    if (e->open && e->users > 0)
        return luaL_error(L, "the examples are in use by %d open batcher(s); close those first", e->users);
    examples_free(e);
    return 0;
}

/* A new, initialised Examples userdata on the stack. */
static lexamples *new_examples(lua_State *L, const mt_example_options *opt) {
    lexamples *e = lua_newuserdatauv(L, sizeof *e, 0);
    memset(e, 0, sizeof *e);
    luaL_setmetatable(L, EXAMPLES_MT);
    mt_error err = {0};
    if (mt_example_set_init(&e->set, opt, &err)) bind_raise(L, &err);
    mt_record_set_init(&e->records);
    e->open = 1;
    return e;
}

static void read_example_options(lua_State *L, int opts, mt_example_options *ex) {
    memset(ex, 0, sizeof *ex);
    ex->seq_len = (int)bind_opt_int_in(L, opts, "seq_len", 512, &MT_LIMIT_SEQ_LEN);
    const char *tr = bind_opt_str(L, opts, "truncation", "left");
    if (!strcmp(tr, "left")) ex->truncation = MT_TRUNCATE_LEFT;
    else if (!strcmp(tr, "drop")) ex->truncation = MT_TRUNCATE_DROP;
    else luaL_error(L, "option 'truncation': expected \"left\" or \"drop\", found \"%s\"", tr);
    ex->train_on_inputs = bind_opt_bool(L, opts, "train_on_inputs", 0);
    const char *until = bind_opt_str(L, opts, "rejected_until", "end");
    if (!strcmp(until, "first_difference")) ex->rejected_to_difference = 1;
    else if (strcmp(until, "end"))
        luaL_error(L, "option 'rejected_until': expected \"end\" or \"first_difference\", found \"%s\"",
                   until);
}

/* The files argument at idx: a path, or a list whose items are paths or mixture entries
 * {file = path, weight = w} (weight 1 when absent). Paths are held by the Lua values. */
typedef mt_data_file data_file;

static data_file *read_files_arg(lua_State *L, int idx, int *n_files) {
    data_file *files;
    if (lua_type(L, idx) == LUA_TSTRING) {
        files = bind_scratch(L, sizeof *files);
        files[0] = (data_file){.path = lua_tostring(L, idx), .weight = 1.0};
        *n_files = 1;
        return files;
    }
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)lua_rawlen(L, idx);
    files = bind_scratch(L, (size_t)n * sizeof *files);
    for (int i = 0; i < n; i++) {
        int type = lua_rawgeti(L, idx, i + 1);
        files[i].weight = 1.0;
        if (type == LUA_TTABLE) {
            int item = lua_gettop(L);
            lua_pushnil(L);
            while (lua_next(L, item)) {
                const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
                if (!k || (strcmp(k, "file") && strcmp(k, "weight")))
                    luaL_error(L, "files: item %d: unknown key '%s' (a mixture entry is {file=, weight=})",
                               i + 1, k ? k : "?");
                lua_pop(L, 1);
            }
            if (lua_getfield(L, item, "file") != LUA_TSTRING)
                luaL_error(L, "files: item %d: 'file' must be a path, found %s", i + 1,
                           luaL_typename(L, -1));
            files[i].path = lua_tostring(L, -1); /* held by the item table */
            lua_pop(L, 1);
            int wtype = lua_getfield(L, item, "weight");
            if (wtype != LUA_TNIL) {
                if (wtype != LUA_TNUMBER)
                    luaL_error(L, "files: item %d: 'weight' must be a number, found %s", i + 1,
                               luaL_typename(L, -1));
                files[i].weight = lua_tonumber(L, -1);
            }
            lua_pop(L, 1);
        } else if (type == LUA_TSTRING) {
            files[i].path = lua_tostring(L, -1); /* held by the files table */
        } else {
            luaL_error(L, "files: item %d: expected a path or {file=, weight=}, found %s", i + 1,
                       luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
    *n_files = n;
    return files;
}

/* Reads every file into set (JSONL, CSV or TSV by name), each file's records repeated or
 * sampled to its weight (seeded by mix_seed and the file's position). Raises on error. */
static void load_files(lua_State *L, data_file *files, int n_files,
                       const mt_jsonl_options *jsonl, uint64_t mix_seed, mt_record_set *set) {
    mt_error err = {0};
    for (int i = 0; i < n_files; i++) {
        size_t first = set->n;
        if (mt_records_load_digest(files[i].path, jsonl, set, files[i].sha256, &err) ||
            mt_record_set_weight(set, first, files[i].weight, mt_mix64(mix_seed + (uint64_t)i), &err))
            bind_raise(L, &err);
    }
}

/* The JSONL reading options {format=, fields=, on_bad_record=} of the table at opts;
 * the field names stay referenced from the stack. */
static void read_jsonl_options(lua_State *L, int opts, mt_jsonl_options *jsonl) {
    memset(jsonl, 0, sizeof *jsonl);
    const char *fmt = bind_opt_str(L, opts, "format", "auto");
    int f = mt_data_format_parse(fmt);
    if (f < 0) luaL_error(L, "option 'format': unknown data format \"%s\"", fmt);
    jsonl->format = (mt_data_format)f;
    const char *bad = bind_opt_str(L, opts, "on_bad_record", "error");
    if (!strcmp(bad, "error")) jsonl->on_bad_record = MT_BAD_RECORD_ERROR;
    else if (!strcmp(bad, "skip")) jsonl->on_bad_record = MT_BAD_RECORD_SKIP;
    else luaL_error(L, "option 'on_bad_record': expected \"error\" or \"skip\", found \"%s\"", bad);
    mt_data_fields *fields = bind_scratch(L, sizeof *fields);
    if (bind_opt_field(L, opts, "fields") == LUA_TNIL) return;
    luaL_checktype(L, -1, LUA_TTABLE);
    int ft = lua_gettop(L);
    struct {
        const char *name;
        const char **slot;
    } names[] = {
        {"instruction", &fields->instruction}, {"input", &fields->input},
        {"output", &fields->output},           {"messages", &fields->messages},
        {"role", &fields->role},               {"content", &fields->content},
        {"prompt", &fields->prompt},           {"completion", &fields->completion},
        {"text", &fields->text},               {"chosen", &fields->chosen},
        {"rejected", &fields->rejected},
    };
    lua_pushnil(L);
    while (lua_next(L, ft)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        size_t j = 0;
        while (k && j < sizeof names / sizeof names[0] && strcmp(names[j].name, k)) j++;
        if (!k || j == sizeof names / sizeof names[0])
            luaL_error(L, "option 'fields': unknown field '%s'", k ? k : "?");
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "option 'fields.%s': expected a string, found %s", k, luaL_typename(L, -1));
        *names[j].slot = lua_tostring(L, -1); /* held by the fields table */
        lua_pop(L, 1);
    }
    jsonl->fields = fields; /* the fields table stays on the stack */
}

/* mt.examples(files, tok, {format=, fields=, on_bad_record=, template=, seq_len=,
 * truncation=, train_on_inputs=, rejected_until=, mix_seed=, cache=}) */
static int l_examples(lua_State *L) {
    lua_settop(L, 3); /* an absent options table stays a nil slot below the bind_scratch values */
    int n_files;
    data_file *files = read_files_arg(L, 1, &n_files);
    ltok *t = bind_check_tok(L, 2);
    bind_check_opts(L, 3);
    mt_jsonl_options jsonl;
    read_jsonl_options(L, 3, &jsonl);
    mt_example_options ex;
    read_example_options(L, 3, &ex);
    int32_t pad = mt_tokenizer_pad(t->tok);
    ex.pad_id = pad >= 0 ? pad : 0;
    ex.on_bad_record = jsonl.on_bad_record;
    int tmpl_type = bind_opt_field(L, 3, "template");
    if (tmpl_type != LUA_TNIL && tmpl_type != LUA_TSTRING && tmpl_type != LUA_TFUNCTION)
        return luaL_error(L, "option 'template': expected a name or a function, found %s", luaL_typename(L, -1));
    int tmpl = lua_gettop(L);

    /* the tokenized-example cache: on unless cache = false, or the template is a function
     * (whose code cannot be keyed) */
    const int use_cache = bind_opt_bool(L, 3, "cache", 1) && tmpl_type != LUA_TFUNCTION;
    const uint64_t mix_seed = (uint64_t)bind_opt_int(L, 3, "mix_seed", 0);

    lexamples *e = new_examples(L, &ex);
    int eidx = lua_gettop(L);
    mt_error err = {0};
    load_files(L, files, n_files, &jsonl, mix_seed, &e->records);
    e->has_records = 1;
    if (e->records.format == MT_DATA_TEXT) e->set.opt.add_special = 1; /* plain text: BOS/EOS */
    const char *requested = tmpl_type == LUA_TSTRING ? lua_tostring(L, tmpl) : "auto";
    const char *resolved = NULL;
    if (tmpl_type == LUA_TFUNCTION) lua_pushvalue(L, tmpl);
    else if (mt_chat_template_push(L, t->tok, requested, &resolved, &err))
        return bind_raise(L, &err);
    char dir[4096];
    uint8_t key[MT_SHA256_BYTES];
    const int keyed = use_cache && mt_data_cache_dir(dir, sizeof dir) == 0 &&
                      mt_data_cache_key(files, n_files, mix_seed, &jsonl, &e->set.opt, t->tok,
                                        requested, resolved, key, &err) == MT_OK;
    if (keyed) {
        mt_error cerr = {0};
        mt_status st = mt_example_cache_load(&e->set, dir, key, mt_tokenizer_vocab_size(t->tok),
                                             e->records.n_files, &cerr);
        if (st == MT_OK) {
            if (mt_example_set_set_files(&e->set, e->records.files, e->records.n_files, &err))
                return bind_raise(L, &err);
            e->from_cache = 1;
        } else if (st != MT_ERR_IO) {
            fprintf(stderr, "moontune: the example cache is not used: %s; tokenizing again\n", cerr.msg);
        }
    }
    if (!e->from_cache) {
        if (mt_examples_from_records(L, t->tok, &e->records, &e->set, &err)) return bind_raise(L, &err);
        mt_error cerr = {0};
        if (keyed && mt_example_cache_save(&e->set, dir, key, &cerr))
            fprintf(stderr, "moontune: the example cache was not written: %s\n", cerr.msg);
    }
    mt_example_set_print_skipped(&e->set, stderr);
    lua_settop(L, eidx);
    return 1;
}

/* ---- Records -------------------------------------------------------------------- */

/* A record set owned by Lua while mt.records converts it, so an error frees it. */
static int records_gc(lua_State *L) {
    mt_record_set_free(luaL_checkudata(L, 1, RECORDS_MT));
    return 0;
}

static void push_messages(lua_State *L, const mt_message *msgs, int n) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 2);
        bind_set_str(L, "role", msgs[i].role);
        bind_set_str(L, "content", msgs[i].content);
        lua_rawseti(L, -2, i + 1);
    }
}

/* mt.records(files, {format=, fields=, on_bad_record=, mix_seed=}) -> list of records, each
 * {format=, file=, line=, messages=, text=, chosen=, rejected=}: the records as the data
 * loader normalises them (alpaca and prompt/completion become messages), so a recipe
 * can read held-out prompts and reference answers without a JSON parser of its own. */
static int l_records(lua_State *L) {
    lua_settop(L, 2); /* an absent options table stays a nil slot below the bind_scratch values */
    int n_files;
    data_file *files = read_files_arg(L, 1, &n_files);
    bind_check_opts(L, 2);
    mt_jsonl_options jsonl;
    read_jsonl_options(L, 2, &jsonl);
    mt_record_set *set = lua_newuserdatauv(L, sizeof *set, 0);
    mt_record_set_init(set);
    luaL_setmetatable(L, RECORDS_MT);
    load_files(L, files, n_files, &jsonl, (uint64_t)bind_opt_int(L, 2, "mix_seed", 0), set);
    if (set->n_bad) mt_record_set_print_bad(set, stderr);
    lua_createtable(L, (int)set->n, 0);
    for (size_t i = 0; i < set->n; i++) {
        const mt_record *r = &set->records[i];
        lua_createtable(L, 0, 6);
        bind_set_str(L, "format", mt_data_format_name(r->format));
        bind_set_str(L, "file", set->files[r->file]);
        bind_set_int(L, "line", (lua_Integer)r->line);
        if (r->text) bind_set_str(L, "text", r->text);
        if (r->n_messages) {
            push_messages(L, r->messages, r->n_messages);
            lua_setfield(L, -2, "messages");
        }
        if (r->n_chosen) {
            push_messages(L, r->chosen, r->n_chosen);
            lua_setfield(L, -2, "chosen");
        }
        if (r->n_rejected) {
            push_messages(L, r->rejected, r->n_rejected);
            lua_setfield(L, -2, "rejected");
        }
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* mt.examples_from_ids({ {ids={...}, trainable={...}}, ... }, {seq_len=, truncation=, pad_id=}) */
static int l_examples_from_ids(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    bind_check_opts(L, 2);
    mt_example_options ex;
    read_example_options(L, 2, &ex);
    ex.pad_id = (int32_t)bind_opt_int(L, 2, "pad_id", 0);
    lexamples *e = new_examples(L, &ex);
    int eidx = lua_gettop(L);
    int n = (int)lua_rawlen(L, 1);
    for (int i = 0; i < n; i++) {
        lua_settop(L, eidx);
        if (lua_rawgeti(L, 1, i + 1) != LUA_TTABLE)
            return luaL_error(L, "example %d: expected a table {ids=, trainable=}", i + 1);
        int item = lua_gettop(L);
        if (lua_getfield(L, item, "ids") != LUA_TTABLE)
            return luaL_error(L, "example %d: field 'ids': expected a list of ids", i + 1);
        size_t len;
        int32_t *ids = bind_read_ids(L, item + 1, &len, "ids");
        uint8_t *tr = bind_scratch(L, len);
        int tt = lua_getfield(L, item, "trainable");
        if (tt == LUA_TNIL) memset(tr, 1, len);
        else if (tt != LUA_TTABLE || lua_rawlen(L, -1) != len)
            return luaL_error(L, "example %d: field 'trainable': expected a list as long as ids", i + 1);
        else
            for (size_t k = 0; k < len; k++) {
                lua_rawgeti(L, -1, (lua_Integer)k + 1);
                tr[k] = lua_isboolean(L, -1) ? (uint8_t)lua_toboolean(L, -1) : lua_tointeger(L, -1) != 0;
                lua_pop(L, 1);
            }
        mt_error err = {0};
        if (mt_example_set_add(&e->set, ids, tr, len, -1, 0, &err)) return bind_raise(L, &err);
    }
    lua_settop(L, eidx);
    return 1;
}

/* examples:count(): the examples, or the pairs of preference data */
static int examples_count(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)mt_example_set_items(&bind_check_examples(L, 1)->set));
    return 1;
}

/* examples:ref_logps() -> list of every sequence's reference log-probability (in
 * order: a pair's chosen then rejected), or nil when none were computed */
static int examples_ref_logps(lua_State *L) {
    lexamples *e = bind_check_examples(L, 1);
    if (!e->set.has_ref_logps) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, (int)e->set.n, 0);
    for (size_t i = 0; i < e->set.n; i++) {
        lua_pushnumber(L, e->set.ex[i].ref_logp);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* examples:set_ref_logps(list): reference log-probabilities saved by an earlier run
 * (examples:ref_logps()), one finite number per sequence */
static int examples_set_ref_logps(lua_State *L) {
    lexamples *e = bind_check_examples(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (!e->set.paired) return luaL_error(L, "set_ref_logps: reference log-probabilities are for preference pairs");
    if (lua_rawlen(L, 2) != e->set.n)
        return luaL_error(L, "set_ref_logps: %d values for %d sequences", (int)lua_rawlen(L, 2), (int)e->set.n);
    for (size_t i = 0; i < e->set.n; i++) {
        lua_rawgeti(L, 2, (lua_Integer)i + 1);
        int ok;
        double v = lua_tonumberx(L, -1, &ok);
        lua_pop(L, 1);
        if (!ok || !isfinite(v)) return luaL_error(L, "set_ref_logps: value %d is not a finite number", (int)i + 1);
    }
    for (size_t i = 0; i < e->set.n; i++) {
        lua_rawgeti(L, 2, (lua_Integer)i + 1);
        e->set.ex[i].ref_logp = lua_tonumber(L, -1);
        lua_pop(L, 1);
    }
    e->set.has_ref_logps = 1;
    return 0;
}

static int examples_paired(lua_State *L) {
    lua_pushboolean(L, bind_check_examples(L, 1)->set.paired);
    return 1;
}

static int examples_stats(lua_State *L) {
    lexamples *e = bind_check_examples(L, 1);
    mt_dataset_stats st;
    mt_dataset_stats_compute(e->has_records ? &e->records : NULL, &e->set, &st);
    lua_createtable(L, 0, 14);
    bind_set_int(L, "records", st.records);
    bind_set_int(L, "bad_skipped", st.bad_skipped);
    bind_set_int(L, "examples", st.examples);
    bind_set_int(L, "pairs", st.pairs);
    bind_set_int(L, "tokens", st.tokens);
    bind_set_num(L, "mean_len", st.mean_len);
    bind_set_int(L, "max_len", st.max_len);
    bind_set_int(L, "trained_tokens", st.trained_tokens);
    bind_set_num(L, "trained_fraction", st.trained_fraction);
    bind_set_int(L, "truncated_prompt", st.truncated_prompt);
    bind_set_int(L, "truncated_response", st.truncated_response);
    bind_set_int(L, "dropped_too_long", st.dropped_too_long);
    bind_set_int(L, "dropped_no_target", st.dropped_no_target);
    bind_set_int(L, "seq_len", st.seq_len);
    lua_pushboolean(L, e->from_cache);
    lua_setfield(L, -2, "cached");
    return 1;
}

/* examples:split(fraction, seed) -> train, heldout: the examples (already rendered and
 * fitted) are split by mt_split_indices; the train part keeps the truncation counts. */
static int examples_split(lua_State *L) {
    lexamples *e = bind_check_examples(L, 1);
    double fraction = luaL_checknumber(L, 2);
    uint64_t seed = lua_isnoneornil(L, 3) ? 0 : bind_seed_at(L, 3, "split: seed");
    size_t *tr = NULL, *ev = NULL, n_tr = 0, n_ev = 0;
    mt_error err = {0};
    if (mt_split_indices(mt_example_set_items(&e->set), fraction, (uint64_t)seed, &tr, &n_tr, &ev, &n_ev, &err)) return bind_raise(L, &err);
    /* the index lists go into bind_scratch memory so that an error below frees them */
    size_t *idx = bind_scratch(L, (n_tr + n_ev) * sizeof *idx);
    if (n_tr) memcpy(idx, tr, n_tr * sizeof *idx);
    if (n_ev) memcpy(idx + n_tr, ev, n_ev * sizeof *idx);
    free(tr);
    free(ev);
    lexamples *a = new_examples(L, &e->set.opt);
    lexamples *b = new_examples(L, &e->set.opt);
    /* both parts name the files their examples came from */
    if (mt_example_set_set_files(&a->set, e->set.files, e->set.n_files, &err) ||
        mt_example_set_set_files(&b->set, e->set.files, e->set.n_files, &err))
        return bind_raise(L, &err);
    /* items: examples, or whole preference pairs */
    for (size_t i = 0; i < n_tr + n_ev; i++)
        if (mt_example_set_copy_item(i < n_tr ? &a->set : &b->set, &e->set, idx[i], &err)) return bind_raise(L, &err);
    a->set.paired = b->set.paired = e->set.paired;
    a->set.n_truncated_prompt = e->set.n_truncated_prompt;
    a->set.n_truncated_response = e->set.n_truncated_response;
    a->set.n_dropped_too_long = e->set.n_dropped_too_long;
    a->set.n_dropped_no_target = e->set.n_dropped_no_target;
    return 2;
}

/* ---- Batcher and Batch ----------------------------------------------------------- */

typedef struct lbatcher {
    mt_batcher *b;
    int B, T;
    int narrow; /* batches as wide as their longest row (padding columns dropped) */
    int share_prefix; /* the examples' shared prompt prefix once per row (mt_batch_share_prefix) */
    const mt_example_set *examples; /* held by the Examples in user value 1 */
} lbatcher;

static lbatcher *check_batcher(lua_State *L, int idx) {
    lbatcher *b = luaL_checkudata(L, idx, BATCHER_MT);
    if (!b->b) luaL_error(L, "the batcher is closed");
    return b;
}

static int batcher_close(lua_State *L) {
    lbatcher *b = luaL_checkudata(L, 1, BATCHER_MT);
    if (b->b) {
        mt_batcher_free(b->b);
        b->b = NULL;
        lua_getiuservalue(L, 1, 1);
        lexamples *e = luaL_testudata(L, -1, EXAMPLES_MT);
        if (e && e->users > 0) e->users--;
    }
    return 0;
}

/* mt.batcher(examples, {batch=, seq_len=, pack=true, seed=, shuffle=true, shard=true,
 * share_prefix=true})
 * In a data-parallel job (mt.world_size() > 1) batch is the global batch and, with
 * shard, each rank's next() returns its batch / world_size rows of it. share_prefix
 * (packed single examples only): the prompt prefix the batch's examples all begin with
 * is laid out once, in one row, instead of once per example (the same examples, losses
 * and gradients, in fewer tokens; batch:shape() then gives the layout's rows and width). */
static int l_batcher(lua_State *L) {
    lexamples *e = bind_check_examples(L, 1);
    bind_check_opts(L, 2);
    int B = (int)bind_opt_int_in(L, 2, "batch", 1, &MT_LIMIT_BATCH);
    int T = (int)bind_opt_int_in(L, 2, "seq_len", e->set.opt.seq_len, &MT_LIMIT_SEQ_LEN);
    int pack = bind_opt_bool(L, 2, "pack", !e->set.paired); /* pairs stay in rows 2i, 2i+1 */
    uint64_t seed = bind_opt_seed(L, 2, "seed", 0);
    int shuffle = bind_opt_bool(L, 2, "shuffle", 1);
    int narrow = bind_opt_bool(L, 2, "narrow", 1);
    int shard = bind_opt_bool(L, 2, "shard", 1);
    int share_prefix = bind_opt_bool(L, 2, "share_prefix", pack && !e->set.paired);
    if (share_prefix && (!pack || e->set.paired))
        return luaL_error(L, "mt.batcher: share_prefix needs packed single examples (pack = true, "
                             "no preference pairs)");
    lbatcher *b = lua_newuserdatauv(L, sizeof *b, 1);
    b->b = NULL;
    b->B = B;
    b->T = T;
    b->examples = &e->set;
    b->narrow = narrow;
    b->share_prefix = share_prefix;
    luaL_setmetatable(L, BATCHER_MT);
    mt_error err = {0};
    if (mt_batcher_create(&e->set, B, T, pack, (uint64_t)seed, shuffle, &b->b, &err)) return bind_raise(L, &err);
    if (shard && mt_batcher_set_shard(b->b, mt_dist_rank(), mt_dist_size(), &err)) return bind_raise(L, &err);
    b->B = mt_batcher_rows(b->b);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    e->users++;
    return 1;
}

mt_batch bind_batch_view(const lbatch *x) {
    size_t bt = (size_t)x->B * (size_t)x->T;
    return (mt_batch){.size = sizeof(mt_batch), .B = x->B, .T = x->T, .tokens = x->data,
                      .positions = x->data + bt, .segments = x->data + 2 * bt,
                      .targets = x->data + 3 * bt, .pairs = x->pairs,
                      .ref_logps = x->has_ref_logps ? x->ref_logps : NULL,
                      .advantages = x->advantages, .old_logps = x->old_logps};
}

/* The batch's four arrays, each `from` ints apart, moved to `to` <= from ints apart
 * (one after another, as bind_batch_view reads them): moving down is safe. */
static void batch_restride(lbatch *x, size_t from, size_t to) {
    for (int k = 1; k < 4; k++) memmove(x->data + k * to, x->data + k * from, to * sizeof(int32_t));
}

static int batcher_next(lua_State *L) {
    lbatcher *b = check_batcher(L, 1);
    size_t bt = (size_t)b->B * (size_t)b->T;
    size_t ints = 4 * bt; /* the int32 arrays, then the B doubles (16 * bt bytes: aligned) */
    lbatch *x = lua_newuserdatauv(L, sizeof *x + ints * sizeof(int32_t) + (size_t)b->B * sizeof(double), 0);
    x->B = b->B;
    x->T = b->T;
    x->pairs = b->examples->paired;
    x->has_ref_logps = b->examples->has_ref_logps;
    x->ref_logps = (double *)(void *)(x->data + ints);
    x->advantages = x->old_logps = NULL;
    luaL_setmetatable(L, BATCH_MT);
    mt_batch_info info;
    mt_error err = {0};
    if (mt_batcher_next(b->b, x->data, x->data + bt, x->data + 2 * bt, x->data + 3 * bt, x->ref_logps, &info,
                        &err))
        return bind_raise(L, &err);
    /* a rank's rows may all be padding at the end of an epoch: one column of them */
    const int longest = info.longest > 0 ? info.longest : 1;
    if (b->narrow && longest < b->T) { /* padding columns cost compute, change nothing */
        size_t nt = (size_t)b->B * (size_t)longest;
        mt_batch_narrow(x->data, x->data + bt, x->data + 2 * bt, x->data + 3 * bt, b->B, b->T, longest);
        batch_restride(x, bt, nt);
        x->T = longest;
    }
    if (b->share_prefix) {
        const size_t nt = (size_t)x->B * (size_t)x->T;
        int rows = x->B, width = x->T;
        if (mt_batch_share_prefix(x->data, x->data + nt, x->data + 2 * nt, x->data + 3 * nt, x->B,
                                  x->T, 1, &rows, &width, &err))
            return bind_raise(L, &err);
        batch_restride(x, nt, (size_t)rows * (size_t)width); /* rows * width <= nt */
        x->B = rows;
        x->T = width;
    }
    lua_createtable(L, 0, 7);
    bind_set_int(L, "examples", info.examples);
    bind_set_int(L, "pairs", info.pairs);
    bind_set_int(L, "rows", info.rows);
    bind_set_int(L, "tokens", info.tokens);
    bind_set_int(L, "targets", info.targets);
    bind_set_int(L, "epoch", (lua_Integer)info.epoch);
    bind_set_bool(L, "epoch_end", info.epoch_end);
    return 2;
}

/* The integer list field `key` of the table at idx (row `row` of rl_batch's list) into
 * out (at most cap items); returns its length. */
static int rl_id_list(lua_State *L, int idx, const char *key, int row, int32_t *out, int cap) {
    if (lua_getfield(L, idx, key) != LUA_TTABLE)
        return luaL_error(L, "rl_batch: row %d: '%s' must be a list of token ids", row, key);
    const int n = (int)lua_rawlen(L, -1);
    if (n > cap) return luaL_error(L, "rl_batch: row %d: %d tokens do not fit seq_len", row, n);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, -1, i + 1);
        int ok = 0;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < 0 || v > INT32_MAX)
            return luaL_error(L, "rl_batch: row %d: %s[%d] is not a token id", row, key, i + 1);
        out[i] = (int32_t)v;
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return n;
}

/* mt.rl_batch(rows, {seq_len=, pad_id=0}) -> Batch of sampled completions for a
 * reinforcement-learning loss (grpo). rows[i] = {prompt_ids = {...}, ids = {...},
 * logps = {...}, advantage = x}: the prompt, the completion the model sampled, each
 * completion token's sampling log-probability (mt.generate's info with ids = true) and
 * the row's advantage. Row i holds the prompt then the completion; the targets are the
 * completion's tokens (each predicted from the position before it) and old_logps their
 * log-probabilities, aligned with the targets. The batch is as wide as its longest row
 * (at most seq_len); padding as the batcher pads. */
static int l_rl_batch(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    bind_check_opts(L, 2);
    const int B = (int)lua_rawlen(L, 1);
    if (B < 1 || B > MT_LIMIT_BATCH.max) return luaL_error(L, "rl_batch: %d rows (want 1 to %d)", B, (int)MT_LIMIT_BATCH.max);
    const int cap = (int)bind_opt_int_in(L, 2, "seq_len", MT_LIMIT_SEQ_LEN.max, &MT_LIMIT_SEQ_LEN);
    const lua_Integer pad = bind_opt_int(L, 2, "pad_id", 0);
    if (pad < 0 || pad > INT32_MAX) return luaL_error(L, "rl_batch: pad_id %I is not a token id", pad);
    /* first pass: the width */
    int T = 1;
    for (int r = 0; r < B; r++) {
        if (lua_rawgeti(L, 1, r + 1) != LUA_TTABLE) return luaL_error(L, "rl_batch: row %d is not a table", r + 1);
        int n = 0;
        for (int k = 0; k < 2; k++) {
            lua_getfield(L, -1, k ? "ids" : "prompt_ids");
            n += lua_istable(L, -1) ? (int)lua_rawlen(L, -1) : 0;
            lua_pop(L, 1);
        }
        if (n > cap) return luaL_error(L, "rl_batch: row %d has %d tokens, more than seq_len %d", r + 1, n, cap);
        if (n > T) T = n;
        lua_pop(L, 1);
    }
    const size_t bt = (size_t)B * (size_t)T, ints = 4 * bt;
    const size_t bytes = sizeof(lbatch) + ints * sizeof(int32_t) + (size_t)B * sizeof(double) +
                         (size_t)B * sizeof(float) + bt * sizeof(float);
    lbatch *x = lua_newuserdatauv(L, bytes, 0);
    const int ud = lua_gettop(L);
    x->B = B;
    x->T = T;
    x->pairs = 0;
    x->has_ref_logps = 0;
    x->ref_logps = (double *)(void *)(x->data + ints);
    x->advantages = (float *)(void *)(x->ref_logps + B);
    x->old_logps = x->advantages + B;
    luaL_setmetatable(L, BATCH_MT);
    int32_t *tokens = x->data, *positions = x->data + bt, *segments = x->data + 2 * bt,
            *targets = x->data + 3 * bt;
    for (int r = 0; r < B; r++) {
        lua_rawgeti(L, 1, r + 1);
        const int row = lua_gettop(L);
        int32_t *tok = tokens + (size_t)r * T;
        const int np = rl_id_list(L, row, "prompt_ids", r + 1, tok, T);
        if (np < 1) return luaL_error(L, "rl_batch: row %d has an empty prompt", r + 1);
        const int nc = rl_id_list(L, row, "ids", r + 1, tok + np, T - np);
        if (lua_getfield(L, row, "logps") != LUA_TTABLE || (int)lua_rawlen(L, -1) != nc)
            return luaL_error(L, "rl_batch: row %d: 'logps' must list one log-probability per completion token (%d)",
                              r + 1, nc);
        float *old = x->old_logps + (size_t)r * T;
        int32_t *tgt = targets + (size_t)r * T;
        for (int t = 0; t < T; t++) {
            old[t] = 0.0f;
            tgt[t] = MT_IGNORE_INDEX;
        }
        for (int j = 0; j < nc; j++) { /* completion token j is predicted at position np + j - 1 */
            lua_rawgeti(L, -1, j + 1);
            int ok = 0;
            const lua_Number v = lua_tonumberx(L, -1, &ok);
            if (!ok || !(v <= 0.0) || isinf(v))
                return luaL_error(L, "rl_batch: row %d: logps[%d] is not a log-probability", r + 1, j + 1);
            lua_pop(L, 1);
            old[np + j - 1] = (float)v;
            tgt[np + j - 1] = tok[np + j];
        }
        lua_pop(L, 1); /* logps */
        lua_getfield(L, row, "advantage");
        int ok = 0;
        const lua_Number a = lua_tonumberx(L, -1, &ok);
        if (!ok || !isfinite(a)) return luaL_error(L, "rl_batch: row %d: 'advantage' must be a finite number", r + 1);
        x->advantages[r] = (float)a;
        x->ref_logps[r] = NAN;
        lua_pop(L, 2); /* advantage, the row */
        const int used = np + nc;
        for (int t = 0; t < T; t++) {
            const size_t at = (size_t)r * T + (size_t)t;
            if (t < used) {
                positions[at] = t;
                segments[at] = 0;
            } else { /* padding: its own segment */
                tokens[at] = (int32_t)pad;
                positions[at] = t - used;
                segments[at] = MT_PAD_SEGMENT;
            }
        }
    }
    lua_settop(L, ud);
    return 1;
}

static int batcher_cursor(lua_State *L) {
    mt_cursor c = mt_batcher_get_cursor(check_batcher(L, 1)->b);
    lua_createtable(L, 0, 2);
    bind_set_int(L, "epoch", (lua_Integer)c.epoch);
    bind_set_int(L, "position", (lua_Integer)c.position);
    return 1;
}

static int batcher_set_cursor(lua_State *L) {
    lbatcher *b = check_batcher(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    mt_cursor c = {(uint64_t)bind_opt_int(L, 2, "epoch", 0), (uint64_t)bind_opt_int(L, 2, "position", 0)};
    mt_error err = {0};
    if (mt_batcher_set_cursor(b->b, c, &err)) return bind_raise(L, &err);
    return 0;
}

/* batcher:batches_per_epoch([epoch]) (default: the cursor's epoch) */
static int batcher_batches_per_epoch(lua_State *L) {
    lbatcher *b = check_batcher(L, 1);
    lua_Integer epoch = luaL_optinteger(L, 2, (lua_Integer)mt_batcher_get_cursor(b->b).epoch);
    lua_pushinteger(L, (lua_Integer)mt_batcher_batches_per_epoch(b->b, (uint64_t)epoch));
    return 1;
}

static int batch_shape(lua_State *L) {
    lbatch *x = luaL_checkudata(L, 1, BATCH_MT);
    lua_pushinteger(L, x->B);
    lua_pushinteger(L, x->T);
    return 2;
}

/* batch:tokens() / batch:targets(): flat (B*T) lists, for inspection */
static int batch_list(lua_State *L, int which) {
    lbatch *x = luaL_checkudata(L, 1, BATCH_MT);
    size_t bt = (size_t)x->B * (size_t)x->T;
    lua_createtable(L, (int)bt, 0);
    for (size_t i = 0; i < bt; i++) {
        lua_pushinteger(L, x->data[(size_t)which * bt + i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}
static int batch_tokens(lua_State *L) { return batch_list(L, 0); }
static int batch_targets(lua_State *L) { return batch_list(L, 3); }

/* ---- registration ---- */

static const luaL_Reg examples_methods[] = {
    {"stats", examples_stats}, {"count", examples_count}, {"paired", examples_paired}, {"split", examples_split},
    {"ref_logps", examples_ref_logps}, {"set_ref_logps", examples_set_ref_logps},
    {"close", examples_close}, {NULL, NULL},
};
static const luaL_Reg batcher_methods[] = {
    {"next", batcher_next},
    {"cursor", batcher_cursor},
    {"set_cursor", batcher_set_cursor},
    {"batches_per_epoch", batcher_batches_per_epoch},
    {"close", batcher_close},
    {NULL, NULL},
};
static const luaL_Reg batch_methods[] = {
    {"shape", batch_shape}, {"tokens", batch_tokens}, {"targets", batch_targets}, {"close", bind_noop},
    {NULL, NULL},
};
static const luaL_Reg records_methods[] = {{NULL, NULL}};

static const luaL_Reg functions[] = {
    {"examples", l_examples},
    {"examples_from_ids", l_examples_from_ids},
    {"records", l_records},
    {"batcher", l_batcher},
    {"rl_batch", l_rl_batch},
    {NULL, NULL},
};

void mt_bind_data_open(lua_State *L) {
    bind_new_class(L, EXAMPLES_MT, examples_methods, examples_gc, NULL);
    bind_new_class(L, BATCHER_MT, batcher_methods, batcher_close, NULL);
    bind_new_class(L, BATCH_MT, batch_methods, NULL, NULL);
    bind_new_class(L, RECORDS_MT, records_methods, records_gc, NULL);
    /* an explicit close of in-use examples raises; __close behaves as close() */
    luaL_getmetatable(L, EXAMPLES_MT);
    lua_pushcfunction(L, examples_close);
    lua_setfield(L, -2, "__close");
    lua_pop(L, 1);
    luaL_setfuncs(L, functions, 0);
}
