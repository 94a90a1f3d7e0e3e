/* dataset_jsonl.c — JSONL records in the common shapes (alpaca, chat, prompt/completion,
 * text, preference pairs), normalised to messages, with errors that name the file, the
 * line and the field, and a skip policy for bad records. */
#include "text/dataset.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "base/internal.h"
#include "formats/csv.h"
#include "formats/sha256.h"

/* ---- formats and field names ------------------------------------------------ */

static const char *const format_names[] = {
    [MT_DATA_AUTO] = "auto",
    [MT_DATA_ALPACA] = "alpaca",
    [MT_DATA_CHAT] = "chat",
    [MT_DATA_PROMPT_COMPLETION] = "prompt_completion",
    [MT_DATA_TEXT] = "text",
    [MT_DATA_PREFERENCE] = "preference",
};

const char *mt_data_format_name(mt_data_format f) {
    if ((unsigned)f < sizeof format_names / sizeof format_names[0]) return format_names[f];
    return "unknown";
}

int mt_data_format_parse(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < (int)(sizeof format_names / sizeof format_names[0]); i++)
        if (strcmp(name, format_names[i]) == 0) return i;
    return -1;
}

typedef struct fields {
    const char *instruction, *input, *output, *messages, *role, *content, *prompt, *completion,
        *text, *chosen, *rejected;
} fields;

static fields resolve_fields(const mt_data_fields *f) {
    fields r = {"instruction", "input",  "output", "messages", "role",    "content",
                "prompt",      "completion", "text", "chosen", "rejected"};
    if (!f) return r;
#define PICK(x) if (f->x) r.x = f->x
    PICK(instruction); PICK(input); PICK(output); PICK(messages); PICK(role); PICK(content);
    PICK(prompt); PICK(completion); PICK(text); PICK(chosen); PICK(rejected);
#undef PICK
    return r;
}

/* ---- one line's context: where we are, for messages -------------------------- */

typedef struct ctx {
    const char *name;
    int64_t line;
    fields f;
    mt_error *err;
} ctx;

static mt_status bad(const ctx *c, const char *fmt, ...) MT_PRINTF(2, 3);
static mt_status bad(const ctx *c, const char *fmt, ...) {
    char what[MT_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return mt_error_set(c->err, MT_ERR_FORMAT, "%s:%lld: %s", c->name, (long long)c->line, what);
}

static char *dupn(const char *s, size_t n, mt_error *err) {
    char *p = mt_malloc(n + 1, "dataset string", err);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n' && s[i] != '\f' &&
            s[i] != '\v')
            return 0;
    return 1;
}

/* ---- records ---------------------------------------------------------------- */

static void messages_free(mt_message *m, int n) {
    for (int i = 0; i < n; i++) {
        free(m[i].role);
        free(m[i].content);
    }
    free(m);
}

static void record_free(mt_record *r) {
    messages_free(r->messages, r->n_messages);
    messages_free(r->chosen, r->n_chosen);
    messages_free(r->rejected, r->n_rejected);
    free(r->text);
    memset(r, 0, sizeof *r);
}

/* A required string field: a missing field and a wrong type are errors; when
 * nonempty, so is a blank one. */
static mt_status get_string(const ctx *c, json_t *obj, const char *key, int required,
                            int nonempty, const char *blank_what, const char **s, size_t *n) {
    json_t *v = json_object_get(obj, key);
    *s = NULL;
    *n = 0;
    if (!v || (!required && json_is_null(v))) {
        if (required) return bad(c, "field '%s': missing", key);
        return MT_OK;
    }
    if (!json_is_string(v))
        return bad(c, "field '%s': expected a string, found %s", key, mt_json_kind(v));
    *s = json_string_value(v);
    *n = json_string_length(v);
    if (nonempty && is_blank(*s, *n)) return bad(c, "field '%s': %s", key, blank_what);
    return MT_OK;
}

static const char *normal_role(const char *r) {
    static const char *const roles[] = {"system", "user", "assistant", "tool"};
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (strcmp(r, roles[i]) == 0) return roles[i];
    if (strcmp(r, "human") == 0) return "user";
    if (strcmp(r, "gpt") == 0) return "assistant";
    return NULL;
}

static mt_status set_message(mt_message *m, const char *role, const char *content, size_t n,
                             mt_error *err) {
    m->role = dupn(role, strlen(role), err);
    m->content = m->role ? dupn(content, n, err) : NULL;
    return m->content ? MT_OK : MT_ERR_NOMEM;
}

/* A list of {role, content} objects. `key` names the field in messages.
 * need_assistant: at least one assistant message; last_assistant: the last one is. Every
 * assistant message must be non-blank. */
