/* dataset.h — the data pipeline: JSONL records → (chat template, in Lua) → tokenized
 * examples with a loss mask → shuffled, optionally packed batches.
 *
 *   mt_record_set     records read from JSONL files, normalised to messages
 *   mt_example_set    token ids + trainable flags, fitted to a sequence length
 *   mt_batcher        (B,T) tokens / positions / segments / targets for mt_model_forward
 *                     and mt_model_cross_entropy, with a resumable cursor
 *   mt_dataset_stats  what a run is about to train on, printed before training
 *
 * Rules (also in the comments of each function):
 * - Empty or whitespace-only lines are skipped silently; they are not bad records.
 *   A UTF-8 byte-order mark at the start of a file and a '\r' before '\n' are ignored.
 * - alpaca: user = instruction, or instruction + "\n\n" + input when input is non-empty
 *   (Stanford Alpaca's convention); assistant = output.
 *   prompt/completion: user = prompt, assistant = completion.
 * - A token is trainable when its start byte offset lies inside a span [start, end).
 *   A token straddling a span's start (beginning before it) is not trainable; one
 *   straddling a span's end (beginning inside it) is. Tokens added by the tokenizer
 *   after the text (EOS, offset == text length) are trainable when a span ends at
 *   the text's end.
 * - targets[t] = ids[t+1] when token t+1 is trainable and in the same example, else -100.
 * - Truncation (an example longer than seq_len): DROP drops it; LEFT drops tokens from
 *   the left of the prompt (the tokens before the first trainable token) so that the
 *   response survives whole; when the response alone is longer than seq_len, the
 *   window keeps the last min(prompt, seq_len/2) prompt tokens and cuts the response's
 *   end. Examples left with no target are dropped and counted.
 * - Packing: rows are filled first-fit in shuffled order; an example never spans rows;
 *   a batch never mixes epochs (the last batch of an epoch may have empty rows).
 *   Positions restart at 0 for every example; segment ids are 0,1,2,… per row;
 *   padding has segment -1, its own positions from 0, token pad_id, target -100.
 * - Preference pairs (a paired set): examples 2i and 2i+1 are pair i's chosen and
 *   rejected sequences, the same prompt then each reply, trainable on the final reply
 *   only. Truncation treats the pair as one: LEFT drops the same number of tokens from
 *   the left of both prompts so that the longer sequence fits; when the longer reply
 *   alone is too long, both keep the last min(prompt, seq_len/2) prompt tokens and the
 *   replies' ends are cut. DROP (and a pair left without a target on either side) drops
 *   the pair; a pair too long for DROP is a bad record, refused or skipped as
 *   on_bad_record says, naming its file and line. The batcher keeps pairs whole, as
 *   rows 2i and 2i+1 (no packing; B must be even); its cursor counts pairs.
 */
#ifndef MT_CORE_DATASET_H
#define MT_CORE_DATASET_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "formats/sha256.h"
#include "moontune/moontune.h"

typedef struct mt_tokenizer mt_tokenizer;
typedef struct mt_token_list mt_token_list;

#define MT_IGNORE_INDEX (-100)
#define MT_PAD_SEGMENT (-1)
#define MT_BAD_RECORDS_KEPT 5

/* ---- records ------------------------------------------------------------ */

typedef enum mt_data_format {
    MT_DATA_AUTO = 0,          /* detected from the first non-empty line, then enforced */
    MT_DATA_ALPACA,            /* instruction, input (optional), output */
    MT_DATA_CHAT,              /* messages: [{role, content}, …] */
    MT_DATA_PROMPT_COMPLETION, /* prompt, completion */
    MT_DATA_TEXT,              /* text */
    MT_DATA_PREFERENCE,        /* prompt (string or messages), chosen, rejected */
} mt_data_format;

const char *mt_data_format_name(mt_data_format f);
/* "alpaca", "chat", "prompt_completion", "text", "preference", "auto"; -1 if unknown */
int mt_data_format_parse(const char *name);

