/* dataset.c — tokenized examples with a loss mask, truncation, the (packing) batcher
 * with a resumable cursor, and dataset statistics. The rules are at the top of
 * dataset.h. */
#include "text/dataset.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"
#include "moontune/plugin.h" /* MT_SHARED_SEGMENT */
#include "text/tokenizer.h"

/* ---- examples ----------------------------------------------------------------- */

mt_status mt_example_set_init(mt_example_set *set, const mt_example_options *opt, mt_error *err) {
    memset(set, 0, sizeof *set);
    if (!opt || opt->seq_len < 2)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "examples: seq_len must be at least 2, found %d", opt ? opt->seq_len : 0);
    if (opt->truncation != MT_TRUNCATE_LEFT && opt->truncation != MT_TRUNCATE_DROP)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "examples: unknown truncation policy %d",
                            (int)opt->truncation);
    set->opt = *opt;
    return MT_OK;
}

static void free_files(mt_example_set *set) {
    for (int i = 0; i < set->n_files; i++) free(set->files[i]);
    free(set->files);
    set->files = NULL;
    set->n_files = 0;
}

void mt_example_set_free(mt_example_set *set) {
    if (!set) return;
    for (size_t i = 0; i < set->n; i++) {
        free(set->ex[i].ids);
        free(set->ex[i].trainable);
    }
    free(set->ex);
    free_files(set);
    memset(set, 0, sizeof *set);
}

mt_status mt_example_set_set_files(mt_example_set *set, char *const *files, int n_files,
                                   mt_error *err) {
    if (files == set->files) return MT_OK;
    char **copy = NULL;
    if (n_files > 0) {
        copy = mt_calloc((size_t)n_files, sizeof *copy, "example source files", err);
        if (!copy) return MT_ERR_NOMEM;
        for (int i = 0; i < n_files; i++)
            if (!(copy[i] = mt_strdup(files[i] ? files[i] : "?", "example source file", err))) {
                for (int k = 0; k < i; k++) free(copy[k]);
                free(copy);
                return MT_ERR_NOMEM;
            }
    }
    free_files(set);
    set->files = copy;
    set->n_files = n_files > 0 ? n_files : 0;
    return MT_OK;
}

const char *mt_example_set_source(const mt_example_set *set, char *buf, size_t cap) {
    if (!set || set->n_files <= 0 || cap == 0) return NULL;
    if (set->n_files == 1) snprintf(buf, cap, "%s", set->files[0]);
    else if (set->n_files == 2) snprintf(buf, cap, "%s, %s", set->files[0], set->files[1]);
    else
        snprintf(buf, cap, "%s and %d more files", set->files[0], set->n_files - 1);
    return buf;
}

const char *mt_example_where(const mt_example_set *set, int32_t file, int64_t line, char *buf,
                             size_t cap) {
    if (set && file >= 0 && file < set->n_files && line > 0)
        snprintf(buf, cap, "%s:%lld", set->files[file], (long long)line);
    else if (set && file >= 0 && file < set->n_files)
        snprintf(buf, cap, "%s", set->files[file]);
    else if (line > 0) snprintf(buf, cap, "line %lld", (long long)line);
    else snprintf(buf, cap, "an example");
    return buf;
}

void mt_mask_from_spans(const int32_t *offsets, size_t n_tokens, size_t text_len,
                        const mt_span *spans, size_t n_spans, uint8_t *trainable) {
    int ends_at_end = 0;
    for (size_t s = 0; s < n_spans; s++)
        if (spans[s].end == text_len && spans[s].start < spans[s].end) ends_at_end = 1;
    for (size_t i = 0; i < n_tokens; i++) {
        size_t o = offsets[i] < 0 ? 0 : (size_t)offsets[i];
        uint8_t t = 0;
        if (o >= text_len) t = (uint8_t)ends_at_end; /* added after the text (EOS) */
        else
            for (size_t s = 0; s < n_spans && !t; s++)
                if (spans[s].start <= o && o < spans[s].end) t = 1;
        trainable[i] = t;
    }
}

int mt_truncate_window(const uint8_t *trainable, int32_t n, int seq_len, mt_truncation policy,
                       int32_t *start, int32_t *len) {
    *start = 0;
    *len = n;
    if (n <= seq_len) return 0;
    if (policy == MT_TRUNCATE_DROP) return -1;
    int32_t r = 0; /* first trainable token: where the response starts */
    while (r < n && !trainable[r]) r++;
    *len = seq_len;
    if (n - r <= seq_len) {
        *start = n - seq_len; /* drop prompt tokens from the left */
        return 1;
    }
    int32_t k = r < seq_len / 2 ? r : seq_len / 2; /* prompt tokens kept */
    *start = r - k;
    return 2;
}

