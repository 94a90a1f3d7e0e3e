/* consumer.c — built against an installed moontune through pkg-config only, to show
 * that the public headers and the library stand on their own. */
#include <moontune/moontune.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    /* bf16 and f16 conversions round-trip exactly representable values */
    if (mt_bf16_to_f32(mt_f32_to_bf16(1.5f)) != 1.5f) return 1;
    if (mt_f16_to_f32(mt_f32_to_f16(-0.25f)) != -0.25f) return 1;
    if (strcmp(mt_dtype_name(MT_BF16), "BF16") != 0 || mt_dtype_size(MT_F32) != 4) return 1;
    printf("moontune %s installed: %s\n", MT_VERSION_STRING, mt_status_name(MT_ERR_FORMAT));
    return 0;
}
