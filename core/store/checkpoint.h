/* checkpoint.h — training checkpoints: everything needed to continue a run so that the
 * losses after resuming equal those of an uninterrupted run, step for step (CPU backend).
 *
 * A checkpoint is a directory <run_dir>/checkpoints/step-<step, 8 digits or more>/:
 *
 *   weights.safetensors     every trainable tensor (base and adapter-registered), F32, by name
 *   optimizer.safetensors   every optimizer state tensor, F32, by its state name
 *                           ("exp_avg/<param>", ...); none before the first step
 *   recipe.lua              the recipe text (may be empty)
 *   plugin_state.safetensors  the state tensors of the attached adapters ("adapter<i>/<name>",
 *                           i in attach order) and of the loss ("loss/<name>"), in their own
 *                           dtypes (format 4; LoRA's dropout passes, so masks resume exactly)
 *   state.json              format and version, step, epoch, data cursor, random state,
 *                           scheduler position, learning rate, metrics, the recipe's SHA-256,
 *                           the plugins (kind, name, version, and "options": the validated
 *                           options of each instance, optional, so older readers ignore
 *                           it and the format version stays 4), "run" (a JSON object the
 *                           caller gives: the resolved settings a resume compares),
 *                           "model": {"fingerprint"} of the base model it was trained
 *                           from, "trainer" (a JSON object the caller gives: the
 *                           workflow's own state, such as early stopping's), and
 *                           "files": name -> {bytes, sha256} of the three files above
 *   state.json.sha256       "<sha256>  state.json\n" (sha256sum's format): its checksum
 *
 * Writing: everything goes into <run_dir>/checkpoints/.tmp-step-<step>/, each file is
 * fsync'd, then the directory; it is renamed to step-<step> and the parent fsync'd. A
 * crash leaves either no checkpoint or a complete one; a leftover .tmp-* directory is
 * ignored by every reader and removed by the next save. Re-saving an existing step
 * replaces it (the old one is moved aside to a .tmp-* name first, then removed).
 *
 * Loading verifies before it changes anything: the format version, every file's size and
 * SHA-256 (a mismatch names the file, the expected and the found value), that the base
 * model's fingerprint is the one the checkpoint was trained from (when both are known),
 * and that the weights hold exactly the model's trainable parameters with their shapes. Then it
 * restores the optimizer state (through the plugin's state_set) and the weights.
 *
 * Policy (when to save, how many to keep, which is best) is the caller's: the Lua
 * workflow decides; these functions are the mechanism. */
#ifndef MT_CORE_CHECKPOINT_H
#define MT_CORE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "text/dataset.h"
#include "model/model.h"
#include "plugin/registry.h"
#include "formats/sha256.h"

#define MT_CKPT_FORMAT "moontune-checkpoint"
#define MT_CKPT_FORMAT_VERSION 4 /* 2 added "run" and "model", 3 "trainer", 4 plugin_state; 1-3 still load */
#define MT_CKPT_MAX_RNG 8      /* 64-bit words of random state */
#define MT_CKPT_MAX_METRICS 16
#define MT_CKPT_MAX_PLUGINS 8

typedef struct mt_ckpt_metric {
    char name[64]; /* "eval_loss", "train_loss", ... */
    double value;  /* any double, non-finite ones included */
} mt_ckpt_metric;

typedef struct mt_ckpt_plugin {
    char kind[16];    /* "optimizer", "scheduler", "loss", "adapter" */
    char name[64];    /* "adamw" */
    char version[32]; /* "1.0.0" */
    /* save: the instance whose validated options are written as "options" (set by
     * mt_ckpt_state_add_plugin; NULL writes none). Not persisted. */
    const mt_plugin_instance *instance;
    /* load: the recorded "options" as a JSON object's text ({"r": 16, "alpha": 32, ...}),
     * or NULL when the checkpoint has none (written before they were recorded); freed by
     * mt_ckpt_state_clear. `moontune export` rebuilds the adapter from them. */
    char *options;
} mt_ckpt_plugin;

/* The scalar state of a run. On save the caller fills it; on load it is filled in (and
 * recipe is then allocated: release it with mt_ckpt_state_clear). */