/* Field names; a NULL field takes the default name shown. */
typedef struct mt_data_fields {
    const char *instruction; /* "instruction" */
    const char *input;       /* "input" */
    const char *output;      /* "output" */
    const char *messages;    /* "messages" */
    const char *role;        /* "role" */
    const char *content;     /* "content" */
    const char *prompt;      /* "prompt" (prompt/completion and preference) */
    const char *completion;  /* "completion" */
    const char *text;        /* "text" */
    const char *chosen;      /* "chosen" */
    const char *rejected;    /* "rejected" */
} mt_data_fields;

typedef enum mt_bad_record_policy {
    MT_BAD_RECORD_ERROR = 0, /* the first bad record fails the load */
    MT_BAD_RECORD_SKIP,      /* count it, keep the first MT_BAD_RECORDS_KEPT for a report */
} mt_bad_record_policy;

typedef struct mt_jsonl_options {
    mt_data_format format;         /* MT_DATA_AUTO detects */
    const mt_data_fields *fields;  /* NULL: default names */
    mt_bad_record_policy on_bad_record;
} mt_jsonl_options;

/* Roles are "system", "user", "assistant" or "tool"; ShareGPT's "human" and "gpt"
 * are read as "user" and "assistant". */
typedef struct mt_message {
    char *role;
    char *content;
} mt_message;

typedef struct mt_record {
    mt_data_format format; /* the source format */
    int32_t file;          /* index into mt_record_set.files */
    int64_t line;          /* 1-based line in that file */
    /* the conversation (chat, alpaca, prompt/completion), or the preference prompt */
    mt_message *messages;
    int n_messages;
    char *text; /* text format; NULL otherwise */
    /* preference: the replies (a string becomes one assistant message); the last
     * message of each is an assistant's */
    mt_message *chosen, *rejected;
    int n_chosen, n_rejected;
} mt_record;

typedef struct mt_bad_record {
    int32_t file;
    int64_t line;
    char msg[MT_ERROR_MSG_MAX]; /* "path:line: field 'output': …" */
} mt_bad_record;

typedef struct mt_record_set {
    mt_record *records;
    size_t n, cap;
    char **files; /* paths (or names) read, in order */
    int n_files;
    mt_data_format format;  /* format of the last file read (detected when AUTO) */
    int64_t n_bad;          /* bad records skipped */
    mt_bad_record bad[MT_BAD_RECORDS_KEPT];
    int n_bad_kept;
} mt_record_set;

/* Zero-initialise a set (or use `mt_record_set s = {0};`). Loads append. */
void mt_record_set_init(mt_record_set *set);
void mt_record_set_free(mt_record_set *set);

/* Reads a JSONL file, appending its records to set. Errors name the file, the line and
 * the field: "data.jsonl:7: field 'output': expected a string, found a number". A
 * missing file is MT_ERR_IO; a bad record MT_ERR_FORMAT (with the ERROR policy). On
 * error the set keeps what it held before the call (records of the file are removed). */
mt_status mt_records_load_jsonl(const char *path, const mt_jsonl_options *opt,
                                mt_record_set *set, mt_error *err);
/* The same from memory; `name` stands for the file in messages. */
mt_status mt_records_parse_jsonl(const char *name, const char *data, size_t len,
                                 const mt_jsonl_options *opt, mt_record_set *set, mt_error *err);
/* Reads a file of records by its name: .csv (comma) and .tsv (tab) files through
 * mt_records_parse_csv, anything else as JSONL. */
mt_status mt_records_load(const char *path, const mt_jsonl_options *opt, mt_record_set *set,
                          mt_error *err);
/* mt_records_load that also gives the SHA-256 of exactly the bytes the records were read
 * from (sha256 may be NULL), for keys that must name the data that was parsed (the
 * example cache). */
mt_status mt_records_load_digest(const char *path, const mt_jsonl_options *opt,
                                 mt_record_set *set, uint8_t sha256[MT_SHA256_BYTES],
                                 mt_error *err);
