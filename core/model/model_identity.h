/* model_identity.h — a fingerprint of a loaded base model, so that a checkpoint can
 * refuse to continue on a different base model with the same shapes. */
#ifndef MT_CORE_MODEL_IDENTITY_H
#define MT_CORE_MODEL_IDENTITY_H

#include "model/model.h"

/* SHA-256 (64 hex digits) over the model's configuration, every parameter's name and
 * shape, and an evenly strided sample of at most MT_FINGERPRINT_SAMPLES values of
 * each parameter (all of a smaller one). Call it on the weights as loaded, before any
 * training or adapter changes them. Parameters on a device are read through the backend
 * (the samples alone for small tensors, bounded runs for large ones), so the same weights
 * give the same fingerprint on every device. */
#define MT_FINGERPRINT_SAMPLES 4096
mt_status mt_model_fingerprint(const mt_model *m, char hex[65], mt_error *err);

#endif