static int64_t count_targets(const uint8_t *trainable, int32_t n) {
    int64_t c = 0;
    for (int32_t i = 1; i < n; i++) c += trainable[i] != 0;
    return c;
}

/* Appends a copy of ids/trainable[start, start + len) as an example. */
static mt_status push_example(mt_example_set *set, const int32_t *ids, const uint8_t *trainable,
                              int32_t start, int32_t len, int32_t file, int64_t line,
                              mt_error *err) {
    if (set->n == set->cap) {
        size_t cap = set->cap ? set->cap * 2 : 64;
        mt_example *p = realloc(set->ex, cap * sizeof *p);
        if (!p) return mt_error_set(err, MT_ERR_NOMEM, "out of memory growing the example list");
        set->ex = p;
        set->cap = cap;
    }
    mt_example e = {0};
    e.ids = mt_malloc((size_t)len * sizeof *e.ids, "example ids", err);
    e.trainable = mt_malloc((size_t)len, "example mask", err);
    if (!e.ids || !e.trainable) {
        free(e.ids);
        free(e.trainable);
        return MT_ERR_NOMEM;
    }
    memcpy(e.ids, ids + start, (size_t)len * sizeof *e.ids);
    memcpy(e.trainable, trainable + start, (size_t)len);
    e.n = len;
    e.file = file;
    e.line = line;
    e.ref_logp = NAN;
    set->ex[set->n++] = e;
    return MT_OK;
}

static void pop_example(mt_example_set *set) {
    set->n--;
    free(set->ex[set->n].ids);
    free(set->ex[set->n].trainable);
}

mt_status mt_example_set_add(mt_example_set *set, const int32_t *ids, const uint8_t *trainable,
                             size_t n, int32_t file, int64_t line, mt_error *err) {
    if (set->opt.seq_len < 2)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "examples: the set was not initialised");
    char where[600];
    if (set->paired)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: a single example cannot join a set of preference pairs",
                            mt_example_where(set, file, line, where, sizeof where));
    if (n > INT32_MAX)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: example of %zu tokens is too long",
                            mt_example_where(set, file, line, where, sizeof where), n);
    int32_t start, len;
    int kind = mt_truncate_window(trainable, (int32_t)n, set->opt.seq_len, set->opt.truncation,
                                  &start, &len);
    if (kind < 0) {
        set->n_dropped_too_long++;
        return MT_OK;
    }
    if (count_targets(trainable + start, len) == 0) {
        set->n_dropped_no_target++;
        return MT_OK;
    }
    mt_status st = push_example(set, ids, trainable, start, len, file, line, err);
    if (st) return st;
    if (kind == 1) set->n_truncated_prompt++;
    if (kind == 2) set->n_truncated_response++;
    return MT_OK;
}

static int32_t prompt_length(const uint8_t *trainable, int32_t n) {
    int32_t r = 0;
    while (r < n && !trainable[r]) r++;
    return r;
}

int mt_truncate_pair(const uint8_t *trainable_c, int32_t n_c, const uint8_t *trainable_r,
                     int32_t n_r, int seq_len, mt_truncation policy, int32_t *start_c,
                     int32_t *len_c, int32_t *start_r, int32_t *len_r) {
    *start_c = *start_r = 0;
    *len_c = n_c;
    *len_r = n_r;
    const int32_t longest = n_c > n_r ? n_c : n_r;
    if (longest <= seq_len) return 0;
    if (policy == MT_TRUNCATE_DROP) return -1;
    const int32_t pc = prompt_length(trainable_c, n_c), pr = prompt_length(trainable_r, n_r);
    const int32_t shorter_prompt = pc < pr ? pc : pr;
    const int32_t drop = longest - seq_len; /* the same from both prompts */
    if (drop <= shorter_prompt) {
        *start_c = *start_r = drop;
        *len_c = n_c - drop;
        *len_r = n_r - drop;
        return 1;
    }
    /* the replies alone are too long: a shared prompt budget, the replies cut at the end */
    const int32_t keep = shorter_prompt < seq_len / 2 ? shorter_prompt : seq_len / 2;
    *start_c = pc - keep;
    *start_r = pr - keep;
    *len_c = n_c - *start_c < seq_len ? n_c - *start_c : seq_len;
    *len_r = n_r - *start_r < seq_len ? n_r - *start_r : seq_len;
    return 2;
}

int32_t mt_pair_rejected_end(const int32_t *chosen, int32_t n_c, const int32_t *rejected,
                             const uint8_t *rejected_trainable, int32_t n_r) {
    int32_t k = 0;
    while (k < n_c && k < n_r && chosen[k] == rejected[k]) k++;
    if (k >= n_r) return n_r;                /* the rejected reply is a prefix of the chosen */
    if (!rejected_trainable[k]) return n_r;  /* they part before the reply */
    return k + 1;
}