/* CSV/TSV text (formats/csv.h) with a header row naming the fields: each row is read as
 * the JSONL object {header[i]: cell[i]} would be, so formats, field names, detection and
 * the bad-record policy are JSONL's. Cells are strings, except that a cell of the
 * messages, prompt, chosen or rejected column that reads whole as a JSON array is that
 * array (a conversation written as JSON text). A record's line is the line its row
 * starts on (the header is line 1). A row with another field count than the header, or
 * invalid UTF-8, is a bad record; malformed quoting ends the file with an error naming
 * line and column. */
mt_status mt_records_parse_csv(const char *name, const char *data, size_t len, char delim,
                               const mt_jsonl_options *opt, mt_record_set *set, mt_error *err);
/* Mixtures: the records from index `first` on (one file's) are repeated or sampled to
 * `weight` times their number: each record floor(weight) times, plus a seeded choice of
 * round(frac(weight) * n) of them (kept in file order), so 2 doubles a file, 0.5 keeps
 * a random half, 1.5 keeps it whole and adds a random half again. weight must lie in
 * (0, MT_MIX_WEIGHT_MAX] and keep at least one record. */
#define MT_MIX_WEIGHT_MAX 1000.0
mt_status mt_record_set_weight(mt_record_set *set, size_t first, double weight, uint64_t seed,
                               mt_error *err);
/* Prints the skipped-records report (count and the first lines with their messages). */
void mt_record_set_print_bad(const mt_record_set *set, FILE *f);

/* ---- deterministic randomness and splits ---------------------------------- */

/* Fisher–Yates shuffle of idx[0, n) driven by splitmix64(seed), unbiased bounds. */
void mt_shuffle_indices(size_t *idx, size_t n, uint64_t seed);

/* Splits n items into a held-out part of round(fraction * n) items chosen by a
 * shuffle with `seed`, and the rest; both lists in increasing order. fraction in
 * [0, 1). The caller frees *train and *eval. */
mt_status mt_split_indices(size_t n, double fraction, uint64_t seed, size_t **train,
                           size_t *n_train, size_t **eval, size_t *n_eval, mt_error *err);
/* Moves the records of `set` into `train` and `eval` (fresh sets) by mt_split_indices;
 * `set` is left empty (its bad-record report goes to train). A held-out file instead
 * of a fraction: load it into its own set. */
mt_status mt_record_set_split(mt_record_set *set, double fraction, uint64_t seed,
                              mt_record_set *train, mt_record_set *eval, mt_error *err);

/* ---- tokenized examples ---------------------------------------------------- */

typedef struct mt_span {
    size_t start, end; /* byte range [start, end) of the rendered text */
} mt_span;

typedef enum mt_truncation {
    MT_TRUNCATE_LEFT = 0, /* drop prompt tokens from the left, keep the response */
    MT_TRUNCATE_DROP,     /* drop the example */
} mt_truncation;

typedef struct mt_example {
    int32_t *ids;       /* (n) */
    uint8_t *trainable; /* (n) 1 = the loss is taken on this token */
    int32_t n;
    int32_t file;       /* source record's file index and line (−1/0 when none) */
    int64_t line;
    /* the reference model's log-probability of the trainable tokens, computed once
     * before preference training (mt_example_set.has_ref_logps); unset otherwise */
    double ref_logp;
} mt_example;

typedef struct mt_example_options {
    int seq_len;            /* longest example kept (the batch's T) */
    mt_truncation truncation;
    int train_on_inputs;    /* every token trainable */
    int add_special;        /* encode adds BOS/EOS as the tokenizer says (templates that
                               write them into the text leave this 0) */
    int32_t pad_id;         /* padding id: the tokenizer's pad, else 0 */
    mt_bad_record_policy on_bad_record; /* a preference pair too long to keep under DROP */
    /* a preference pair's rejected sequence ends at its first token that differs from the
     * chosen one (mt_pair_rejected_end): DPO then compares the two replies where they part
     * only, not on the tokens after it, which follow a different context */
    int rejected_to_difference;
} mt_example_options;