typedef struct mt_ckpt_state {
    int64_t step;        /* optimizer steps completed; the next step is step + 1 */
    int64_t epoch;       /* the trainer's epoch counter */
    mt_cursor cursor;    /* where the batcher's next batch starts */
    int n_rng;           /* words in rng (0..MT_CKPT_MAX_RNG) */
    uint64_t rng[MT_CKPT_MAX_RNG]; /* opaque random state, stored exactly */
    int64_t sched_step;  /* the scheduler's position (0-based step of the next lr) */
    int64_t total_steps; /* the scheduler's total */
    double lr;           /* the learning rate of the last step */
    int n_metrics;
    mt_ckpt_metric metrics[MT_CKPT_MAX_METRICS];
    const char *recipe;  /* the recipe text (NULL: none, saved as an empty file) */
    size_t recipe_len;
    char recipe_sha256[MT_SHA256_HEX]; /* filled by save and load */
    int n_plugins;
    mt_ckpt_plugin plugins[MT_CKPT_MAX_PLUGINS];
    const char *run;     /* a JSON object's text (NULL: none); allocated by load */
    const char *trainer; /* the workflow's state, a JSON object's text (NULL: none);
                            allocated by load */
    char model_fingerprint[65]; /* filled by load ("" when the checkpoint has none) */
} mt_ckpt_state;

/* Frees what load allocated (the recipe) and zeroes the struct. */
void mt_ckpt_state_clear(mt_ckpt_state *s);
/* Adds or replaces a metric; MT_ERR_INVALID_ARG when the table is full or the name too long. */
mt_status mt_ckpt_state_set_metric(mt_ckpt_state *s, const char *name, double value,
                                   mt_error *err);
/* The metric's value in *value; 0 when absent (then *value is untouched). */
int mt_ckpt_state_get_metric(const mt_ckpt_state *s, const char *name, double *value);
/* Records a plugin instance's kind, name and version (replacing an entry of that kind). */
mt_status mt_ckpt_state_add_plugin(mt_ckpt_state *s, const mt_plugin_instance *inst,
                                   mt_error *err);

/* Writes the checkpoint of `state->step` under <run_dir>/checkpoints (created when
 * needed). optimizer may be NULL (no optimizer.safetensors tensors), loss too (no loss
 * state saved). *out_path, when
 * out_path is given, receives the checkpoint's directory (caller frees). */
mt_status mt_checkpoint_save(const char *run_dir, mt_model *model, mt_plugin_instance *optimizer,
                             mt_plugin_instance *loss, const mt_ckpt_state *state,
                             char **out_path, mt_error *err);

/* Verifies the checkpoint in `dir` (format, version, sizes and checksums of every file,
 * the safetensors headers) and, when model is given, that its trainable parameters match;
 * then restores the optimizer state (when optimizer is given), the adapters' state and the
 * loss' (when given), and the weights (when
 * model is given), and fills *state (when given). The model must have its adapters
 * attached, so that their parameters are trainable parameters. */
mt_status mt_checkpoint_load(const char *dir, mt_model *model, mt_plugin_instance *optimizer,
                             mt_plugin_instance *loss, mt_ckpt_state *state, mt_error *err);

/* Only the verification: format, version, every file's size and checksum. */
mt_status mt_checkpoint_verify(const char *dir, mt_error *err);

/* The state alone (*state, released with mt_ckpt_state_clear): state.json checked
 * against its checksum, its format and fields, and the recipe; the data files are not
 * read. For a caller that must know the plugins (which adapter, its options) before it
 * can build the model the checkpoint then loads onto (`moontune export`):
 * mt_checkpoint_load checks every file. */
mt_status mt_checkpoint_read_state(const char *dir, mt_ckpt_state *state, mt_error *err);

/* The newest complete checkpoint under <run_dir>/checkpoints (highest step), in *out_path
 * (caller frees); *out_path is NULL when there is none (not an error). */
mt_status mt_checkpoint_latest(const char *run_dir, char **out_path, mt_error *err);

/* Removes the .tmp-* remains of an interrupted save or prune, then deletes complete
 * checkpoints under <run_dir>/checkpoints except the keep_last newest and the one of
 * step best_step (-1: none); keep_last < 1 keeps them all. Each is first
 * renamed to a .tmp-* name, so a crash mid-way leaves nothing half-deleted behind a
 * valid name. *deleted (optional) receives the number removed. */
mt_status mt_checkpoint_prune(const char *run_dir, int keep_last, int64_t best_step,
                              int *deleted, mt_error *err);

#endif /* MT_CORE_CHECKPOINT_H */