mt_status mt_example_set_add_pair(mt_example_set *set, const int32_t *chosen_ids,
                                  const uint8_t *chosen_trainable, size_t n_chosen,
                                  const int32_t *rejected_ids, const uint8_t *rejected_trainable,
                                  size_t n_rejected, int32_t file, int64_t line, mt_error *err) {
    char where[600];
    mt_example_where(set, file, line, where, sizeof where);
    if (set->opt.seq_len < 2)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "examples: the set was not initialised");
    if (!set->paired && set->n > 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: a preference pair cannot join a set of single examples", where);
    if (n_chosen > INT32_MAX || n_rejected > INT32_MAX)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: a pair of %zu and %zu tokens is too long",
                            where, n_chosen, n_rejected);
    set->paired = 1;
    int32_t sc, lc, sr, lr;
    int kind = mt_truncate_pair(chosen_trainable, (int32_t)n_chosen, rejected_trainable,
                                (int32_t)n_rejected, set->opt.seq_len, set->opt.truncation, &sc,
                                &lc, &sr, &lr);
    if (kind < 0) {
        mt_status st = mt_error_set(err, MT_ERR_FORMAT,
                                    "%s: the preference pair needs %zu tokens (chosen %zu, "
                                    "rejected %zu), more than seq_len %d, and truncation is "
                                    "\"drop\"",
                                    where, n_chosen > n_rejected ? n_chosen : n_rejected,
                                    n_chosen, n_rejected, set->opt.seq_len);
        if (set->opt.on_bad_record == MT_BAD_RECORD_ERROR) return st;
        if (set->n_skipped_kept < MT_BAD_RECORDS_KEPT) {
            mt_bad_record *b = &set->skipped[set->n_skipped_kept++];
            b->file = file;
            b->line = line;
            snprintf(b->msg, sizeof b->msg, "%s", err ? err->msg : "");
        }
        if (err) *err = (mt_error){0};
        set->n_dropped_too_long++;
        return MT_OK;
    }
    if (set->opt.rejected_to_difference)
        lr = mt_pair_rejected_end(chosen_ids + sc, lc, rejected_ids + sr, rejected_trainable + sr, lr);
    if (count_targets(chosen_trainable + sc, lc) == 0 ||
        count_targets(rejected_trainable + sr, lr) == 0) {
        set->n_dropped_no_target++;
        return MT_OK;
    }
    mt_status st = push_example(set, chosen_ids, chosen_trainable, sc, lc, file, line, err);
    if (st) return st;
    if ((st = push_example(set, rejected_ids, rejected_trainable, sr, lr, file, line, err))) {
        pop_example(set);
        return st;
    }
    if (kind == 1) set->n_truncated_prompt++;
    if (kind == 2) set->n_truncated_response++;
    return MT_OK;
}

size_t mt_example_set_items(const mt_example_set *set) {
    return set->paired ? set->n / 2 : set->n;
}

mt_status mt_example_set_copy_item(mt_example_set *dst, const mt_example_set *src, size_t i,
                                   mt_error *err) {
    if (dst->paired != src->paired && !(dst->n == 0 && src->paired))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "examples: cannot mix preference pairs and single examples");
    dst->paired = src->paired;
    const size_t first = src->paired ? 2 * i : i, count = src->paired ? 2 : 1;
    for (size_t k = 0; k < count; k++) {
        const mt_example *x = &src->ex[first + k];
        mt_status st = push_example(dst, x->ids, x->trainable, 0, x->n, x->file, x->line, err);
        if (st) {
            if (k) pop_example(dst);
            return st;
        }
        dst->ex[dst->n - 1].ref_logp = x->ref_logp;
    }
    dst->has_ref_logps = src->has_ref_logps;
    return MT_OK;
}

mt_status mt_example_encode(const mt_example_set *set, const mt_tokenizer *tok, const char *text,
                            size_t len, const mt_span *spans, size_t n_spans, int32_t file,
                            int64_t line, mt_token_list *list, uint8_t **trainable,
                            mt_error *err) {
    char where[600];
    *list = (mt_token_list){0};
    *trainable = NULL;
    for (size_t s = 0; s < n_spans; s++)
        if (spans[s].start > spans[s].end || spans[s].end > len)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "%s: trainable span %zu is [%zu, %zu), outside the text "
                                "of %zu bytes",
                                mt_example_where(set, file, line, where, sizeof where), s,
                                spans[s].start, spans[s].end, len);
    mt_error local = {0};
    mt_status st = mt_tokenizer_encode(tok, text, len, set->opt.add_special, list, &local);
    if (st) {
        mt_token_list_free(list);
        return mt_error_set(err, st, "%s: %s", mt_example_where(set, file, line, where, sizeof where),
                            local.msg);
    }
    uint8_t *mask = mt_malloc(list->n ? list->n : 1, "token mask", err);
    if (!mask) {
        mt_token_list_free(list);
        return MT_ERR_NOMEM;
    }
    if (set->opt.train_on_inputs) memset(mask, 1, list->n);
    else mt_mask_from_spans(list->offsets, list->n, len, spans, n_spans, mask);
    *trainable = mask;
    return MT_OK;
}

