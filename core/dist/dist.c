/* dist.c — the data-parallel job over MPI (dist.h). Without MT_HAVE_MPI every rank is
 * rank 0 of 1 and the collectives return at once. */
#include "dist/dist.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"

#ifdef MT_HAVE_MPI
#include <mpi.h>
#endif

static int g_rank = 0, g_size = 1, g_local_rank = 0, g_started = 0;

int mt_dist_rank(void) { return g_rank; }
int mt_dist_size(void) { return g_size; }
int mt_dist_local_rank(void) { return g_local_rank; }

/* An MPI launcher leaves its mark in the environment: OpenMPI's mpirun, MPICH's Hydra
 * and Slurm's PMI set a world size, PMIx a rank. Without one the process is alone, and
 * MPI is not started at all (a plain `moontune run` stays a plain process). */
static int launched_by_mpi(void) {
    static const char *const marks[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                        "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < sizeof marks / sizeof marks[0]; i++)
        if (getenv(marks[i])) return 1;
    return 0;
}

#ifdef MT_HAVE_MPI
const char *mt_dist_transport(void) { return "mpi"; }

/* MPI counts are ints: large arrays go in pieces of this many elements. */
#define CHUNK ((size_t)1 << 28)

static mt_status mpi_error(mt_error *err, int code, const char *what) {
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(code, text, &len);
    return mt_error_set(err, MT_ERR_IO, "%s (rank %d of %d): %s", what, g_rank, g_size, text);
}

mt_status mt_dist_init(mt_error *err) {
    if (g_started || !launched_by_mpi()) return MT_OK;
    int provided = 0, rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS) return mt_error_set(err, MT_ERR_IO, "MPI_Init_thread failed (%d)", rc);
    g_started = 1;
    /* errors come back as codes, reported with the rank; a rank that fails then ends the
     * job through mt_dist_abort */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    /* the ranks sharing this machine's memory, in rank order: the local index */
    MPI_Comm node;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(node, &g_local_rank);
        MPI_Comm_free(&node);
    }
    const char *all = getenv("MOONTUNE_LOG_ALL_RANKS");
    if (g_rank != 0 && !(all && !strcmp(all, "1"))) {
        fflush(stdout);
        if (!freopen("/dev/null", "w", stdout))
            return mt_error_set(err, MT_ERR_IO, "rank %d: cannot silence standard output", g_rank);
    }
    return MT_OK;
}

void mt_dist_finalize(void) {
    if (!g_started) return;
    fflush(stdout);
    MPI_Finalize();
    g_started = 0;
}

_Noreturn void mt_dist_abort(int code) {
    fflush(stdout);
    fflush(stderr);
    if (g_started && g_size > 1) MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
    exit(code);
}

static mt_status sum(void *values, size_t n, size_t elem, MPI_Datatype type, MPI_Op op,
                     const char *what, mt_error *err) {
    if (g_size == 1) return MT_OK;
    for (size_t at = 0; at < n; at += CHUNK) {
        size_t k = n - at < CHUNK ? n - at : CHUNK;
        int rc = MPI_Allreduce(MPI_IN_PLACE, (char *)values + at * elem, (int)k, type, op,
                               MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS) return mpi_error(err, rc, what);
    }
    return MT_OK;
}

mt_status mt_dist_sum_f32(float *v, size_t n, mt_error *err) {
    return sum(v, n, sizeof *v, MPI_FLOAT, MPI_SUM, "all-reduce (float)", err);
}
mt_status mt_dist_sum_f64(double *v, size_t n, mt_error *err) {
    return sum(v, n, sizeof *v, MPI_DOUBLE, MPI_SUM, "all-reduce (double)", err);
}
mt_status mt_dist_sum_i64(int64_t *v, size_t n, mt_error *err) {
    return sum(v, n, sizeof *v, MPI_INT64_T, MPI_SUM, "all-reduce (int64)", err);
}
mt_status mt_dist_max_u8(unsigned char *v, size_t n, mt_error *err) {
    return sum(v, n, sizeof *v, MPI_UNSIGNED_CHAR, MPI_MAX, "all-reduce (max)", err);
}