static mt_status parse_messages(const ctx *c, json_t *arr, const char *key, int need_assistant,
                                int last_assistant, mt_message **out, int *n_out) {
    *out = NULL;
    *n_out = 0;
    size_t n = json_array_size(arr);
    if (n == 0) return bad(c, "field '%s': empty list of messages", key);
    if (n > INT32_MAX) return bad(c, "field '%s': too many messages", key);
    mt_message *m = mt_calloc(n, sizeof *m, "messages", c->err);
    if (!m) return MT_ERR_NOMEM;
    mt_status st = MT_OK;
    int assistants = 0;
    size_t i;
    for (i = 0; i < n && !st; i++) {
        json_t *e = json_array_get(arr, i);
        if (!json_is_object(e)) {
            st = bad(c, "field '%s[%zu]': expected an object with '%s' and '%s', found %s", key,
                     i, c->f.role, c->f.content, mt_json_kind(e));
            break;
        }
        json_t *r = json_object_get(e, c->f.role), *t = json_object_get(e, c->f.content);
        if (!r) st = bad(c, "field '%s[%zu].%s': missing", key, i, c->f.role);
        else if (!json_is_string(r))
            st = bad(c, "field '%s[%zu].%s': expected a string, found %s", key, i, c->f.role,
                     mt_json_kind(r));
        else if (!t) st = bad(c, "field '%s[%zu].%s': missing", key, i, c->f.content);
        else if (!json_is_string(t))
            st = bad(c, "field '%s[%zu].%s': expected a string, found %s", key, i, c->f.content,
                     mt_json_kind(t));
        if (st) break;
        const char *role = normal_role(json_string_value(r));
        if (!role) {
            st = bad(c, "field '%s[%zu].%s': unknown role '%.40s' (expected system, user, "
                        "assistant or tool; human and gpt are accepted)",
                     key, i, c->f.role, json_string_value(r));
            break;
        }
        const char *s = json_string_value(t);
        size_t sn = json_string_length(t);
        if (strcmp(role, "assistant") == 0) {
            assistants++;
            if (is_blank(s, sn)) {
                st = bad(c, "field '%s[%zu].%s': empty response", key, i, c->f.content);
                break;
            }
        }
        st = set_message(&m[i], role, s, sn, c->err);
    }
    if (!st && need_assistant && assistants == 0)
        st = bad(c, "field '%s': no assistant message", key);
    if (!st && last_assistant && strcmp(m[n - 1].role, "assistant") != 0)
        st = bad(c, "field '%s': the last message is a %s message, expected an assistant's", key,
                 m[n - 1].role);
    if (st) {
        messages_free(m, (int)n);
        return st;
    }
    *out = m;
    *n_out = (int)n;
    return MT_OK;
}

/* A field that is a string (one message with `role`) or a list of messages. */
static mt_status parse_turns(const ctx *c, json_t *obj, const char *key, const char *role,
                             int reply, mt_message **out, int *n_out) {
    *out = NULL;
    *n_out = 0;
    json_t *v = json_object_get(obj, key);
    if (!v) return bad(c, "field '%s': missing", key);
    if (json_is_array(v)) return parse_messages(c, v, key, reply, reply, out, n_out);
    if (!json_is_string(v))
        return bad(c, "field '%s': expected a string or a list of messages, found %s", key,
                   mt_json_kind(v));
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (reply && is_blank(s, n)) return bad(c, "field '%s': empty response", key);
    mt_message *m = mt_calloc(1, sizeof *m, "messages", c->err);
    if (!m) return MT_ERR_NOMEM;
    if (set_message(m, role, s, n, c->err)) {
        messages_free(m, 1);
        return MT_ERR_NOMEM;
    }
    *out = m;
    *n_out = 1;
    return MT_OK;
}

/* Concatenates two message lists into *a (consumes b). */
static mt_status append_messages(mt_message **a, int *na, mt_message *b, int nb, mt_error *err) {
    mt_message *m = realloc(*a, (size_t)(*na + nb) * sizeof *m);
    if (!m) {
        messages_free(b, nb);
        return mt_error_set(err, MT_ERR_NOMEM, "out of memory joining messages");
    }
    memcpy(m + *na, b, (size_t)nb * sizeof *b);
    free(b);
    *a = m;
    *na += nb;
    return MT_OK;
}

static mt_status parse_alpaca(const ctx *c, json_t *o, mt_record *r) {
    const char *ins, *inp, *out;
    size_t nins, ninp, nout;
    mt_status st = get_string(c, o, c->f.instruction, 1, 0, NULL, &ins, &nins);
    if (!st) st = get_string(c, o, c->f.input, 0, 0, NULL, &inp, &ninp);
    if (!st) st = get_string(c, o, c->f.output, 1, 1, "empty response", &out, &nout);
    if (st) return st;
    int has_input = inp && !is_blank(inp, ninp);
    if (is_blank(ins, nins) && !has_input) return bad(c, "field '%s': empty prompt", c->f.instruction);
    size_t nu = nins + (has_input ? 2 + ninp : 0);
    char *user = mt_malloc(nu + 1, "alpaca prompt", c->err);
    if (!user) return MT_ERR_NOMEM;
    memcpy(user, ins, nins);
    if (has_input) {
        memcpy(user + nins, "\n\n", 2);
        memcpy(user + nins + 2, inp, ninp);
    }
    user[nu] = '\0';
    r->messages = mt_calloc(2, sizeof *r->messages, "messages", c->err);
    if (!r->messages) {
        free(user);
        return MT_ERR_NOMEM;
    }
    r->n_messages = 2;
    r->messages[0].content = user;
    r->messages[0].role = dupn("user", 4, c->err);
    if (!r->messages[0].role || set_message(&r->messages[1], "assistant", out, nout, c->err))
        return MT_ERR_NOMEM;
    return MT_OK;
}