typedef struct mt_example_set {
    mt_example *ex;
    size_t n, cap;
    mt_example_options opt;
    int64_t n_truncated_prompt;   /* left-truncated, response whole */
    int64_t n_truncated_response; /* response alone too long: its end cut */
    int64_t n_dropped_too_long;   /* DROP policy */
    int64_t n_dropped_no_target;  /* nothing left to train on */
    /* preference pairs: ex[2i] chosen, ex[2i+1] rejected; the counts above count pairs */
    int paired;
    int has_ref_logps; /* every example's ref_logp is set */
    mt_bad_record skipped[MT_BAD_RECORDS_KEPT]; /* the first pairs skipped as bad */
    int n_skipped_kept;
    /* where the examples came from: the files their `file` indexes name (copies, set by
     * mt_example_set_set_files; n_files 0 when made in memory), so that messages about
     * an example, or about an empty set, can name the file */
    char **files;
    int n_files;
} mt_example_set;

mt_status mt_example_set_init(mt_example_set *set, const mt_example_options *opt, mt_error *err);
void mt_example_set_free(mt_example_set *set);
/* Records the source files (an mt_record_set's `files`, which the examples' `file`
 * indexes name), replacing any recorded before; copies the strings. Call it when the
 * set is made from records, and on a split's parts with the source set's files. */
mt_status mt_example_set_set_files(mt_example_set *set, char *const *files, int n_files,
                                   mt_error *err);
/* Where the set came from, for a message: "a.jsonl", "a.jsonl, b.jsonl" or "a.jsonl and
 * 3 more files" in buf; NULL when the set has no files recorded. */
const char *mt_example_set_source(const mt_example_set *set, char *buf, size_t cap);
/* "a.jsonl:7" for an example's file index and line when the file is recorded, else
 * "line 7" (or "an example" without a line), in buf. */
const char *mt_example_where(const mt_example_set *set, int32_t file, int64_t line, char *buf,
                             size_t cap);

/* Pure: trainable[i] = 1 when offsets[i] lies in a span (see the rule at the top);
 * text_len is the rendered text's length (tokens at offset >= text_len were added
 * after it). */
void mt_mask_from_spans(const int32_t *offsets, size_t n_tokens, size_t text_len,
                        const mt_span *spans, size_t n_spans, uint8_t *trainable);

/* Pure: the window [*start, *start + *len) of an example of n tokens kept under the
 * truncation rule. Returns 0 = fits, 1 = prompt truncated, 2 = response truncated,
 * -1 = dropped (DROP policy). */
int mt_truncate_window(const uint8_t *trainable, int32_t n, int seq_len, mt_truncation policy,
                       int32_t *start, int32_t *len);

/* Adds an example from ids and flags (copied), applying truncation and counting. */
mt_status mt_example_set_add(mt_example_set *set, const int32_t *ids, const uint8_t *trainable,
                             size_t n, int32_t file, int64_t line, mt_error *err);
/* Adds a preference pair (the set becomes paired; it must hold no single examples),
 * applying the pair's truncation rule (top of this file). A pair too long under DROP
 * is MT_ERR_FORMAT naming file and line with opt.on_bad_record ERROR, else counted in
 * n_dropped_too_long and kept in `skipped`. */
mt_status mt_example_set_add_pair(mt_example_set *set, const int32_t *chosen_ids,
                                  const uint8_t *chosen_trainable, size_t n_chosen,
                                  const int32_t *rejected_ids, const uint8_t *rejected_trainable,
                                  size_t n_rejected, int32_t file, int64_t line, mt_error *err);
/* Pure: how many tokens of the rejected window (rejected ids from its start, n_r long)
 * to keep so that it ends at its first trainable token that differs from the chosen
 * window's token at the same position (or, where one reply is a prefix of the other, at
 * the first token past the chosen window). n_r when they differ nowhere in the reply or
 * already differ in the prompt, whose windows then do not line up. */
int32_t mt_pair_rejected_end(const int32_t *chosen, int32_t n_c, const int32_t *rejected,
                             const uint8_t *rejected_trainable, int32_t n_r);

