/* csv.h — reading CSV and TSV text: RFC 4180 with the common relaxations.
 *
 * - Fields are separated by the delimiter (',' for CSV, '\t' for TSV) and rows by "\n"
 *   or "\r\n". A UTF-8 byte-order mark at the start is skipped.
 * - A field that starts with '"' is quoted: it ends at the next lone '"', a doubled
 *   '""' inside it is one '"', and it may hold delimiters and line breaks. After the
 *   closing quote only the delimiter or the row's end may follow.
 * - An unquoted field runs to the next delimiter or line end; a '"' inside it is kept
 *   as it is (Python's csv and pandas do the same).
 * - Empty lines (nothing but a line break) are skipped; they are no rows.
 * - A NUL byte, text after a closing quote and a quote left open at the end of the
 *   text are errors naming the line and column. Rows are not checked against each
 *   other here: the caller compares a row's field count with its header's.
 *
 * TSV goes through the same rules with '\t' (what Python's csv.writer with
 * delimiter='\t' and pandas' to_csv(sep='\t') write). */
#ifndef MT_CORE_FORMATS_CSV_H
#define MT_CORE_FORMATS_CSV_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

typedef struct mt_csv_reader {
    const char *name; /* for messages */
    const char *data;
    size_t len, pos;
    char delim;
    int64_t line; /* 1-based line of the next byte */
    /* the current row: fields[i] (NUL-terminated, lengths in lens[i]) point into buf */
    char *buf;
    size_t buf_cap;
    char **fields;
    size_t *lens;
    size_t n_fields, fields_cap;
} mt_csv_reader;

/* Starts reading `len` bytes of `data` (which must outlive the reader). */
void mt_csv_init(mt_csv_reader *r, const char *name, const char *data, size_t len, char delim);
void mt_csv_free(mt_csv_reader *r);

/* Reads the next row into r->fields / r->n_fields, valid until the next call. *line
 * receives the 1-based line the row starts on. Returns MT_OK with *got = 1 for a row,
 * *got = 0 at the end; MT_ERR_FORMAT ("name:line:column: ...") for malformed text,
 * after which the reader is at the end; MT_ERR_NOMEM. */
mt_status mt_csv_next(mt_csv_reader *r, int *got, int64_t *line, mt_error *err);

#endif