mt_status mt_example_set_add_text(mt_example_set *set, const mt_tokenizer *tok, const char *text,
                                  size_t len, const mt_span *spans, size_t n_spans, int32_t file,
                                  int64_t line, mt_error *err) {
    mt_token_list list;
    uint8_t *mask;
    mt_status st = mt_example_encode(set, tok, text, len, spans, n_spans, file, line, &list, &mask,
                                     err);
    if (st) return st;
    st = mt_example_set_add(set, list.ids, mask, list.n, file, line, err);
    free(mask);
    mt_token_list_free(&list);
    return st;
}

void mt_example_set_print_skipped(const mt_example_set *set, FILE *f) {
    if (!set->paired || set->n_dropped_too_long == 0 || set->n_skipped_kept == 0) return;
    fprintf(f, "skipped %lld preference pair%s (on_bad_record = \"skip\")%s\n",
            (long long)set->n_dropped_too_long, set->n_dropped_too_long == 1 ? "" : "s",
            set->n_dropped_too_long > set->n_skipped_kept ? "; the first:" : ":");
    for (int i = 0; i < set->n_skipped_kept; i++) fprintf(f, "  %s\n", set->skipped[i].msg);
}

void mt_example_targets(const mt_example *ex, int32_t *targets) {
    for (int32_t t = 0; t < ex->n; t++)
        targets[t] = t + 1 < ex->n && ex->trainable[t + 1] ? ex->ids[t + 1] : MT_IGNORE_INDEX;
}

/* ---- the batcher ----------------------------------------------------------------- */

struct mt_batcher {
    const mt_example_set *set;
    int B, T, pack, shuffle;
    uint64_t seed;
    size_t n_items;        /* examples, or pairs of a paired set */
    size_t *order;         /* (n_items) the epoch's order */
    uint64_t order_epoch;  /* epoch `order` holds */
    int have_order;
    int32_t *used, *nseg;  /* (B) scratch: tokens and segments per row */
    mt_cursor cur;
    /* data parallel: this rank's rows [shard_lo, shard_hi) of each global batch, which
     * is built whole in `global` (4 (B,T) arrays) and `global_ref` (B) */
    int shard_lo, shard_hi, sharded;
    int32_t *global;
    double *global_ref;
};

mt_status mt_batcher_create(const mt_example_set *examples, int B, int T, int pack,
                            uint64_t seed, int shuffle, mt_batcher **out, mt_error *err) {
    *out = NULL;
    if (B < 1 || T < 2)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batcher: expected B >= 1 and T >= 2, found B=%d T=%d", B, T);
    char where[600];
    if (!examples || examples->n == 0) {
        const char *from = mt_example_set_source(examples, where, sizeof where);
        return mt_error_set(err, MT_ERR_INVALID_ARG, "%s%sbatcher: the dataset has no examples",
                            from ? from : "", from ? ": " : "");
    }
    if (examples->paired && (B % 2 || pack))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batcher: preference pairs go in rows 2i and 2i+1, unpacked: expected "
                            "an even batch and pack = false, found batch %d%s",
                            B, pack ? " and pack = true" : "");
    for (size_t i = 0; i < examples->n; i++)
        if (examples->ex[i].n > T)
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "batcher: example %zu (%s) has %d tokens, more than T=%d", i,
                                mt_example_where(examples, examples->ex[i].file,
                                                 examples->ex[i].line, where, sizeof where),
                                examples->ex[i].n, T);
    mt_batcher *b = mt_calloc(1, sizeof *b, "batcher", err);
    if (!b) return MT_ERR_NOMEM;
    b->set = examples;
    b->B = B;
    b->T = T;
    b->pack = pack != 0;
    b->shuffle = shuffle != 0;
    b->seed = seed;
    b->n_items = mt_example_set_items(examples);
    b->order = mt_malloc((b->n_items ? b->n_items : 1) * sizeof *b->order, "batch order", err);
    b->used = mt_calloc((size_t)B, sizeof *b->used, "batch rows", err);
    b->nseg = mt_calloc((size_t)B, sizeof *b->nseg, "batch rows", err);
    if (!b->order || !b->used || !b->nseg) {
        mt_batcher_free(b);
        return MT_ERR_NOMEM;
    }
    *out = b;
    return MT_OK;
}