static mt_status parse_prompt_completion(const ctx *c, json_t *o, mt_record *r) {
    mt_status st = parse_turns(c, o, c->f.prompt, "user", 0, &r->messages, &r->n_messages);
    if (st) return st;
    mt_message *m;
    int n;
    st = parse_turns(c, o, c->f.completion, "assistant", 1, &m, &n);
    if (st) return st;
    return append_messages(&r->messages, &r->n_messages, m, n, c->err);
}

static mt_status parse_chat(const ctx *c, json_t *o, mt_record *r) {
    json_t *v = json_object_get(o, c->f.messages);
    if (!v) return bad(c, "field '%s': missing", c->f.messages);
    if (!json_is_array(v))
        return bad(c, "field '%s': expected a list of messages, found %s", c->f.messages,
                   mt_json_kind(v));
    return parse_messages(c, v, c->f.messages, 1, 0, &r->messages, &r->n_messages);
}

static mt_status parse_text(const ctx *c, json_t *o, mt_record *r) {
    const char *s;
    size_t n;
    mt_status st = get_string(c, o, c->f.text, 1, 1, "empty text", &s, &n);
    if (st) return st;
    r->text = dupn(s, n, c->err);
    return r->text ? MT_OK : MT_ERR_NOMEM;
}

static int same_message(const mt_message *a, const mt_message *b) {
    return !strcmp(a->role, b->role) && !strcmp(a->content, b->content);
}

/* Moves messages [from, n) of *m into a fresh list *out (the rest stay in *m). */
static mt_status split_messages(mt_message **m, int *n, int from, mt_message **out, int *n_out,
                                mt_error *err) {
    *out = mt_calloc((size_t)(*n - from), sizeof **out, "messages", err);
    if (!*out) return MT_ERR_NOMEM;
    memcpy(*out, *m + from, (size_t)(*n - from) * sizeof **out);
    *n_out = *n - from;
    *n = from;
    return MT_OK;
}

/* A preference record: a prompt (a string or messages) and two replies (a string, one
 * assistant message, or messages ending in an assistant's). Without a prompt field, chosen
 * and rejected are whole conversations and the messages they share at the start are the
 * prompt (TRL's implicit prompt). Two identical replies teach nothing: a bad record. */
static mt_status parse_preference(const ctx *c, json_t *o, mt_record *r) {
    json_t *p = json_object_get(o, c->f.prompt);
    if (p && json_is_string(p) && is_blank(json_string_value(p), json_string_length(p)))
        return bad(c, "field '%s': empty prompt", c->f.prompt);
    mt_status st = MT_OK;
    if (p) st = parse_turns(c, o, c->f.prompt, "user", 0, &r->messages, &r->n_messages);
    if (!st) st = parse_turns(c, o, c->f.chosen, "assistant", 1, &r->chosen, &r->n_chosen);
    if (!st) st = parse_turns(c, o, c->f.rejected, "assistant", 1, &r->rejected, &r->n_rejected);
    if (st) return st;
    if (!p) {
        if (!json_is_array(json_object_get(o, c->f.chosen)) ||
            !json_is_array(json_object_get(o, c->f.rejected)))
            return bad(c, "field '%s': missing (without it, '%s' and '%s' must be whole "
                          "conversations that share the prompt's messages)",
                       c->f.prompt, c->f.chosen, c->f.rejected);
        int k = 0;
        while (k < r->n_chosen && k < r->n_rejected &&
               same_message(&r->chosen[k], &r->rejected[k]))
            k++;
        if (k == 0)
            return bad(c, "fields '%s' and '%s': the conversations share no first message, so "
                          "there is no prompt (give a '%s' field)",
                       c->f.chosen, c->f.rejected, c->f.prompt);
        if (k == r->n_chosen || k == r->n_rejected)
            return bad(c, "fields '%s' and '%s': one conversation is the start of the other, "
                          "so one side has no reply",
                       c->f.chosen, c->f.rejected);
        /* the shared start becomes the prompt; each side keeps its replies */
        mt_message *rest_c, *rest_r;
        int n_rest_c, n_rest_r;
        if (split_messages(&r->chosen, &r->n_chosen, k, &rest_c, &n_rest_c, c->err))
            return MT_ERR_NOMEM;
        if (split_messages(&r->rejected, &r->n_rejected, k, &rest_r, &n_rest_r, c->err)) {
            messages_free(rest_c, n_rest_c);
            return MT_ERR_NOMEM;
        }
        r->messages = r->chosen;
        r->n_messages = r->n_chosen;
        messages_free(r->rejected, r->n_rejected); /* the same messages as the prompt */
        r->chosen = rest_c;
        r->n_chosen = n_rest_c;
        r->rejected = rest_r;
        r->n_rejected = n_rest_r;
    }
    if (r->n_chosen == r->n_rejected) {
        int i = 0;
        while (i < r->n_chosen && same_message(&r->chosen[i], &r->rejected[i])) i++;
        if (i == r->n_chosen)
            return bad(c, "fields '%s' and '%s': the chosen and rejected replies are the same",
                       c->f.chosen, c->f.rejected);
    }
    return MT_OK;
}

