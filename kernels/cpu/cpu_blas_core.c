/* cpu_blas_core.c — which OpenBLAS kernels run the CPU backend's matrix products.
 *
 * OpenBLAS (built with DYNAMIC_ARCH, as Debian's) picks its kernels once, when it loads,
 * from the CPU's family and model. A release older than the CPU does not know the model
 * and falls back to a generic core: Debian 12's 0.3.21 takes Sapphire and Emerald Rapids
 * Xeons for "Prescott" (SSE3) and runs sgemm at 57 GFLOP/s on two cores where its own
 * SkylakeX or Cooperlake kernels reach 304-311 (2048^3, measured on one machine). The
 * CPU's feature flags say what it can run; OPENBLAS_CORETYPE, read when OpenBLAS loads,
 * is the documented way to name the kernels. The moontune command sets it and starts
 * itself again (core/cli/main.c) when the library chose a pre-AVX2 core on a CPU with
 * AVX2 or AVX-512. A value already set (by the user or the machine) is left alone. */
#include "backend.h"

#include <cblas.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

const char *mt_cpu_blas_core(void) {
    const char *name = openblas_get_corename();
    return name ? name : "";
}

const char *mt_cpu_blas_core_for(const char *current, int avx2_fma, int avx512, int avx512_bf16) {
    /* the cores of CPUs without AVX2: wrong for a CPU that has it */
    static const char *const older[] = {"Prescott", "Core2",  "Penryn",     "Dunnington",
                                        "Nehalem",  "Atom",   "Sandybridge", "Katmai",
                                        "Coppermine", "Northwood", "Banias"};
    int is_older = 0;
    for (size_t i = 0; i < sizeof older / sizeof *older && current; i++)
        is_older |= !strcmp(current, older[i]);
    if (!is_older) return NULL;
    if (avx512) return avx512_bf16 ? "Cooperlake" : "SkylakeX";
    if (avx2_fma) return "Haswell";
    return NULL;
}

const char *mt_cpu_blas_better_core(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const int avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    /* SkylakeX's kernels use F, CD, BW, DQ and VL */
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
                       __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                       __builtin_cpu_supports("avx512vl");
    unsigned a = 0, b = 0, c = 0, d = 0;
    /* AVX512_BF16: leaf 7, subleaf 1, EAX bit 5 (the OS saves the AVX-512 state when
     * avx512f is reported usable above) */
    const int bf16 = avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
    return mt_cpu_blas_core_for(mt_cpu_blas_core(), avx2_fma, avx512, bf16);
#else
    return NULL;
#endif
}
