/* device.h — tensors on the backend of their device.
 *
 * A model binds its backend when it is created (mt_device_bind), so that the plugin
 * host and the stores can allocate, copy and compute on a tensor from its device
 * alone: there is one backend per device kind in a process (one process per GPU).
 * The CPU backend is always there (a process-wide one; binding a CPU backend does
 * nothing). */
#ifndef MT_CORE_MODEL_DEVICE_H
#define MT_CORE_MODEL_DEVICE_H

#include "backend.h"
#include "moontune/moontune.h"

/* Makes be the backend of be->device (a later bind of the same device replaces it;
 * unbinding is mt_device_unbind, called by the backend's owner before shutdown). */
void mt_device_bind(mt_backend *be);
void mt_device_unbind(mt_backend *be);
/* The backend of a device; NULL (and err set) when none is bound. */
mt_backend *mt_device_backend(mt_device device, mt_error *err);

/* Zero-filled device memory for a tensor of the given dtype and shape (data set). */
mt_status mt_device_tensor_alloc(mt_device device, mt_dtype dtype, int ndim,
                                 const int64_t *shape, mt_tensor *out, mt_error *err);
void mt_device_tensor_free(mt_tensor *t);
/* Whole-tensor copies between host memory and the tensor's device; both wait. */
mt_status mt_device_upload(mt_tensor *dst, const void *src_host, mt_error *err);
mt_status mt_device_download(void *dst_host, const mt_tensor *src, mt_error *err);

#endif