void mt_batcher_free(mt_batcher *b) {
    if (!b) return;
    free(b->order);
    free(b->used);
    free(b->nseg);
    free(b->global);
    free(b->global_ref);
    free(b);
}

static void ensure_order(mt_batcher *b, uint64_t epoch) {
    if (b->have_order && b->order_epoch == epoch) return;
    size_t n = b->n_items;
    for (size_t i = 0; i < n; i++) b->order[i] = i;
    if (b->shuffle) mt_shuffle_indices(b->order, n, b->seed + epoch);
    b->order_epoch = epoch;
    b->have_order = 1;
}

/* Copies example e into row r at its first free column (arrays may be NULL to plan). */
static void put(mt_batcher *b, const mt_example *e, int r, int32_t *tokens, int32_t *positions,
                int32_t *segments, int32_t *targets, double *ref_logps) {
    size_t at = (size_t)r * (size_t)b->T + (size_t)b->used[r];
    if (tokens) memcpy(tokens + at, e->ids, (size_t)e->n * sizeof *tokens);
    if (targets) mt_example_targets(e, targets + at);
    for (int32_t t = 0; t < e->n; t++) {
        if (positions) positions[at + (size_t)t] = t;
        if (segments) segments[at + (size_t)t] = b->nseg[r];
    }
    if (ref_logps) ref_logps[r] = b->set->has_ref_logps ? e->ref_logp : NAN;
    b->used[r] += e->n;
    b->nseg[r]++;
}

/* Places items from order[pos…] into the B rows (arrays may be NULL to plan only);
 * returns how many items (examples, or pairs) were placed. */
static size_t place(mt_batcher *b, size_t pos, int32_t *tokens, int32_t *positions,
                    int32_t *segments, int32_t *targets, double *ref_logps, int *rows_used) {
    const mt_example_set *set = b->set;
    const int T = b->T;
    int rows = 0;
    size_t placed = 0;
    memset(b->used, 0, (size_t)b->B * sizeof *b->used);
    memset(b->nseg, 0, (size_t)b->B * sizeof *b->nseg);
    if (ref_logps)
        for (int r = 0; r < b->B; r++) ref_logps[r] = NAN;
    while (pos + placed < b->n_items) {
        const size_t item = b->order[pos + placed];
        if (set->paired) { /* the pair's two sequences, rows 2i and 2i+1 */
            if (rows + 2 > b->B) break;
            put(b, &set->ex[2 * item], rows, tokens, positions, segments, targets, ref_logps);
            put(b, &set->ex[2 * item + 1], rows + 1, tokens, positions, segments, targets,
                ref_logps);
            rows += 2;
            placed++;
            continue;
        }
        const mt_example *e = &set->ex[item];
        int r = -1;
        if (b->pack) {
            for (int i = 0; i < b->B && r < 0; i++)
                if (b->used[i] + e->n <= T) r = i;
        } else if (rows < b->B) {
            r = rows;
        }
        if (r < 0) break;
        if (b->used[r] == 0) rows++;
        put(b, e, r, tokens, positions, segments, targets, ref_logps);
        placed++;
    }
    if (rows_used) *rows_used = rows;
    return placed;
}

static mt_status next_global(mt_batcher *b, int32_t *tokens, int32_t *positions,
                             int32_t *segments, int32_t *targets, double *ref_logps,
                             mt_batch_info *info, mt_error *err);

mt_status mt_batcher_set_shard(mt_batcher *b, int rank, int count, mt_error *err) {
    const int unit = b->set->paired ? 2 : 1; /* a pair's two rows stay on one rank */
    if (count < 1 || rank < 0 || rank >= count)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "batcher: rank %d of %d is not a rank", rank, count);
    if (b->B % (unit * count) != 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batcher: the batch of %d rows does not split evenly over %d ranks%s: "
                            "make it a multiple of %d (batch is the global batch; each rank "
                            "takes batch / ranks rows)",
                            b->B, count, unit == 2 ? " in whole pairs" : "", unit * count);
    if (count == 1) {
        b->sharded = 0;
        return MT_OK;
    }
    size_t bt = (size_t)b->B * (size_t)b->T;
    if (!b->global && !(b->global = mt_malloc(4 * bt * sizeof *b->global, "global batch", err)))
        return MT_ERR_NOMEM;
    if (!b->global_ref &&
        !(b->global_ref = mt_malloc((size_t)b->B * sizeof *b->global_ref, "global batch", err)))
        return MT_ERR_NOMEM;
    b->shard_lo = b->B / count * rank;
    b->shard_hi = b->B / count * (rank + 1);
    b->sharded = 1;
    return MT_OK;
}

