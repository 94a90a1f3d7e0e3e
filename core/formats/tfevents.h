/* tfevents.h — TensorBoard event files, written and read by us (docs/tensorboard.md).
 *
 * A file is a sequence of records (TFRecord framing):
 *     uint64 length (little-endian) | uint32 masked_crc32c(the 8 length bytes)
 *     | data (length bytes) | uint32 masked_crc32c(data)
 * with masked_crc = ((crc >> 15) | (crc << 17)) + 0xa282ead8 over CRC-32C (Castagnoli).
 * Each data is a serialized tensorflow.Event protobuf, encoded here by hand:
 *     Event   { double wall_time = 1; int64 step = 2; oneof { string file_version = 3;
 *               Summary summary = 5; SessionLog session_log = 7; ... } }
 *     Summary { repeated Value value = 1; }
 *     Value   { string tag = 1; float simple_value = 2; ... }
 *     SessionLog { SessionStatus status = 1; ... }   (START = 1, STOP = 2, CHECKPOINT = 3)
 * The first event of a file carries file_version "brain.Event:2". A resumed run starts a
 * new file whose second event is a SessionLog START at the first step it writes: the
 * reference reader (tensorboard's EventAccumulator) then drops what earlier files hold
 * at that step and after, so a step the resumed run repeats is shown once.
 *
 * Files are named as TensorFlow's writer names them, events.out.tfevents.<unix seconds,
 * 10 digits>.<hostname>, with ".001", ".002", ... appended when that name exists (two
 * files in one second): readers take every file whose name holds "tfevents", in name
 * order. */
#ifndef MT_CORE_TFEVENTS_H
#define MT_CORE_TFEVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

#define MT_TFEVENTS_FILE_VERSION "brain.Event:2"
#define MT_TFEVENTS_PREFIX "events.out.tfevents."
#define MT_TFEVENTS_MAX_TAG 1024          /* bytes of one tag */
#define MT_TFEVENTS_MAX_VALUES 4096       /* values in one event */
#define MT_TFEVENTS_MAX_RECORD (16u << 20) /* bytes of one record's data, written or read */

/* SessionLog.status */
enum { MT_TFEVENTS_STATUS_UNSPECIFIED = 0, MT_TFEVENTS_START = 1, MT_TFEVENTS_STOP = 2,
       MT_TFEVENTS_CHECKPOINT = 3 };

/* ---- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) ---------------------- */

/* Continues a CRC-32C: crc is the value over the bytes before (0 to start), so that
 * mt_crc32c_update(0, "123456789", 9) == 0xE3069283. */
uint32_t mt_crc32c_update(uint32_t crc, const void *data, size_t n);
static inline uint32_t mt_crc32c(const void *data, size_t n) { return mt_crc32c_update(0, data, n); }
/* The masking of TFRecord framing, and its inverse. */
static inline uint32_t mt_crc32c_mask(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }
static inline uint32_t mt_crc32c_unmask(uint32_t masked) {
    uint32_t r = masked - 0xa282ead8u;
    return (r >> 17) | (r << 15);
}

/* ---- events ----------------------------------------------------------------------- */

typedef enum mt_tfevents_kind {
    MT_TFEVENTS_OTHER = 0,    /* none of the below (a graph, run metadata, ...), or nothing */
    MT_TFEVENTS_VERSION,      /* file_version */
    MT_TFEVENTS_SUMMARY,      /* summary: values */
    MT_TFEVENTS_SESSION_LOG,  /* session_log: session_status */
} mt_tfevents_kind;

typedef struct mt_tfevents_value {
    const char *tag;        /* UTF-8, 1 .. MT_TFEVENTS_MAX_TAG bytes, no NUL */
    float simple_value;
    int has_simple_value;   /* read: the value had simple_value (others hold tensors,
                             * images, ...); ignored when writing (always written) */
} mt_tfevents_value;

typedef struct mt_tfevents_event {
    double wall_time;       /* seconds since the epoch */
    int64_t step;
    mt_tfevents_kind kind;
    const char *file_version;      /* MT_TFEVENTS_VERSION */
    int session_status;            /* MT_TFEVENTS_SESSION_LOG */
    const mt_tfevents_value *values; /* MT_TFEVENTS_SUMMARY */
    size_t n_values;
    void *owned;            /* a decoded event's memory (mt_tfevents_event_free) */
} mt_tfevents_event;

/* The event as one complete record (framing included), in a fresh allocation. Every
 * input is checked before anything is produced: a summary needs 1 .. MT_TFEVENTS_MAX_VALUES
 * values, each tag non-NULL, non-empty, at most MT_TFEVENTS_MAX_TAG bytes and valid
 * UTF-8 (protobuf strings); file_version must be valid UTF-8; a session status 0..3. */
mt_status mt_tfevents_encode(const mt_tfevents_event *ev, uint8_t **out, size_t *len, mt_error *err);

/* Decodes one record's data (a serialized Event) into ev; unknown fields are skipped,
 * malformed protobuf is MT_ERR_FORMAT naming `what` (the file and offset). Release with
 * mt_tfevents_event_free. */
mt_status mt_tfevents_decode(const uint8_t *data, size_t n, const char *what, mt_tfevents_event *ev,
                             mt_error *err);
void mt_tfevents_event_free(mt_tfevents_event *ev);

/* The record starting at buf[*pos] (buf holds n bytes): its data in *data, *len, and
 * *pos moved past it; both CRCs are checked (a mismatch is MT_ERR_FORMAT naming `name`
 * and the offset). Returns MT_OK with *data NULL at the end of buf, and MT_OK with *data
 * NULL and *torn set when buf ends inside a record (a writer killed mid-record; *pos
 * stays at that record). */
mt_status mt_tfevents_next_record(const uint8_t *buf, size_t n, size_t *pos, const char *name,
                                  const uint8_t **data, size_t *len, int *torn, mt_error *err);

/* ---- files ------------------------------------------------------------------------ */

typedef struct mt_tfevents_writer mt_tfevents_writer;

/* Creates a new events file in dir (never opens an existing one: O_EXCL, no symlink
 * followed) named after the time and this host, and writes the file_version event;
 * with restart_step >= 0 a SessionLog START at that step follows (a resumed run).
 * Each event is then handed to the system by one write(2) as it is added: nothing is
 * buffered in the process, so a crash loses no record already added. */
mt_status mt_tfevents_create(const char *dir, double wall_time, int64_t restart_step,
                             mt_tfevents_writer **out, mt_error *err);
/* The file's path (owned by the writer). */
const char *mt_tfevents_writer_path(const mt_tfevents_writer *w);
/* Appends one event (mt_tfevents_encode's checks first: bad input writes nothing). A
 * failed or short write is cut back to the last complete record (ftruncate), so the
 * file never ends in a torn record, and the writer refuses further events. */
mt_status mt_tfevents_add(mt_tfevents_writer *w, const mt_tfevents_event *ev, mt_error *err);
/* Closes the file and frees the writer (NULL is fine); the error names the file. */
mt_status mt_tfevents_close(mt_tfevents_writer *w, mt_error *err);

/* The host name as it goes into file names: gethostname with every byte outside
 * [A-Za-z0-9._-] replaced by '_' ("localhost" when unknown). */
void mt_tfevents_hostname(char *out, size_t cap);

/* The events files of dir (names holding "tfevents", as the reference reader takes
 * them), sorted by name, as full paths: *paths (free each, then the array), *n. */
mt_status mt_tfevents_list(const char *dir, char ***paths, size_t *n, mt_error *err);

#endif /* MT_CORE_TFEVENTS_H */