mt_status mt_dist_broadcast(void *data, size_t bytes, int root, mt_error *err) {
    if (g_size == 1) return MT_OK;
    for (size_t at = 0; at < bytes; at += CHUNK) {
        size_t k = bytes - at < CHUNK ? bytes - at : CHUNK;
        int rc = MPI_Bcast((char *)data + at, (int)k, MPI_BYTE, root, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS) return mpi_error(err, rc, "broadcast");
    }
    return MT_OK;
}

mt_status mt_dist_allgather_f32(float *values, const size_t *counts, mt_error *err) {
    /* a broadcast from each rank in turn: no int-sized displacement limits, and the
     * payloads (ZeRO-1's updated parameters) are large, so the extra latency is noise */
    size_t at = 0;
    for (int r = 0; r < g_size; r++) {
        mt_status st = mt_dist_broadcast(values + at, counts[r] * sizeof(float), r, err);
        if (st) return st;
        at += counts[r];
    }
    return MT_OK;
}

/* Rank 0 cannot hold what the others are sending it: they would wait for it forever,
 * so the job ends here, with the reason (checkpoints written before stay intact). */
static _Noreturn void gather_out_of_memory(size_t bytes) {
    fprintf(stderr, "moontune: rank 0: out of memory receiving %zu bytes of state from the "
                    "other ranks: ending the job\n", bytes);
    mt_dist_abort(1);
}