int mt_batcher_rows(const mt_batcher *b) { return b->sharded ? b->shard_hi - b->shard_lo : b->B; }

mt_status mt_batcher_next(mt_batcher *b, int32_t *tokens, int32_t *positions, int32_t *segments,
                          int32_t *targets, double *ref_logps, mt_batch_info *info,
                          mt_error *err) {
    if (!tokens || !targets)
        return mt_error_set(err, MT_ERR_INVALID_ARG, "batcher: tokens and targets are required");
    if (!b->sharded) return next_global(b, tokens, positions, segments, targets, ref_logps, info, err);
    /* the whole global batch, as one process would see it; then this rank's rows */
    const size_t bt = (size_t)b->B * (size_t)b->T, T = (size_t)b->T;
    int32_t *g = b->global;
    mt_batch_info in;
    mt_status st = next_global(b, g, g + bt, g + 2 * bt, g + 3 * bt, b->global_ref, &in, err);
    if (st) return st;
    int32_t *mine[4] = {tokens, positions, segments, targets};
    const size_t rows = (size_t)(b->shard_hi - b->shard_lo), first = (size_t)b->shard_lo * T;
    for (int k = 0; k < 4; k++)
        if (mine[k]) memcpy(mine[k], g + (size_t)k * bt + first, rows * T * sizeof *g);
    if (ref_logps) memcpy(ref_logps, b->global_ref + b->shard_lo, rows * sizeof *ref_logps);
    in.longest = 0; /* the shard's: its columns past it are padding */
    for (int r = b->shard_lo; r < b->shard_hi; r++)
        if (b->used[r] > in.longest) in.longest = b->used[r];
    if (info) *info = in;
    return MT_OK;
}

static mt_status next_global(mt_batcher *b, int32_t *tokens, int32_t *positions,
                             int32_t *segments, int32_t *targets, double *ref_logps,
                             mt_batch_info *info, mt_error *err) {
    const int32_t pad = b->set->opt.pad_id;
    ensure_order(b, b->cur.epoch);
    int rows = 0;
    size_t pos = (size_t)b->cur.position;
    size_t placed = place(b, pos, tokens, positions, segments, targets, ref_logps, &rows);
    if (placed == 0) /* cannot happen: every example fits in an empty row */
        return mt_error_set(err, MT_ERR_INVALID_ARG, "batcher: no example fits a row");
    int64_t ntok = 0, ntgt = 0;
    int longest = 0;
    for (int r = 0; r < b->B; r++) {
        size_t row = (size_t)r * (size_t)b->T;
        ntok += b->used[r];
        if (b->used[r] > longest) longest = b->used[r];
        for (int t = 0; t < b->used[r]; t++) ntgt += targets[row + (size_t)t] != MT_IGNORE_INDEX;
        for (int t = b->used[r]; t < b->T; t++) { /* padding: its own segment */
            tokens[row + (size_t)t] = pad;
            targets[row + (size_t)t] = MT_IGNORE_INDEX;
            if (positions) positions[row + (size_t)t] = t - b->used[r];
            if (segments) segments[row + (size_t)t] = MT_PAD_SEGMENT;
        }
    }
    mt_batch_info in = {0};
    in.examples = (int)(b->set->paired ? 2 * placed : placed);
    in.pairs = b->set->paired ? (int)placed : 0;
    in.rows = rows;
    in.tokens = ntok;
    in.longest = longest;
    in.targets = ntgt;
    in.epoch = b->cur.epoch;
    pos += placed;
    if (pos >= b->n_items) {
        in.epoch_end = 1;
        b->cur.epoch++;
        b->cur.position = 0;
    } else {
        b->cur.position = pos;
    }
    if (info) *info = in;
    return MT_OK;
}

int mt_batch_narrow(int32_t *tokens, int32_t *positions, int32_t *segments, int32_t *targets,
                    int B, int T, int T_new) {
    if (T_new >= T || T_new < 1) return T;
    int32_t *arrays[4] = {tokens, positions, segments, targets};
    for (int k = 0; k < 4; k++) {
        if (!arrays[k]) continue;
        /* row r moves from r*T to r*T_new <= r*T: ascending rows never overwrite unread data */
        for (int r = 1; r < B; r++)
            memmove(arrays[k] + (size_t)r * T_new, arrays[k] + (size_t)r * T,
                    (size_t)T_new * sizeof(int32_t));
    }
    return T_new;
}

/* One example of a packed batch: columns [start, start + len) of row `row`. */
typedef struct batch_span {
    int row, start, len;
} batch_span;

/* The examples of a packed batch, each a run of one segment id whose positions count
 * 0, 1, ... (as the batcher lays them); returns how many, or -1 when a row holds
 * anything else (a shared prefix already, positions that do not restart). */
