// The library's runtime entry points: ABI version, last error message, device probe.
#include <stdarg.h>
#include <stdio.h>

#include "common.cuh"

#ifndef KOGPT_ARCHS
#define KOGPT_ARCHS "unknown"
#endif

namespace {
thread_local char last_error[1024] = "";
}

namespace kogpt {
int fail(int code, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, args);
    va_end(args);
    return code;
}
}  // namespace kogpt

extern "C" {

int kogpt_abi_version(void) { return KOGPT_ABI_VERSION; }

const char* kogpt_last_error(void) { return last_error; }

const char* kogpt_compiled_archs(void) { return KOGPT_ARCHS; }

int kogpt_device_count(int* count) {
    if (count == nullptr) return kogpt::fail(KOGPT_ERR_INVALID_ARGUMENT, "kogpt_device_count: count is NULL");
    *count = 0;
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err == cudaSuccess) {
        *count = n;
        return KOGPT_OK;
    }
    cudaGetLastError();  // the probe's error is not sticky: clear it for the next call
    const char* what = (err == cudaErrorNoDevice) ? "no device" : (err == cudaErrorInsufficientDriver ||
                                                                   err == cudaErrorInitializationError)
                                                                      ? "no driver"
                                                                      : "CUDA error";
    return kogpt::fail(KOGPT_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

}  // extern "C"