static mt_data_format detect(const ctx *c, json_t *o) {
    if (json_object_get(o, c->f.chosen) && json_object_get(o, c->f.rejected))
        return MT_DATA_PREFERENCE;
    if (json_object_get(o, c->f.messages)) return MT_DATA_CHAT;
    if (json_object_get(o, c->f.instruction)) return MT_DATA_ALPACA;
    if (json_object_get(o, c->f.completion)) return MT_DATA_PROMPT_COMPLETION;
    if (json_object_get(o, c->f.text)) return MT_DATA_TEXT;
    return MT_DATA_AUTO;
}

/* ---- the line loop -------------------------------------------------------------- */

typedef struct loader {
    ctx c;
    mt_data_format format; /* of this file; AUTO until detected */
    mt_bad_record_policy policy;
    mt_record_set *set;
    int32_t file;
} loader;

static mt_status push_record(mt_record_set *set, mt_record *r, mt_error *err) {
    if (set->n == set->cap) {
        size_t cap = set->cap ? set->cap * 2 : 64;
        mt_record *p = realloc(set->records, cap * sizeof *p);
        if (!p) return mt_error_set(err, MT_ERR_NOMEM, "out of memory growing the record list");
        set->records = p;
        set->cap = cap;
    }
    set->records[set->n++] = *r;
    return MT_OK;
}

/* One JSON object as a record, in the file's format (detected from the first good
 * record when AUTO). */
static mt_status record_from_object(loader *L, json_t *o, mt_record *r) {
    const ctx *c = &L->c;
    if (!json_is_object(o)) return bad(c, "expected a JSON object, found %s", mt_json_kind(o));
    mt_data_format fmt = L->format;
    if (fmt == MT_DATA_AUTO) {
        fmt = detect(c, o);
        if (fmt == MT_DATA_AUTO)
            return bad(c, "cannot tell the format: expected fields '%s'+'%s' (preference), '%s' "
                          "(chat), '%s' (alpaca), '%s' (prompt/completion) or '%s' (text)",
                       c->f.chosen, c->f.rejected, c->f.messages, c->f.instruction,
                       c->f.completion, c->f.text);
    }
    memset(r, 0, sizeof *r);
    r->format = fmt;
    r->file = L->file;
    r->line = c->line;
    mt_status st;
    switch (fmt) {
    case MT_DATA_ALPACA: st = parse_alpaca(c, o, r); break;
    case MT_DATA_CHAT: st = parse_chat(c, o, r); break;
    case MT_DATA_PROMPT_COMPLETION: st = parse_prompt_completion(c, o, r); break;
    case MT_DATA_TEXT: st = parse_text(c, o, r); break;
    case MT_DATA_PREFERENCE: st = parse_preference(c, o, r); break;
    default: st = mt_error_set(c->err, MT_ERR_INVALID_ARG, "unknown data format %d", (int)fmt);
    }
    if (st) {
        record_free(r);
        return st;
    }
    L->format = fmt; /* the first good record fixes the format of the file */
    return MT_OK;
}

static mt_status parse_record(loader *L, const char *s, size_t n, mt_record *r) {
    const ctx *c = &L->c;
    size_t badbyte = mt_utf8_bad_at((const unsigned char *)s, n);
    if (badbyte != n)
        return bad(c, "invalid UTF-8 at byte %zu of the line (0x%02X)", badbyte + 1,
                   (unsigned)(unsigned char)s[badbyte]);
    json_error_t jerr;
    json_t *o = json_loadb(s, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!o) return bad(c, "malformed JSON at column %d: %s", jerr.column, jerr.text);
    mt_status st = record_from_object(L, o, r);
    json_decref(o);
    return st;
}

/* What one record's parse (status st, its error in *local) leaves: the record kept, a bad
 * record counted and skipped (MT_ERR_FORMAT under the skip policy), or the error. */
static mt_status settle(loader *L, mt_status st, mt_record *r, const mt_error *local) {
    mt_error *err = L->c.err;
    if (st == MT_OK) {
        st = push_record(L->set, r, err);
        if (st) record_free(r);
        return st;
    }
    if (st != MT_ERR_FORMAT || L->policy != MT_BAD_RECORD_SKIP) {
        if (err) *err = *local;
        return st;
    }
    mt_record_set *set = L->set;
    if (set->n_bad_kept < MT_BAD_RECORDS_KEPT) {
        mt_bad_record *b = &set->bad[set->n_bad_kept++];
        b->file = L->file;
        b->line = L->c.line;
        memcpy(b->msg, local->msg, sizeof b->msg);
    }
    set->n_bad++;
    return MT_OK;
}