static int batch_spans(const int32_t *positions, const int32_t *segments, int B, int T,
                       batch_span *spans, int *rows_used) {
    int n = 0;
    *rows_used = 0;
    for (int r = 0; r < B; r++) {
        const int32_t *pos = positions + (size_t)r * T, *seg = segments + (size_t)r * T;
        int used = 0;
        for (int t = 0; t < T;) {
            if (seg[t] == MT_PAD_SEGMENT) {
                t++;
                continue;
            }
            if (seg[t] == MT_SHARED_SEGMENT || pos[t] != 0) return -1;
            int end = t + 1;
            while (end < T && seg[end] == seg[t] && pos[end] == end - t) end++;
            spans[n++] = (batch_span){r, t, end - t};
            used = 1;
            t = end;
        }
        *rows_used += used;
    }
    return n;
}

mt_status mt_batch_share_prefix(int32_t *tokens, int32_t *positions, int32_t *segments,
                                int32_t *targets, int B, int T, int rows, int *B_new, int *T_new,
                                mt_error *err) {
    *B_new = B, *T_new = T;
    if (!tokens || !positions || !segments || !targets || B < 1 || T < 2) return MT_OK;
    const size_t bt = (size_t)B * (size_t)T;
    batch_span *spans = mt_malloc(bt * sizeof *spans, "shared-prefix layout", err);
    if (!spans) return MT_ERR_NOMEM;
    int rows_used = 0;
    const int n = batch_spans(positions, segments, B, T, spans, &rows_used);
    const int R = rows <= 1 ? 1 : (rows < rows_used ? rows : rows_used);
    if (n <= R) {
        free(spans);
        return MT_OK;
    }
    /* the prefix: tokens every example begins with, none of them a target, and at least
     * one token of every example left after it */
    const int32_t *first = tokens + (size_t)spans[0].row * T + spans[0].start;
    int P = spans[0].len;
    for (int i = 0; i < n; i++) {
        const size_t at = (size_t)spans[i].row * T + (size_t)spans[i].start;
        if (spans[i].len - 1 < P) P = spans[i].len - 1;
        for (int p = 0; p < P; p++)
            if (tokens[at + p] != first[p] || targets[at + p] != MT_IGNORE_INDEX) P = p;
    }
    if (P < 1) {
        free(spans);
        return MT_OK;
    }
    /* examples in order, each into the shortest row (the first of equals): fill[r] is
     * row r's length, dest_row and dest_col where example i's remainder goes */
    int *fill = mt_malloc((size_t)R * sizeof *fill, "shared-prefix layout", err);
    int *dest_row = mt_malloc(2 * (size_t)n * sizeof *dest_row, "shared-prefix layout", err);
    if (!fill || !dest_row) {
        free(spans), free(fill), free(dest_row);
        return MT_ERR_NOMEM;
    }
    int *dest_col = dest_row + n;
    int W = P;
    for (int r = 0; r < R; r++) fill[r] = P;
    for (int i = 0; i < n; i++) {
        int r = 0;
        for (int j = 1; j < R; j++)
            if (fill[j] < fill[r]) r = j;
        dest_row[i] = r, dest_col[i] = fill[r];
        fill[r] += spans[i].len - P;
        if (fill[r] > W) W = fill[r];
    }
    const size_t rw = (size_t)R * W;
    int32_t *out = rw <= bt ? mt_malloc(4 * rw * sizeof *out, "shared-prefix layout", err) : NULL;
    if (!out) {
        free(spans), free(fill), free(dest_row);
        return rw <= bt ? MT_ERR_NOMEM : MT_OK; /* too wide: left as it was */
    }
    int32_t *o_tok = out, *o_pos = out + rw, *o_seg = out + 2 * rw, *o_tgt = out + 3 * rw;
    const int32_t pad = first[0]; /* any id: padding sees only padding, and has no target */
    for (int r = 0; r < R; r++) {
        const size_t row = (size_t)r * W;
        for (int p = 0; p < P; p++) {
            o_tok[row + p] = first[p];
            o_pos[row + p] = p;
            o_seg[row + p] = MT_SHARED_SEGMENT;
            o_tgt[row + p] = MT_IGNORE_INDEX;
        }
    }
    for (int i = 0; i < n; i++) { /* the batch's i-th example is segment i of its row */
        const int m = spans[i].len - P;
        const size_t src = (size_t)spans[i].row * T + (size_t)spans[i].start + P;
        const size_t dst = (size_t)dest_row[i] * W + (size_t)dest_col[i];
        memcpy(o_tok + dst, tokens + src, (size_t)m * sizeof *out);
        memcpy(o_pos + dst, positions + src, (size_t)m * sizeof *out);
        memcpy(o_tgt + dst, targets + src, (size_t)m * sizeof *out);
        for (int t = 0; t < m; t++) o_seg[dst + t] = i;
    }
    for (int r = 0; r < R; r++) /* padding as the batcher pads, positions kept below T */
        for (int t = fill[r]; t < W; t++) {
            const size_t at = (size_t)r * W + (size_t)t;
            o_tok[at] = pad;
            o_pos[at] = (t - fill[r]) % T;
            o_seg[at] = MT_PAD_SEGMENT;
            o_tgt[at] = MT_IGNORE_INDEX;
        }
    memcpy(tokens, o_tok, rw * sizeof *out);
    memcpy(positions, o_pos, rw * sizeof *out);
    memcpy(segments, o_seg, rw * sizeof *out);
    memcpy(targets, o_tgt, rw * sizeof *out);
    free(spans), free(fill), free(dest_row), free(out);
    *B_new = R, *T_new = W;
    return MT_OK;
}

