/* fuzz_tmpfile.h — the fuzz targets whose readers take a path: each input goes to one
 * temporary file per process (named with `suffix`, which some readers look at),
 * removed at exit. Returns the path. */
#ifndef MT_FUZZ_TMPFILE_H
#define MT_FUZZ_TMPFILE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char fuzz_tmp_path[96];

static void fuzz_remove_tmp(void) {
    if (fuzz_tmp_path[0]) unlink(fuzz_tmp_path);
}

static const char *fuzz_write_tmp(const char *name, const char *suffix, const uint8_t *data, size_t size) {
    if (!fuzz_tmp_path[0]) {
        snprintf(fuzz_tmp_path, sizeof fuzz_tmp_path, "/tmp/fuzz-%s-%ld-XXXXXX%s", name, (long)getpid(), suffix);
        int fd = mkstemps(fuzz_tmp_path, (int)strlen(suffix));
        if (fd < 0) abort();
        close(fd);
        atexit(fuzz_remove_tmp);
    }
    FILE *f = fopen(fuzz_tmp_path, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    if (fclose(f) != 0) abort();
    return fuzz_tmp_path;
}

#endif
