/* cuda_backend.h — what the CUDA backend offers beyond kernels/backend.h.
 *
 * The backend interface has no slot that carries a message for an error found
 * in asynchronous work: a void op records the first failure in the backend, and
 * sync, upload and download return MT_ERR_BACKEND (or the recorded status) from
 * then on. This reads the message that goes with it. */
#ifndef MT_KERNELS_CUDA_BACKEND_H
#define MT_KERNELS_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "backend.h" /* a C header without extern "C" guards of its own */

#ifdef MT_HAVE_CUDA
/* The first error recorded by the CUDA backend `be` ("" when none): the file and
 * line of the failed call, the call, and the CUDA or cuBLASLt error string. The
 * string is owned by the backend and lives until mt_backend_cuda_shutdown. */
const char *mt_backend_cuda_error_message(const mt_backend *be);
#endif

#ifdef __cplusplus
}
#endif

#endif /* MT_KERNELS_CUDA_BACKEND_H */
