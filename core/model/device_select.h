/* device_select.h — starting the backend of a device chosen by name ("cpu", "cuda" or
 * the default), bound to its device (model/device.h) while it runs.
 *
 * The model-level half of a session (store/session.h): only core/model and the layers
 * above it start backends, and the store layer may not include backend.h itself.
 *
 * The default is decided at run time: in a build with the CUDA backend, the first CUDA
 * device when its backend starts, otherwise the CPU. A named "cuda" that cannot start is
 * an error naming the reason; it never falls back to the CPU. */
#ifndef MT_CORE_MODEL_DEVICE_SELECT_H
#define MT_CORE_MODEL_DEVICE_SELECT_H

#include <stddef.h>

#include "backend.h"
#include "moontune/moontune.h"

/* The accepted names, for messages. */
#define MT_DEVICE_CHOICES "cpu or cuda"

/* MT_OK for "cpu", "cuda", NULL and "" (the default); otherwise an error naming `what`
 * and the choices: "--device: expected cpu or cuda, got \"gpu\"". */
mt_status mt_device_check_name(const char *what, const char *name, mt_error *err);

/* Starts the backend of device `name` (checked as above) into *be and binds it
 * (mt_device_bind). threads: CPU worker threads, <= 0 for OpenMP's default (the CUDA
 * backend ignores it). what: how the user named the device, for messages ("--device").
 * When the default falls back to the CPU, cuda_why_not (may be NULL) receives why CUDA
 * was not used; otherwise it is set to "". */
mt_status mt_device_backend_start(const char *what, const char *name, int threads,
                                  mt_backend *be, char *cuda_why_not, size_t why_size,
                                  mt_error *err);

/* Unbinds and shuts down a backend mt_device_backend_start started. */
void mt_device_backend_stop(mt_backend *be);

/* The default device's name: "cuda" when a CUDA device's backend starts in this build
 * (it is started and stopped again to find out), else "cpu"; why_not as above. */
const char *mt_device_default_name(char *why_not, size_t why_size);

#endif /* MT_CORE_MODEL_DEVICE_SELECT_H */
