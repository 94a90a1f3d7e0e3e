/* device_select.c — the backend of a device chosen by name, bound while it runs. */
#include "model/device_select.h"

#include <stdio.h>
#include <string.h>

#include "base/internal.h"
#include "dist/dist.h"
#include "model/device.h"

mt_status mt_device_check_name(const char *what, const char *name, mt_error *err) {
    if (!name || !*name || !strcmp(name, "cpu") || !strcmp(name, "cuda")) return MT_OK;
    return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: expected " MT_DEVICE_CHOICES ", got \"%s\"",
                        what ? what : "device", name);
}

/* The CUDA backend's reason without its own "cuda backend: " prefix, which the caller's
 * "--device cuda: " already says. */
static const char *cuda_reason(const mt_error *e) {
    static const char prefix[] = "cuda backend: ";
    return strncmp(e->msg, prefix, sizeof prefix - 1) ? e->msg : e->msg + sizeof prefix - 1;
}

/* Starts the CUDA backend on the first device; on failure *why names the reason. */
static mt_status start_cuda(mt_backend *be, mt_error *why) {
#ifdef MT_HAVE_CUDA
    /* one process per GPU: a data-parallel rank takes the GPU of its index on its node
     * (or the one CUDA_VISIBLE_DEVICES leaves it); a single process, the first */
    return mt_backend_cuda_init(be, mt_dist_local_rank(), why);
#else
    (void)be;
    return mt_error_set(why, MT_ERR_UNSUPPORTED,
                        "this moontune was built without the CUDA backend (nvcc was not found "
                        "at build time)");
#endif
}

static void stop_backend(mt_backend *be) {
#ifdef MT_HAVE_CUDA
    if (be->device == MT_DEVICE_CUDA) {
        mt_backend_cuda_shutdown(be);
        return;
    }
#endif
    mt_backend_cpu_shutdown(be);
}

mt_status mt_device_backend_start(const char *what, const char *name, int threads,
                                  mt_backend *be, char *cuda_why_not, size_t why_size,
                                  mt_error *err) {
    if (!what) what = "--device";
    if (cuda_why_not && why_size) cuda_why_not[0] = '\0';
    mt_status st = mt_device_check_name(what, name, err);
    if (st) return st;
    int is_default = !name || !*name;
    if (is_default || !strcmp(name, "cuda")) {
        mt_error why = {0};
        if (!(st = start_cuda(be, &why))) {
            mt_device_bind(be);
            return MT_OK;
        }
        if (!is_default)
            return mt_error_set(err, st, "%s cuda: %s", what, cuda_reason(&why));
        /* the default on a machine without a usable GPU is the CPU, silently: the reason is
         * kept for whoever reports the device */
        if (cuda_why_not && why_size) snprintf(cuda_why_not, why_size, "%s", cuda_reason(&why));
    }
    if ((st = mt_backend_cpu_init(be, threads, err))) return st;
    mt_device_bind(be);
    return MT_OK;
}

void mt_device_backend_stop(mt_backend *be) {
    if (!be || !be->ops) return;
    mt_device_unbind(be); /* before shutdown: nothing may reach a stopped backend */
    stop_backend(be);
    memset(be, 0, sizeof *be);
}

const char *mt_device_default_name(char *why_not, size_t why_size) {
    if (why_not && why_size) why_not[0] = '\0';
    mt_backend be;
    mt_error why = {0};
    memset(&be, 0, sizeof be);
    if (start_cuda(&be, &why)) {
        if (why_not && why_size) snprintf(why_not, why_size, "%s", cuda_reason(&why));
        return "cpu";
    }
    stop_backend(&be); /* never bound: only started to see whether it starts */
    return "cuda";
}
