/* chat_render.c — chat template (a Lua function of moontune.chat, or the model's own
 * Jinja template through moontune.jinja) + tokenizer + span mask = training examples. */
#include "lua/chat_render.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "lua/lua_state.h"

mt_status mt_chat_template_push(lua_State *L, const mt_tokenizer *tok, const char *name,
                                const char **resolved, mt_error *err) {
    lua_getglobal(L, "require");
    lua_pushstring(L, "moontune.chat");
    mt_status st = mt_lua_pcall(L, 1, 1, err);
    if (st) return st;
    int chat = lua_gettop(L);
    /* chat.resolve(name, chat_template, bos, eos) -> render, resolved | nil, why: "auto"
     * (or NULL) picks the hand-written family when it renders like the model's own
     * template, the model's template through the Jinja engine otherwise; "jinja"
     * always uses the engine; any other name is a hand-written template */
    lua_getfield(L, chat, "resolve");
    lua_pushstring(L, name ? name : "auto");
    const char *tmpl = tok ? mt_tokenizer_chat_template(tok) : NULL;
    if (tmpl) lua_pushstring(L, tmpl);
    else lua_pushnil(L);
    int32_t bos = tok ? mt_tokenizer_bos(tok) : -1, eos = tok ? mt_tokenizer_eos(tok) : -1;
    if (bos >= 0) lua_pushstring(L, mt_tokenizer_token_text(tok, bos));
    else lua_pushnil(L);
    if (eos >= 0) lua_pushstring(L, mt_tokenizer_token_text(tok, eos));
    else lua_pushnil(L);
    if ((st = mt_lua_pcall(L, 4, 2, err))) {
        lua_pop(L, 1);
        return st;
    }
    /* an unknown name or a template the engine cannot compile is the user's mistake,
     * told without a traceback */
    if (lua_isnil(L, -2)) {
        st = mt_error_set(err, MT_ERR_INVALID_ARG, "%s", lua_tostring(L, -1));
        lua_pop(L, 3);
        return st;
    }
    /* stack: chat, render, resolved name (a string the chat module keeps) */
    if (resolved) *resolved = lua_tostring(L, -1);
    lua_pop(L, 1);
    lua_remove(L, chat);
    return MT_OK;
}

/* Reads the spans table at stack index idx into a fresh array. */
static mt_status read_spans(lua_State *L, int idx, size_t text_len, mt_span **out, size_t *n,
                            const char *where, mt_error *err) {
    if (!lua_istable(L, idx))
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: the chat template returned no spans table",
                            where);
    size_t count = (size_t)lua_rawlen(L, idx);
    mt_span *spans = mt_calloc(count ? count : 1, sizeof *spans, "spans", err);
    if (!spans) return MT_ERR_NOMEM;
    for (size_t i = 0; i < count; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i + 1);
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        int ok = lua_isinteger(L, -2) && lua_isinteger(L, -1);
        lua_Integer a = lua_tointeger(L, -2), b = lua_tointeger(L, -1);
        lua_pop(L, 3);
        if (!ok || a < 0 || b < a || (size_t)b > text_len) {
            free(spans);
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: span %zu of the chat template is not {start, stop} with "
                                "0 <= start <= stop <= %zu",
                                where, i + 1, text_len);
        }
        spans[i].start = (size_t)a;
        spans[i].end = (size_t)b;
    }
    *out = spans;
    *n = count;
    return MT_OK;
}

/* Renders messages a[0, na) then b[0, nb) with the render function at stack index
 * `render`; pushes the text and leaves it on the stack. *spans receives the spans of the
 * assistant messages from index `first_span` on (0: all of them). */
static mt_status render_conversation(lua_State *L, int render, const mt_message *a, int na,
                                     const mt_message *b, int nb, const char *bos,
                                     const char *eos, int first_span, const char **text,
                                     size_t *len, mt_span **spans, size_t *n_spans,
                                     const char *where, mt_error *err) {
    lua_pushvalue(L, render);
    lua_createtable(L, na + nb, 0);
    for (int i = 0; i < na + nb; i++) {
        const mt_message *m = i < na ? &a[i] : &b[i - na];
        lua_createtable(L, 0, 2);
        lua_pushstring(L, m->role);
        lua_setfield(L, -2, "role");
        lua_pushstring(L, m->content);
        lua_setfield(L, -2, "content");
        lua_rawseti(L, -2, i + 1);
    }
    lua_createtable(L, 0, 2);
    if (bos) {
        lua_pushstring(L, bos);
        lua_setfield(L, -2, "bos");
    }
    if (eos) {
        lua_pushstring(L, eos);
        lua_setfield(L, -2, "eos");
    }
    mt_status st = mt_lua_pcall(L, 2, 2, err);
    if (st) {
        char msg[MT_ERROR_MSG_MAX];
        snprintf(msg, sizeof msg, "%s", err ? err->msg : "");
        /* the template's message names its own position (a Jinja template's line and
         * column, a Lua function's file and line): the Lua traceback adds nothing */
        char *trace = strstr(msg, "\nstack traceback:");
        if (trace) *trace = '\0';
        return mt_error_set(err, st, "%s: chat template: %s", where, msg);
    }
    *text = lua_tolstring(L, -2, len);
    if (!*text) {
        lua_pop(L, 2);
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: the chat template returned no text", where);
    }
    st = read_spans(L, lua_gettop(L), *len, spans, n_spans, where, err);
    lua_pop(L, 1); /* the spans; the text stays */
    if (st) {
        lua_pop(L, 1);
        return st;
    }
    if (first_span > 0) {
        int assistants = 0;
        for (int i = 0; i < na + nb; i++) {
            const mt_message *m = i < na ? &a[i] : &b[i - na];
            assistants += !strcmp(m->role, "assistant");
        }
        if ((size_t)assistants != *n_spans) {
            free(*spans);
            *spans = NULL;
            lua_pop(L, 1);
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: the chat template returned %zu spans for %d assistant "
                                "messages; a preference pair needs one span per assistant "
                                "message to find the reply",
                                where, *n_spans, assistants);
        }
        memmove(*spans, *spans + first_span, (*n_spans - (size_t)first_span) * sizeof **spans);
        *n_spans -= (size_t)first_span;
    }
    return MT_OK;
}