mt_cursor mt_batcher_get_cursor(const mt_batcher *b) { return b->cur; }

mt_status mt_batcher_set_cursor(mt_batcher *b, mt_cursor c, mt_error *err) {
    if (c.position > b->n_items)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "batcher: cursor position %llu is past the %zu %s",
                            (unsigned long long)c.position, b->n_items,
                            b->set->paired ? "pairs" : "examples");
    if (c.position == b->n_items) {
        c.epoch++;
        c.position = 0;
    }
    b->cur = c;
    return MT_OK;
}

int64_t mt_batcher_batches_per_epoch(mt_batcher *b, uint64_t epoch) {
    ensure_order(b, epoch);
    int64_t batches = 0;
    size_t pos = 0;
    while (pos < b->n_items) {
        size_t placed = place(b, pos, NULL, NULL, NULL, NULL, NULL, NULL);
        if (placed == 0) break;
        pos += placed;
        batches++;
    }
    return batches;
}

/* ---- statistics ------------------------------------------------------------------- */

void mt_dataset_stats_compute(const mt_record_set *records, const mt_example_set *examples,
                              mt_dataset_stats *st) {
    memset(st, 0, sizeof *st);
    if (records) {
        st->records = (int64_t)records->n;
        st->bad_skipped = records->n_bad;
    }
    if (!examples) return;
    st->examples = (int64_t)examples->n;
    st->pairs = examples->paired ? (int64_t)examples->n / 2 : 0;
    for (size_t i = 0; i < examples->n; i++) {
        const mt_example *e = &examples->ex[i];
        st->tokens += e->n;
        if (e->n > st->max_len) st->max_len = e->n;
        st->trained_tokens += count_targets(e->trainable, e->n);
    }
    st->mean_len = st->examples ? (double)st->tokens / (double)st->examples : 0.0;
    st->trained_fraction = st->tokens ? (double)st->trained_tokens / (double)st->tokens : 0.0;
    st->truncated_prompt = examples->n_truncated_prompt;
    st->truncated_response = examples->n_truncated_response;
    st->dropped_too_long = examples->n_dropped_too_long;
    st->dropped_no_target = examples->n_dropped_no_target;
    st->seq_len = examples->opt.seq_len;
}

void mt_dataset_stats_print(const mt_dataset_stats *st, const char *title, FILE *f) {
    fprintf(f, "dataset%s%s\n", title ? ": " : "", title ? title : "");
    fprintf(f, "  records          %lld", (long long)st->records);
    if (st->bad_skipped) fprintf(f, " (%lld bad records skipped)", (long long)st->bad_skipped);
    fputc('\n', f);
    if (st->pairs)
        fprintf(f, "  pairs            %lld (%lld sequences)\n", (long long)st->pairs,
                (long long)st->examples);
    else
        fprintf(f, "  examples         %lld\n", (long long)st->examples);
    fprintf(f, "  tokens           %lld (mean %.1f, max %d per example; seq_len %d)\n",
            (long long)st->tokens, st->mean_len, st->max_len, st->seq_len);
    fprintf(f, "  trained tokens   %lld (%.1f%%)\n", (long long)st->trained_tokens,
            100.0 * st->trained_fraction);
    fprintf(f, "  truncated        %lld prompt%s, %lld response%s\n", (long long)st->truncated_prompt,
            st->truncated_prompt == 1 ? "" : "s", (long long)st->truncated_response,
            st->truncated_response == 1 ? "" : "s");
    fprintf(f, "  dropped          %lld too long, %lld with nothing to train%s\n",
            (long long)st->dropped_too_long, (long long)st->dropped_no_target,
            st->pairs ? " (pairs)" : "");
}