static mt_status process_line(loader *L, const char *s, size_t n) {
    if (L->c.line == 1 && n >= 3 && memcmp(s, "\xEF\xBB\xBF", 3) == 0) {
        s += 3;
        n -= 3;
    }
    while (n > 0 && (s[n - 1] == '\r' || s[n - 1] == '\n')) n--;
    if (is_blank(s, n)) return MT_OK;
    mt_record r;
    mt_error local = {0};
    mt_error *err = L->c.err;
    L->c.err = &local;
    mt_status st = parse_record(L, s, n, &r);
    L->c.err = err;
    return settle(L, st, &r, &local);
}

void mt_record_set_init(mt_record_set *set) { memset(set, 0, sizeof *set); }

void mt_record_set_free(mt_record_set *set) {
    if (!set) return;
    for (size_t i = 0; i < set->n; i++) record_free(&set->records[i]);
    free(set->records);
    for (int i = 0; i < set->n_files; i++) free(set->files[i]);
    free(set->files);
    memset(set, 0, sizeof *set);
}

typedef struct saved {
    size_t n;
    int n_files;
    int64_t n_bad;
    int n_bad_kept;
} saved;

static mt_status begin(const char *name, const mt_jsonl_options *opt, mt_record_set *set,
                       loader *L, saved *sv, mt_error *err) {
    mt_jsonl_options def = {0};
    if (!opt) opt = &def;
    if (opt->format < MT_DATA_AUTO || opt->format > MT_DATA_PREFERENCE)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: unknown data format %d", name,
                            (int)opt->format);
    *sv = (saved){set->n, set->n_files, set->n_bad, set->n_bad_kept};
    char **files = realloc(set->files, (size_t)(set->n_files + 1) * sizeof *files);
    if (!files) return mt_error_set(err, MT_ERR_NOMEM, "out of memory for the file list");
    set->files = files;
    set->files[set->n_files] = mt_strdup(name, "file name", err);
    if (!set->files[set->n_files]) return MT_ERR_NOMEM;
    set->n_files++;
    memset(L, 0, sizeof *L);
    L->c.name = name;
    L->c.f = resolve_fields(opt->fields);
    L->c.err = err;
    L->format = opt->format;
    L->policy = opt->on_bad_record;
    L->set = set;
    L->file = (int32_t)(set->n_files - 1);
    return MT_OK;
}

static mt_status finish(loader *L, const saved *sv, mt_status st) {
    mt_record_set *set = L->set;
    if (st == MT_OK && set->n == sv->n) /* named here: later, "the held-out set is empty" could not say which file */
        st = mt_error_set(L->c.err, MT_ERR_FORMAT, "%s: no records (%s)", L->c.name,
                          set->n_bad > sv->n_bad ? "every record was bad and skipped"
                                                 : "the file is empty or holds only blank lines");
    if (st == MT_OK) {
        set->format = L->format;
        return MT_OK;
    }
    for (size_t i = sv->n; i < set->n; i++) record_free(&set->records[i]);
    set->n = sv->n;
    for (int i = sv->n_files; i < set->n_files; i++) free(set->files[i]);
    set->n_files = sv->n_files;
    set->n_bad = sv->n_bad;
    set->n_bad_kept = sv->n_bad_kept;
    return st;
}

mt_status mt_records_parse_jsonl(const char *name, const char *data, size_t len,
                                 const mt_jsonl_options *opt, mt_record_set *set, mt_error *err) {
    loader L;
    saved sv;
    if (!name) name = "<memory>";
    mt_status st = begin(name, opt, set, &L, &sv, err);
    if (st) return st;
    size_t pos = 0;
    while (pos < len && !st) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - data) : len;
        L.c.line++;
        st = process_line(&L, data + pos, end - pos);
        pos = end + 1;
    }
    return finish(&L, &sv, st);
}

/* The JSONL reader of a file; digest (optional) receives every byte read, so the
 * caller's digest is of exactly the bytes the records came from. */
