/* csv.c — CSV and TSV rows (see csv.h for the rules). */
#include "formats/csv.h"

#include <stdlib.h>
#include <string.h>

#include "base/internal.h"

void mt_csv_init(mt_csv_reader *r, const char *name, const char *data, size_t len, char delim) {
    memset(r, 0, sizeof *r);
    r->name = name ? name : "<memory>";
    r->data = data;
    r->len = len;
    r->delim = delim;
    r->line = 1;
    if (len >= 3 && !memcmp(data, "\xEF\xBB\xBF", 3)) r->pos = 3;
}

void mt_csv_free(mt_csv_reader *r) {
    free(r->buf);
    free(r->fields);
    free(r->lens);
    memset(r, 0, sizeof *r);
}

static mt_status put_byte(mt_csv_reader *r, size_t *used, char c, mt_error *err) {
    if (*used + 1 >= r->buf_cap) {
        size_t cap = r->buf_cap ? 2 * r->buf_cap : 256;
        char *p = realloc(r->buf, cap);
        if (!p) return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory reading a row", r->name);
        r->buf = p;
        r->buf_cap = cap;
    }
    r->buf[(*used)++] = c;
    return MT_OK;
}

/* Ends the current field: a NUL in buf, its start offset kept in fields[] (as an offset
 * until the row is complete, since buf may move). */
static mt_status end_field(mt_csv_reader *r, size_t *used, size_t start, mt_error *err) {
    mt_status st = put_byte(r, used, '\0', err);
    if (st) return st;
    if (r->n_fields == r->fields_cap) {
        size_t cap = r->fields_cap ? 2 * r->fields_cap : 16;
        char **f = realloc(r->fields, cap * sizeof *f);
        if (!f) return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory reading a row", r->name);
        r->fields = f;
        size_t *l = realloc(r->lens, cap * sizeof *l);
        if (!l) return mt_error_set(err, MT_ERR_NOMEM, "%s: out of memory reading a row", r->name);
        r->lens = l;
        r->fields_cap = cap;
    }
    r->fields[r->n_fields] = (char *)(uintptr_t)start;
    r->lens[r->n_fields] = *used - 1 - start;
    r->n_fields++;
    return MT_OK;
}

/* column: 0-based offset of the offending byte in its line */
static mt_status malformed(mt_csv_reader *r, int64_t line, size_t column, const char *what,
                           mt_error *err) {
    r->pos = r->len; /* nothing after a malformed row can be trusted to start a row */
    return mt_error_set(err, MT_ERR_FORMAT, "%s:%lld:%zu: %s", r->name, (long long)line,
                        column + 1, what);
}

mt_status mt_csv_next(mt_csv_reader *r, int *got, int64_t *line, mt_error *err) {
    *got = 0;
    r->n_fields = 0;
    /* empty lines are no rows */
    while (r->pos < r->len && (r->data[r->pos] == '\n' ||
                               (r->data[r->pos] == '\r' && r->pos + 1 < r->len &&
                                r->data[r->pos + 1] == '\n'))) {
        r->pos += r->data[r->pos] == '\r' ? 2 : 1;
        r->line++;
    }
    if (r->pos >= r->len) return MT_OK;
    *line = r->line;
    size_t line_start = r->pos; /* for columns in messages */
    size_t used = 0;
    mt_status st;
    for (;;) { /* one field per iteration */
        size_t start = used;
        const char *d = r->data;
        if (r->pos < r->len && d[r->pos] == '"') { /* quoted */
            int64_t open_line = r->line;
            size_t open_col = r->pos - line_start;
            r->pos++;
            for (;;) {
                if (r->pos >= r->len) {
                    return malformed(r, open_line, open_col,
                                     "this quote is never closed (the text ends inside it)", err);
                }
                char c = d[r->pos];
                if (c == '"') {
                    if (r->pos + 1 < r->len && d[r->pos + 1] == '"') {
                        if ((st = put_byte(r, &used, '"', err))) return st;
                        r->pos += 2;
                        continue;
                    }
                    r->pos++;
                    break;
                }
                if (c == '\0') return malformed(r, r->line, r->pos - line_start, "a NUL byte", err);
                if (c == '\n') {
                    r->line++;
                    line_start = r->pos + 1;
                }
                if ((st = put_byte(r, &used, c, err))) return st;
                r->pos++;
            }
            if (r->pos < r->len && d[r->pos] != r->delim && d[r->pos] != '\n' &&
                !(d[r->pos] == '\r' && r->pos + 1 < r->len && d[r->pos + 1] == '\n') &&
                !(d[r->pos] == '\r' && r->pos + 1 == r->len))
                return malformed(r, r->line, r->pos - line_start,
                                 "text after a closing quote (a quote inside a quoted field is "
                                 "written twice: \"\")",
                                 err);
        } else { /* unquoted: to the delimiter or the line end */
            while (r->pos < r->len && d[r->pos] != r->delim && d[r->pos] != '\n') {
                if (d[r->pos] == '\r' && (r->pos + 1 == r->len || d[r->pos + 1] == '\n')) break;
                if (d[r->pos] == '\0') return malformed(r, r->line, r->pos - line_start, "a NUL byte", err);
                if ((st = put_byte(r, &used, d[r->pos], err))) return st;
                r->pos++;
            }
        }
        if ((st = end_field(r, &used, start, err))) return st;
        if (r->pos < r->len && d[r->pos] == r->delim) {
            r->pos++;
            continue;
        }
        /* the row's end: "\n", "\r\n", a final "\r" or the end of the text */
        if (r->pos < r->len && d[r->pos] == '\r') r->pos++;
        if (r->pos < r->len && d[r->pos] == '\n') r->pos++;
        r->line++;
        break;
    }
    for (size_t i = 0; i < r->n_fields; i++) r->fields[i] = r->buf + (uintptr_t)r->fields[i];
    *got = 1;
    return MT_OK;
}
