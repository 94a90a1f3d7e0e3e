/* device.c — the backend of each device kind, for code that holds only a tensor. */
#include "model/device.h"

#include <string.h>

#include "base/internal.h"

/* Accelerators by mt_device. The CPU is never bound: its operations keep no state
 * beyond the thread count, so one process-wide CPU backend serves every tensor in host
 * memory, and a model's CPU backend may go away (tests keep them on the stack) without
 * leaving a dangling pointer here. */
static mt_backend *bound[2];
static mt_backend cpu_default;

void mt_device_bind(mt_backend *be) {
    if (be && be->device != MT_DEVICE_CPU && (unsigned)be->device < 2) bound[be->device] = be;
}

void mt_device_unbind(mt_backend *be) {
    if (be && (unsigned)be->device < 2 && bound[be->device] == be) bound[be->device] = NULL;
}

mt_backend *mt_device_backend(mt_device device, mt_error *err) {
    if (device != MT_DEVICE_CPU && (unsigned)device < 2 && bound[device]) return bound[device];
    if (device == MT_DEVICE_CPU) {
        if (!cpu_default.ops && mt_backend_cpu_init(&cpu_default, 0, err)) return NULL;
        return &cpu_default;
    }
    mt_error_set(err, MT_ERR_BACKEND, "no backend is running for device %d (%s)", (int)device,
                 device == MT_DEVICE_CUDA ? "cuda" : "unknown");
    return NULL;
}

mt_status mt_device_tensor_alloc(mt_device device, mt_dtype dtype, int ndim,
                                 const int64_t *shape, mt_tensor *out, mt_error *err) {
    memset(out, 0, sizeof *out);
    if (ndim < 0 || ndim > MT_MAX_DIMS || mt_dtype_size(dtype) == 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "tensor_alloc: invalid dtype %d or rank %d", (int)dtype, ndim);
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && numel > SIZE_MAX / 16 / (size_t)shape[i]))
            return mt_error_set(err, MT_ERR_INVALID_ARG,
                                "tensor_alloc: dimension %d of size %lld is invalid or too large",
                                i, (long long)shape[i]);
        numel *= (size_t)shape[i];
    }
    mt_backend *be = mt_device_backend(device, err);
    if (!be) return MT_ERR_BACKEND;
    size_t bytes = numel * mt_dtype_size(dtype);
    void *data = be->ops->alloc(be, bytes ? bytes : 1);
    if (!data)
        return mt_error_set(err, MT_ERR_NOMEM, "tensor_alloc: out of %s memory for %zu bytes",
                            be->name, bytes);
    out->dtype = dtype;
    out->device = device;
    out->ndim = ndim;
    for (int i = 0; i < ndim; i++) out->shape[i] = shape[i];
    out->data = data;
    return MT_OK;
}

void mt_device_tensor_free(mt_tensor *t) {
    if (!t || !t->data) return;
    mt_backend *be = mt_device_backend(t->device, NULL);
    if (be) be->ops->free(be, t->data);
    t->data = NULL;
}

mt_status mt_device_upload(mt_tensor *dst, const void *src_host, mt_error *err) {
    mt_backend *be = mt_device_backend(dst->device, err);
    if (!be) return MT_ERR_BACKEND;
    size_t bytes = mt_tensor_nbytes(dst);
    mt_status st = bytes ? be->ops->upload(be, dst->data, src_host, bytes) : MT_OK;
    if (!st && bytes) st = be->ops->sync(be);
    return st ? mt_error_set(err, st, "uploading %zu bytes to %s failed", bytes, be->name) : MT_OK;
}

mt_status mt_device_download(void *dst_host, const mt_tensor *src, mt_error *err) {
    mt_backend *be = mt_device_backend(src->device, err);
    if (!be) return MT_ERR_BACKEND;
    size_t bytes = mt_tensor_nbytes(src);
    mt_status st = bytes ? be->ops->download(be, dst_host, src->data, bytes) : MT_OK;
    return st ? mt_error_set(err, st, "downloading %zu bytes from %s failed", bytes, be->name)
              : MT_OK;
}