static mt_status load_jsonl(const char *path, const mt_jsonl_options *opt, mt_record_set *set,
                            mt_sha256_ctx *digest, mt_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return mt_error_set(err, MT_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    loader L;
    saved sv;
    mt_status st = begin(path, opt, set, &L, &sv, err);
    if (st) {
        fclose(f);
        return st;
    }
    char *buf = NULL;
    size_t cap = 0;
    ssize_t got;
    errno = 0;
    while (!st && (got = getline(&buf, &cap, f)) >= 0) {
        if (digest) mt_sha256_update(digest, buf, (size_t)got);
        L.c.line++;
        st = process_line(&L, buf, (size_t)got);
    }
    if (!st && ferror(f))
        st = mt_error_set(err, MT_ERR_IO, "%s:%lld: read error: %s", path,
                          (long long)L.c.line + 1, strerror(errno));
    free(buf);
    fclose(f);
    return finish(&L, &sv, st);
}

mt_status mt_records_load_jsonl(const char *path, const mt_jsonl_options *opt,
                                mt_record_set *set, mt_error *err) {
    return load_jsonl(path, opt, set, NULL, err);
}

/* ---- CSV and TSV ------------------------------------------------------------------ */

/* A cell as a JSON value. Cells are strings; a cell of a column that may hold messages
 * (messages, prompt, chosen, rejected) and reads whole as a JSON array is that array,
 * so conversations survive a CSV export that wrote them as JSON text. */
static json_t *cell_value(const ctx *c, const char *key, const char *cell, size_t len) {
    if (!strcmp(key, c->f.messages) || !strcmp(key, c->f.prompt) || !strcmp(key, c->f.chosen) ||
        !strcmp(key, c->f.rejected)) {
        size_t i = 0;
        while (i < len && (cell[i] == ' ' || cell[i] == '\t' || cell[i] == '\n' || cell[i] == '\r')) i++;
        if (i < len && cell[i] == '[') {
            json_t *v = json_loadb(cell, len, JSON_REJECT_DUPLICATES, NULL);
            if (json_is_array(v)) return v;
            json_decref(v);
        }
    }
    return json_stringn(cell, len);
}

/* One row as a record: its cells under the header's names, then as a JSONL object. */
static mt_status csv_row(loader *L, const mt_csv_reader *rd, char *const *header,
                         size_t n_header, mt_record *r) {
    const ctx *c = &L->c;
    if (rd->n_fields != n_header)
        return bad(c, "%zu fields where the header has %zu (a field that holds the delimiter, a "
                      "quote or a line break must be quoted)",
                   rd->n_fields, n_header);
    json_t *o = json_object();
    if (!o) return mt_error_set(c->err, MT_ERR_NOMEM, "%s: out of memory", c->name);
    for (size_t i = 0; i < n_header; i++) {
        const unsigned char *cell = (const unsigned char *)rd->fields[i];
        size_t at = mt_utf8_bad_at(cell, rd->lens[i]);
        if (at != rd->lens[i]) {
            json_decref(o);
            return bad(c, "column '%s': invalid UTF-8 at byte %zu of the field (0x%02X)",
                       header[i], at + 1, (unsigned)cell[at]);
        }
        json_t *v = cell_value(c, header[i], rd->fields[i], rd->lens[i]);
        if (!v || json_object_set_new(o, header[i], v)) {
            json_decref(o);
            return mt_error_set(c->err, MT_ERR_NOMEM, "%s: out of memory", c->name);
        }
    }
    mt_status st = record_from_object(L, o, r);
    json_decref(o);
    return st;
}

/* The header row: column names, non-empty, valid UTF-8, unique. */
static mt_status csv_header(const mt_csv_reader *rd, int64_t line, char ***out, mt_error *err) {
    char **names = mt_calloc(rd->n_fields, sizeof *names, "CSV header", err);
    if (!names) return MT_ERR_NOMEM;
    *out = names;
    for (size_t i = 0; i < rd->n_fields; i++) {
        const char *name = rd->fields[i];
        if (!rd->lens[i] || mt_utf8_bad_at((const unsigned char *)name, rd->lens[i]) != rd->lens[i])
            return mt_error_set(err, MT_ERR_FORMAT,
                                "%s:%lld: header: column %zu needs a name (non-empty UTF-8)",
                                rd->name, (long long)line, i + 1);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(names[j], name))
                return mt_error_set(err, MT_ERR_FORMAT,
                                    "%s:%lld: header: column '%s' appears twice (columns %zu and %zu)",
                                    rd->name, (long long)line, name, j + 1, i + 1);
        if (!(names[i] = mt_strdup(name, "CSV header", err))) return MT_ERR_NOMEM;
    }
    return MT_OK;
}

mt_status mt_records_parse_csv(const char *name, const char *data, size_t len, char delim,
                               const mt_jsonl_options *opt, mt_record_set *set, mt_error *err) {
    loader L;
    saved sv;
    if (!name) name = "<memory>";
    mt_status st = begin(name, opt, set, &L, &sv, err);
    if (st) return st;
    mt_csv_reader rd;
    mt_csv_init(&rd, name, data, len, delim);
    char **header = NULL;
    size_t n_header = 0;
    int got = 0;
    int64_t line = 0;
    if (!(st = mt_csv_next(&rd, &got, &line, err)) && got) {
        n_header = rd.n_fields;
        st = csv_header(&rd, line, &header, err);
    }
    while (!st && got) {
        if ((st = mt_csv_next(&rd, &got, &line, err)) || !got) break;
        L.c.line = line;
        mt_record r;
        mt_error local = {0};
        L.c.err = &local;
        st = csv_row(&L, &rd, header, n_header, &r);
        L.c.err = err;
        st = settle(&L, st, &r, &local);
    }
    for (size_t i = 0; header && i < n_header; i++) free(header[i]);
    free(header);
    mt_csv_free(&rd);
    return finish(&L, &sv, st);
}

