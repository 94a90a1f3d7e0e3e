/* dist.h — the processes of one data-parallel job and what they exchange (MPI).
 *
 * One process per device: `mpirun -np N moontune run recipe.lua` (or Slurm's srun)
 * starts N copies of the same recipe, one rank each. They train the same model on
 * different rows of every global batch, and stay identical by summing their gradients
 * (all-reduce) before each update. This module knows bytes and numbers only, no model:
 * the training step (model/train.c), evaluation, checkpoints and the Lua bindings call
 * it. Built without MPI, or started without a launcher, the job is one rank and every
 * call below is a no-op (a sum over one rank is the value itself).
 *
 * Every collective must be called by every rank in the same order; a rank that fails
 * ends the whole job (mt_dist_abort) rather than leaving the others waiting. */
#ifndef MT_CORE_DIST_H
#define MT_CORE_DIST_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/types.h"

/* Joins the job when the process was started by an MPI launcher (OpenMPI's mpirun,
 * Hydra, Slurm's srun with PMI or PMIx: told apart by their environment variables);
 * otherwise, or without MPI built in, the process is rank 0 of 1. Idempotent.
 * Ranks other than 0 send their standard output to /dev/null (one progress bar and
 * one set of prints per job) unless MOONTUNE_LOG_ALL_RANKS=1; errors still reach
 * standard error. */
mt_status mt_dist_init(mt_error *err);
/* Leaves the job (MPI_Finalize); after a successful run only. */
void mt_dist_finalize(void);
/* Ends every rank of the job with exit code `code` (MPI_Abort); a one-rank job exits. */
_Noreturn void mt_dist_abort(int code);

int mt_dist_rank(void);
int mt_dist_size(void);
/* This rank's index among the ranks on its machine (which GPU it takes), from 0. */
int mt_dist_local_rank(void);
/* "mpi" (built with MPI), or "none". */
const char *mt_dist_transport(void);

/* In-place sums over the ranks: every rank ends with the same values. */
mt_status mt_dist_sum_f32(float *values, size_t n, mt_error *err);
mt_status mt_dist_sum_f64(double *values, size_t n, mt_error *err);
mt_status mt_dist_sum_i64(int64_t *values, size_t n, mt_error *err);
/* In-place element-wise maximum of bytes: flags ("did any rank ...") and text that the
 * ranks that have it hold alike, the others zero. */
mt_status mt_dist_max_u8(unsigned char *values, size_t n, mt_error *err);
/* bytes from rank `root` to every rank. */
mt_status mt_dist_broadcast(void *data, size_t bytes, int root, mt_error *err);
/* values holds counts[0] + ... + counts[size-1] floats, rank r's part at the offset of
 * its count; each rank fills its own part and receives the others'. */
mt_status mt_dist_allgather_f32(float *values, const size_t *counts, mt_error *err);
/* Rank 0 receives every rank's `bytes` (rank order) in *gathered (malloc'd, the caller
 * frees; *sizes, size entries, malloc'd too); other ranks receive nothing (NULLs). */
mt_status mt_dist_gather_bytes(const void *bytes, size_t n, void **gathered, size_t **sizes,
                               mt_error *err);

/* Collective: rank 0's outcome on every rank, so that all of them go on, or fail,
 * together after rank 0 alone did something (wrote a checkpoint, prepared a directory).
 * Returns rank 0's status; err (when given) gets rank 0's message on the other ranks;
 * *text (when given: a malloc'd string or NULL) becomes rank 0's text on every rank (a
 * path, or a message of any length). A failed broadcast returns its own error. */
mt_status mt_dist_share_outcome(mt_status st, mt_error *err, char **text);

/* The rank that owns each of n items (parameters) of the given sizes when they are cut
 * into `size` contiguous runs of about equal total size: ZeRO-1's partition of the
 * optimizer state. The same on every rank, for every caller. */
void mt_dist_partition(const size_t *item_sizes, size_t n, int size, int *owner);

#endif