/* Pure: the windows of a pair under the pair truncation rule, as mt_truncate_window
 * (0 fits, 1 prompts truncated, 2 replies cut, -1 dropped). */
int mt_truncate_pair(const uint8_t *trainable_c, int32_t n_c, const uint8_t *trainable_r,
                     int32_t n_r, int seq_len, mt_truncation policy, int32_t *start_c,
                     int32_t *len_c, int32_t *start_r, int32_t *len_r);
/* The set's items: its pairs when paired, else its examples. */
size_t mt_example_set_items(const mt_example_set *set);
/* Copies item i (an example, or a pair's two examples) of src into dst, which must be
 * paired exactly when src is. */
mt_status mt_example_set_copy_item(mt_example_set *dst, const mt_example_set *src, size_t i,
                                   mt_error *err);

/* Tokenizes text[0, len) and marks the tokens inside spans (or all, with
 * train_on_inputs), then adds the example. */
mt_status mt_example_set_add_text(mt_example_set *set, const mt_tokenizer *tok, const char *text,
                                  size_t len, const mt_span *spans, size_t n_spans, int32_t file,
                                  int64_t line, mt_error *err);

/* Tokenizes text[0, len) into *list and marks its trainable tokens (inside spans, or
 * all with train_on_inputs) in *trainable (the caller frees both; nothing to free on
 * error). Errors name the example's file and line. */
mt_status mt_example_encode(const mt_example_set *set, const mt_tokenizer *tok, const char *text,
                            size_t len, const mt_span *spans, size_t n_spans, int32_t file,
                            int64_t line, mt_token_list *list, uint8_t **trainable,
                            mt_error *err);
/* Prints the preference pairs skipped as too long (on_bad_record = skip), if any. */
void mt_example_set_print_skipped(const mt_example_set *set, FILE *f);

/* targets (n) of one example: targets[t] = ids[t+1] if trainable[t+1], else -100. */
void mt_example_targets(const mt_example *ex, int32_t *targets);

/* ---- batches ---------------------------------------------------------------- */

typedef struct mt_batcher mt_batcher;

/* Where the next batch starts: `position` indexes the epoch's order. */
typedef struct mt_cursor {
    uint64_t epoch;
    uint64_t position;
} mt_cursor;

typedef struct mt_batch_info {
    int examples;     /* examples (sequences) consumed by this batch */
    int pairs;        /* of them, preference pairs (a paired set) */
    int rows;         /* rows holding at least one example */
    int64_t tokens;   /* real (non-pad) tokens */
    int longest;      /* the longest row's real tokens: columns past it are all padding */
    int64_t targets;  /* targets != -100 */
    uint64_t epoch;   /* epoch the batch belongs to */
    int epoch_end;    /* this batch consumed the epoch's last example */
} mt_batch_info;

/* The batcher keeps a pointer to `examples`, which must outlive it. Each epoch's order
 * is a shuffle seeded with seed + epoch (or the set's order when !shuffle). pack: several
 * examples per row; else one example per row. Every example must fit in T. A paired set
 * is batched pair by pair (rows 2i, 2i+1): B must be even and pack 0. */
mt_status mt_batcher_create(const mt_example_set *examples, int B, int T, int pack,
                            uint64_t seed, int shuffle, mt_batcher **out, mt_error *err);
void mt_batcher_free(mt_batcher *b);

/* Fills tokens, positions, segments, targets (each (B,T), caller-owned) with the next
 * batch; positions/segments may be NULL. The arrays go straight to mt_model_forward
 * and mt_model_cross_entropy. ref_logps (B, may be NULL) receives each row's
 * example's ref_logp when the set has them, else NAN (padding rows: NAN). */
mt_status mt_batcher_next(mt_batcher *b, int32_t *tokens, int32_t *positions, int32_t *segments,
                          int32_t *targets, double *ref_logps, mt_batch_info *info,
                          mt_error *err);