/* The delimiter a file's name asks for: ',' for .csv, '\t' for .tsv, 0 for JSONL. */
static char delimiter_of(const char *path) {
    if (mt_ends_with(path, ".csv") || mt_ends_with(path, ".CSV")) return ',';
    if (mt_ends_with(path, ".tsv") || mt_ends_with(path, ".TSV")) return '\t';
    return 0;
}

mt_status mt_records_load_digest(const char *path, const mt_jsonl_options *opt,
                                 mt_record_set *set, uint8_t sha256[MT_SHA256_BYTES],
                                 mt_error *err) {
    mt_sha256_ctx digest;
    mt_sha256_init(&digest);
    const char delim = delimiter_of(path);
    mt_status st;
    if (!delim) {
        st = load_jsonl(path, opt, set, sha256 ? &digest : NULL, err);
    } else {
        char *data = NULL;
        size_t len = 0;
        if ((st = mt_read_file(path, &data, &len, err))) return st;
        if (sha256) mt_sha256_update(&digest, data, len);
        st = mt_records_parse_csv(path, data, len, delim, opt, set, err);
        free(data);
    }
    if (!st && sha256) mt_sha256_final(&digest, sha256);
    return st;
}

mt_status mt_records_load(const char *path, const mt_jsonl_options *opt, mt_record_set *set,
                          mt_error *err) {
    return mt_records_load_digest(path, opt, set, NULL, err);
}

void mt_record_set_print_bad(const mt_record_set *set, FILE *f) {
    if (set->n_bad == 0) return;
    fprintf(f, "skipped %lld bad record%s", (long long)set->n_bad, set->n_bad == 1 ? "" : "s");
    if (set->n_bad > set->n_bad_kept) fprintf(f, " (the first %d follow)", set->n_bad_kept);
    fputs(":\n", f);
    for (int i = 0; i < set->n_bad_kept; i++) fprintf(f, "  %s\n", set->bad[i].msg);
}

/* ---- deterministic shuffles and splits ------------------------------------------ */

/* Uniform in [0, bound) by rejection: the same draw on every platform. */
static uint64_t bounded(uint64_t *state, uint64_t bound) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t x;
    do x = mt_splitmix64(state);
    while (x >= limit);
    return x % bound;
}

void mt_shuffle_indices(size_t *idx, size_t n, uint64_t seed) {
    uint64_t state = seed;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)bounded(&state, (uint64_t)i);
        size_t t = idx[i - 1];
        idx[i - 1] = idx[j];
        idx[j] = t;
    }
}

mt_status mt_split_indices(size_t n, double fraction, uint64_t seed, size_t **train,
                           size_t *n_train, size_t **eval, size_t *n_eval, mt_error *err) {
    if (!(fraction >= 0.0 && fraction < 1.0))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "held-out fraction: expected a number in [0, 1), found %g", fraction);
    size_t ne = (size_t)(fraction * (double)n + 0.5);
    if (ne > n) ne = n;
    size_t *perm = mt_malloc(n * sizeof *perm, "split order", err);
    uint8_t *held = mt_calloc(n, 1, "split flags", err);
    size_t *tr = mt_malloc((n - ne) * sizeof *tr, "train indices", err);
    size_t *ev = mt_malloc(ne * sizeof *ev, "held-out indices", err);
    if (!perm || !held || !tr || !ev) {
        free(perm);
        free(held);
        free(tr);
        free(ev);
        return MT_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++) perm[i] = i;
    mt_shuffle_indices(perm, n, seed ^ 0x5EED5EED5EED5EEDull);
    for (size_t i = 0; i < ne; i++) held[perm[i]] = 1;
    size_t a = 0, b = 0;
    for (size_t i = 0; i < n; i++) {
        if (held[i]) ev[b++] = i;
        else tr[a++] = i;
    }
    free(perm);
    free(held);
    *train = tr;
    *n_train = a;
    *eval = ev;
    *n_eval = b;
    return MT_OK;
}

static mt_status copy_files(const mt_record_set *src, mt_record_set *dst, mt_error *err) {
    if (src->n_files == 0) return MT_OK;
    dst->files = mt_calloc((size_t)src->n_files, sizeof *dst->files, "file list", err);
    if (!dst->files) return MT_ERR_NOMEM;
    dst->n_files = src->n_files;
    for (int i = 0; i < src->n_files; i++) {
        dst->files[i] = mt_strdup(src->files[i], "file name", err);
        if (!dst->files[i]) return MT_ERR_NOMEM;
    }
    return MT_OK;
}