/* A preference record: the prompt with each reply, both trained on the reply only. */
static mt_status add_preference(lua_State *L, int render, const mt_tokenizer *tok,
                                const mt_record *rec, const char *bos, const char *eos,
                                mt_example_set *out, const char *where, mt_error *err) {
    if (out->opt.train_on_inputs)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: train_on_inputs does not apply to preference pairs: their "
                            "log-probabilities are taken over the replies only",
                            where);
    int prompt_assistants = 0;
    for (int i = 0; i < rec->n_messages; i++)
        prompt_assistants += !strcmp(rec->messages[i].role, "assistant");
    mt_token_list lists[2] = {{0}, {0}};
    uint8_t *masks[2] = {NULL, NULL};
    mt_status st = MT_OK;
    for (int side = 0; side < 2 && !st; side++) {
        const char *text;
        size_t len;
        mt_span *spans = NULL;
        size_t n_spans = 0;
        /* a prompt without assistant turns still needs first_span > 0 for the check */
        st = render_conversation(L, render, rec->messages, rec->n_messages,
                                 side ? rec->rejected : rec->chosen,
                                 side ? rec->n_rejected : rec->n_chosen, bos, eos,
                                 prompt_assistants, &text, &len, &spans, &n_spans, where, err);
        if (st) break;
        st = mt_example_encode(out, tok, text, len, spans, n_spans, rec->file, rec->line,
                               &lists[side], &masks[side], err);
        free(spans);
        lua_pop(L, 1); /* the text */
    }
    if (!st)
        st = mt_example_set_add_pair(out, lists[0].ids, masks[0], lists[0].n, lists[1].ids,
                                     masks[1], lists[1].n, rec->file, rec->line, err);
    for (int side = 0; side < 2; side++) {
        mt_token_list_free(&lists[side]);
        free(masks[side]);
    }
    return st;
}

mt_status mt_examples_from_records(lua_State *L, const mt_tokenizer *tok,
                                   const mt_record_set *records, mt_example_set *out,
                                   mt_error *err) {
    int render = lua_gettop(L);
    /* the set names its source files in later messages (an empty held-out set, ...) */
    mt_status fst = mt_example_set_set_files(out, records->files, records->n_files, err);
    if (fst) return fst;
    const char *bos = mt_tokenizer_bos(tok) >= 0 ? mt_tokenizer_token_text(tok, mt_tokenizer_bos(tok)) : NULL;
    const char *eos = mt_tokenizer_eos(tok) >= 0 ? mt_tokenizer_token_text(tok, mt_tokenizer_eos(tok)) : NULL;
    for (size_t r = 0; r < records->n; r++) {
        const mt_record *rec = &records->records[r];
        char where[600];
        snprintf(where, sizeof where, "%s:%lld",
                 rec->file >= 0 && rec->file < records->n_files ? records->files[rec->file] : "?",
                 (long long)rec->line);
        mt_status st;
        if (rec->format == MT_DATA_PREFERENCE) {
            if ((st = add_preference(L, render, tok, rec, bos, eos, out, where, err))) return st;
            continue;
        }
        if (rec->text) {
            size_t len = strlen(rec->text);
            mt_span whole = {0, len};
            st = mt_example_set_add_text(out, tok, rec->text, len, &whole, 1, rec->file, rec->line, err);
            if (st) return st;
            continue;
        }
        const char *text;
        size_t len;
        mt_span *spans = NULL;
        size_t n_spans = 0;
        st = render_conversation(L, render, rec->messages, rec->n_messages, NULL, 0, bos, eos, 0,
                                 &text, &len, &spans, &n_spans, where, err);
        if (st) return st;
        st = mt_example_set_add_text(out, tok, text, len, spans, n_spans, rec->file, rec->line, err);
        free(spans);
        lua_pop(L, 1);
        if (st) return st;
    }
    return MT_OK;
}

mt_status mt_examples_from_files(const char *const *paths, int n_paths,
                                 const mt_jsonl_options *jsonl, const mt_tokenizer *tok,
                                 const char *template_name, mt_example_set *out,
                                 mt_record_set *records, mt_error *err) {
    mt_record_set local;
    mt_record_set *set = records ? records : &local;
    if (!records) mt_record_set_init(&local);
    mt_status st = MT_OK;
    for (int i = 0; i < n_paths && !st; i++) st = mt_records_load(paths[i], jsonl, set, err);
    lua_State *L = NULL;
    if (!st && !(L = mt_lua_open(err))) st = MT_ERR_NOMEM;
    if (!st && !(st = mt_chat_template_push(L, tok, template_name, NULL, err)))
        st = mt_examples_from_records(L, tok, set, out, err);
    if (L) lua_close(L);
    if (!records) mt_record_set_free(&local);
    return st;
}