/* Data parallel: from now on next() fills only this rank's rows [rank*B/count,
 * (rank+1)*B/count) of each global batch of B rows (the caller's arrays then hold
 * mt_batcher_rows() rows), so that the ranks' rows together are exactly the batch one
 * process would train on. info still describes the global batch (examples, tokens,
 * targets: what the step trains on over all ranks), except `longest`, which is the
 * shard's. B must split evenly (in whole pairs for a paired set). */
mt_status mt_batcher_set_shard(mt_batcher *b, int rank, int count, mt_error *err);
/* Rows next() fills: B, or this rank's share of it. */
int mt_batcher_rows(const mt_batcher *b);
/* Narrows (B,T) arrays (any may be NULL) in place to (B,T_new), T_new <= T, dropping
 * columns [T_new, T) of every row: after mt_batcher_next with T_new = info.longest they
 * are padding only, and a causal model gives the real tokens the same result without
 * them (an unpacked batch of short pairs then costs its longest sequence, not T).
 * Returns the rows' width now: T_new, or T (untouched) when T_new is not in [1, T). */
int mt_batch_narrow(int32_t *tokens, int32_t *positions, int32_t *segments, int32_t *targets,
                    int B, int T, int T_new);
/* Stores the prompt prefix that a packed batch's examples share once per row instead of
 * once per example. The batch (B,T) holds single examples as mt_batcher_next lays them
 * (each a run of one segment id, positions 0, 1, ...; any row may be narrowed). The
 * prefix is the longest run of tokens every example begins with that carries no target
 * and leaves every example a token. When it is at least one token and the examples
 * outnumber the new rows (`rows`, at most the rows in use; below 1: one row, as training
 * and evaluation lay them out, the prefix once per batch), the arrays are rewritten
 * in place as (*B_new, *T_new), contiguous: each row starts with the prefix in segment
 * MT_SHARED_SEGMENT, then the remaining tokens of its examples, each example's own
 * segment (0, 1, ... in its row) with its positions, targets and tokens unchanged, and
 * padding (MT_PAD_SEGMENT) to the longest row. Examples go in order to the shortest row.
 * A causal model gives every example's targets the same logits either way (up to
 * rounding), and the gradient flowing into the prefix is the sum of its examples'.
 * *B_new * *T_new <= B * T; *T_new may exceed T, while positions stay below T.
 * Otherwise (or with any array NULL, or a row holding anything else) the batch is left
 * as it was and *B_new, *T_new = B, T. Errors: out of memory only. */
mt_status mt_batch_share_prefix(int32_t *tokens, int32_t *positions, int32_t *segments,
                                int32_t *targets, int B, int T, int rows, int *B_new, int *T_new,
                                mt_error *err);
mt_cursor mt_batcher_get_cursor(const mt_batcher *b);
/* Position must be <= the number of items (examples, or pairs). */
mt_status mt_batcher_set_cursor(mt_batcher *b, mt_cursor c, mt_error *err);
/* Batches in one epoch (runs the packer over the epoch's order without filling). */
int64_t mt_batcher_batches_per_epoch(mt_batcher *b, uint64_t epoch);

/* ---- statistics --------------------------------------------------------------- */

typedef struct mt_dataset_stats {
    int64_t records;       /* records read (0 when not given) */
    int64_t bad_skipped;   /* bad records skipped */
    int64_t examples;
    int64_t pairs;          /* preference pairs (examples / 2 of a paired set), else 0 */
    int64_t tokens;
    double mean_len;
    int32_t max_len;
    int64_t trained_tokens; /* targets that are not -100 */
    double trained_fraction; /* trained_tokens / tokens */
    int64_t truncated_prompt, truncated_response;
    int64_t dropped_too_long, dropped_no_target; /* pairs, for a paired set */
    int seq_len;
} mt_dataset_stats;

/* records may be NULL. */
void mt_dataset_stats_compute(const mt_record_set *records, const mt_example_set *examples,
                              mt_dataset_stats *st);
void mt_dataset_stats_print(const mt_dataset_stats *st, const char *title, FILE *f);

#endif /* MT_CORE_DATASET_H */