mt_status mt_record_set_split(mt_record_set *set, double fraction, uint64_t seed,
                              mt_record_set *train, mt_record_set *eval, mt_error *err) {
    size_t *tr = NULL, *ev = NULL, ntr = 0, nev = 0;
    mt_record_set_init(train);
    mt_record_set_init(eval);
    mt_status st = mt_split_indices(set->n, fraction, seed, &tr, &ntr, &ev, &nev, err);
    if (st) return st;
    train->records = mt_malloc((ntr ? ntr : 1) * sizeof *train->records, "train records", err);
    eval->records = mt_malloc((nev ? nev : 1) * sizeof *eval->records, "held-out records", err);
    if (!train->records || !eval->records) st = MT_ERR_NOMEM;
    if (!st) st = copy_files(set, train, err);
    if (!st) st = copy_files(set, eval, err);
    if (st) {
        free(tr);
        free(ev);
        mt_record_set_free(train);
        mt_record_set_free(eval);
        return st;
    }
    for (size_t i = 0; i < ntr; i++) train->records[i] = set->records[tr[i]];
    for (size_t i = 0; i < nev; i++) eval->records[i] = set->records[ev[i]];
    train->n = train->cap = ntr;
    eval->n = eval->cap = nev;
    train->format = eval->format = set->format;
    train->n_bad = set->n_bad;
    train->n_bad_kept = set->n_bad_kept;
    memcpy(train->bad, set->bad, sizeof set->bad);
    free(tr);
    free(ev);
    set->n = 0; /* the records moved */
    mt_record_set_free(set);
    return MT_OK;
}

/* ---- mixtures -------------------------------------------------------------------- */

static mt_status messages_copy(mt_message **dst, const mt_message *src, int n, mt_error *err) {
    *dst = NULL;
    if (!n) return MT_OK;
    mt_message *m = mt_calloc((size_t)n, sizeof *m, "record copy", err);
    if (!m) return MT_ERR_NOMEM;
    *dst = m;
    for (int i = 0; i < n; i++)
        if (!(m[i].role = mt_strdup(src[i].role, "record copy", err)) ||
            !(m[i].content = mt_strdup(src[i].content, "record copy", err)))
            return MT_ERR_NOMEM;
    return MT_OK;
}

/* A deep copy (on failure *dst holds what was copied: free it with record_free). */
static mt_status record_copy(mt_record *dst, const mt_record *src, mt_error *err) {
    *dst = *src;
    dst->messages = dst->chosen = dst->rejected = NULL;
    dst->text = NULL;
    mt_status st;
    if ((st = messages_copy(&dst->messages, src->messages, src->n_messages, err)) ||
        (st = messages_copy(&dst->chosen, src->chosen, src->n_chosen, err)) ||
        (st = messages_copy(&dst->rejected, src->rejected, src->n_rejected, err)))
        return st;
    if (src->text && !(dst->text = mt_strdup(src->text, "record copy", err))) return MT_ERR_NOMEM;
    return MT_OK;
}

mt_status mt_record_set_weight(mt_record_set *set, size_t first, double weight, uint64_t seed,
                               mt_error *err) {
    if (!(weight > 0.0) || weight > MT_MIX_WEIGHT_MAX)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: a mixture weight must be above 0 and at most %g, got %g",
                            set->n_files ? set->files[set->n_files - 1] : "records",
                            MT_MIX_WEIGHT_MAX, weight);
    if (first > set->n) first = set->n;
    const size_t n = set->n - first;
    const size_t whole = (size_t)weight;
    const size_t part = (size_t)((weight - (double)whole) * (double)n + 0.5);
    if (!n || (whole == 1 && part == 0)) return MT_OK;
    if (whole == 0 && part == 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "a mixture weight of %g keeps none of %s's %zu records", weight,
                            set->n_files ? set->files[set->n_files - 1] : "the file", n);
    /* the fractional part: a seeded choice of `part` records, kept in file order */
    size_t *pick = mt_malloc(n * sizeof *pick, "mixture indices", err);
    uint8_t *chosen = pick ? mt_calloc(n, 1, "mixture indices", err) : NULL;
    if (!chosen) {
        free(pick);
        return MT_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++) pick[i] = i;
    mt_shuffle_indices(pick, n, seed);
    for (size_t i = 0; i < part; i++) chosen[pick[i]] = 1;
    free(pick);
    const size_t total = whole * n + part;
    mt_status st = MT_OK;
    mt_record *out = mt_malloc((first + total ? first + total : 1) * sizeof *out, "mixture records", err);
    if (!out) {
        free(chosen);
        return MT_ERR_NOMEM;
    }
    memcpy(out, set->records, first * sizeof *out);
    size_t k = first;
    /* the first copy moves the records; further copies are deep copies */
    for (size_t c = 0; c < whole + (part > 0) && !st; c++) {
        for (size_t i = 0; i < n && !st; i++) {
            const int keep = c < whole || chosen[i];
            if (!keep) continue;
            if (c == 0) {
                out[k++] = set->records[first + i];
                continue;
            }
            const mt_record *src = &set->records[first + i];
            if ((st = record_copy(&out[k], src, err))) record_free(&out[k]);
            else k++;
        }
    }
    /* records neither moved nor copied (weight < 1) are freed */
    if (whole == 0)
        for (size_t i = 0; i < n; i++)
            if (!chosen[i]) record_free(&set->records[first + i]);
    free(chosen);
    free(set->records);
    set->records = out;
    set->n = k;
    set->cap = first + total ? first + total : 1;
    return st;
}