mt_status mt_dist_gather_bytes(const void *bytes, size_t n, void **gathered, size_t **sizes,
                               mt_error *err) {
    *gathered = NULL;
    *sizes = NULL;
    uint64_t mine = n;
    uint64_t *all = NULL;
    if (g_rank == 0 && !(all = calloc((size_t)g_size, sizeof *all))) gather_out_of_memory(0);
    int rc = MPI_Gather(&mine, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) {
        free(all);
        return mpi_error(err, rc, "gather (sizes)");
    }
    if (g_rank != 0) {
        for (size_t at = 0; at < n; at += CHUNK) {
            size_t k = n - at < CHUNK ? n - at : CHUNK;
            rc = MPI_Send((const char *)bytes + at, (int)k, MPI_BYTE, 0, 7, MPI_COMM_WORLD);
            if (rc != MPI_SUCCESS) return mpi_error(err, rc, "gather (send)");
        }
        return MT_OK;
    }
    size_t total = 0;
    size_t *out_sizes = calloc((size_t)g_size, sizeof *out_sizes);
    if (!out_sizes) gather_out_of_memory(0);
    for (int r = 0; r < g_size; r++) {
        out_sizes[r] = (size_t)all[r];
        total += out_sizes[r];
    }
    free(all);
    char *buf = malloc(total ? total : 1);
    if (!buf) gather_out_of_memory(total);
    if (n) memcpy(buf, bytes, n);
    size_t off = out_sizes[0];
    for (int r = 1; r < g_size; r++) {
        for (size_t at = 0; at < out_sizes[r]; at += CHUNK) {
            size_t k = out_sizes[r] - at < CHUNK ? out_sizes[r] - at : CHUNK;
            rc = MPI_Recv(buf + off + at, (int)k, MPI_BYTE, r, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (rc != MPI_SUCCESS) {
                free(buf);
                free(out_sizes);
                return mpi_error(err, rc, "gather (receive)");
            }
        }
        off += out_sizes[r];
    }
    *gathered = buf;
    *sizes = out_sizes;
    return MT_OK;
}

#else /* one process: no MPI */

const char *mt_dist_transport(void) { return "none"; }

mt_status mt_dist_init(mt_error *err) {
    if (!g_started && launched_by_mpi()) {
        const char *n = getenv("OMPI_COMM_WORLD_SIZE");
        if (!n) n = getenv("PMI_SIZE");
        if (n && strcmp(n, "1") != 0)
            return mt_error_set(err, MT_ERR_UNSUPPORTED,
                                "started by an MPI launcher with %s processes, but this moontune "
                                "was built without MPI: every process would train alone. "
                                "Install libopenmpi-dev and rebuild",
                                n);
    }
    g_started = 1;
    return MT_OK;
}
void mt_dist_finalize(void) {}
_Noreturn void mt_dist_abort(int code) {
    fflush(stdout);
    exit(code);
}
mt_status mt_dist_sum_f32(float *v, size_t n, mt_error *err) { (void)v, (void)n, (void)err; return MT_OK; }
mt_status mt_dist_sum_f64(double *v, size_t n, mt_error *err) { (void)v, (void)n, (void)err; return MT_OK; }
mt_status mt_dist_sum_i64(int64_t *v, size_t n, mt_error *err) { (void)v, (void)n, (void)err; return MT_OK; }
mt_status mt_dist_max_u8(unsigned char *v, size_t n, mt_error *err) { (void)v, (void)n, (void)err; return MT_OK; }
mt_status mt_dist_broadcast(void *d, size_t n, int root, mt_error *err) {
    (void)d, (void)n, (void)root, (void)err;
    return MT_OK;
}
mt_status mt_dist_allgather_f32(float *v, const size_t *counts, mt_error *err) {
    (void)v, (void)counts, (void)err;
    return MT_OK;
}
mt_status mt_dist_gather_bytes(const void *bytes, size_t n, void **gathered, size_t **sizes,
                               mt_error *err) {
    *sizes = mt_calloc(1, sizeof **sizes, "gather sizes", err);
    *gathered = *sizes ? mt_malloc(n ? n : 1, "gathered state", err) : NULL;
    if (!*gathered) {
        free(*sizes);
        *sizes = NULL;
        return MT_ERR_NOMEM;
    }
    if (n) memcpy(*gathered, bytes, n);
    (*sizes)[0] = n;
    return MT_OK;
}
#endif

mt_status mt_dist_share_outcome(mt_status st, mt_error *err, char **text) {
    if (g_size == 1) return st;
    struct {
        int32_t status;
        uint64_t text_len;
        char msg[MT_ERROR_MSG_MAX];
    } o = {.status = (int32_t)st};
    if (g_rank == 0) {
        if (st && err) snprintf(o.msg, sizeof o.msg, "%s", err->msg);
        o.text_len = text && *text ? strlen(*text) : 0;
    }
    mt_error comm_err = {0};
    if (mt_dist_broadcast(&o, sizeof o, 0, &comm_err)) {
        if (err) *err = comm_err;
        return MT_ERR_IO;
    }
    if (g_rank != 0 && text) {
        free(*text);
        *text = NULL;
        if (o.text_len > 0 && !(*text = malloc(o.text_len + 1))) {
            /* rank 0 is about to send it: ending the job beats leaving it waiting */
            fprintf(stderr, "moontune: rank %d: out of memory receiving rank 0's outcome: "
                            "ending the job\n", g_rank);
            mt_dist_abort(1);
        }
    }
    if (text && o.text_len > 0 && mt_dist_broadcast(*text, o.text_len + 1, 0, &comm_err)) {
        if (err) *err = comm_err;
        return MT_ERR_IO;
    }
    if (g_rank != 0 && o.status) mt_error_set(err, (mt_status)o.status, "%s", o.msg);
    return (mt_status)o.status;
}

void mt_dist_partition(const size_t *item_sizes, size_t n, int size, int *owner) {
    double total = 0;
    for (size_t i = 0; i < n; i++) total += (double)item_sizes[i];
    double before = 0;
    for (size_t i = 0; i < n; i++) {
        /* the rank whose share of the total holds this item's middle */
        double middle = before + 0.5 * (double)item_sizes[i];
        int r = total > 0 ? (int)(middle * size / total) : 0;
        owner[i] = r < 0 ? 0 : r >= size ? size - 1 : r;
        before += (double)item_sizes[i];
    }
}
