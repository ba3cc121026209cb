/* A libcuda.so.1 whose every call succeeds and does nothing: triton's real launch path (its
   launcher modules, compiled against this) runs on a machine without a GPU, with CPU
   tensors' addresses standing for device pointers. Used by tests/test_launch.py and warm_cache.py. */
#include <stdint.h>
#include <string.h>

typedef int CUresult;
#define SUCCEED(name) \
  CUresult name() { return 0; }

SUCCEED(cuInit)
SUCCEED(cuCtxGetLimit)
SUCCEED(cuCtxSetCurrent)
SUCCEED(cuCtxSetLimit)
SUCCEED(cuDevicePrimaryCtxRetain)
SUCCEED(cuFuncSetAttribute)
SUCCEED(cuFuncSetCacheConfig)
SUCCEED(cuModuleUnload)
SUCCEED(cuTensorMapEncodeTiled)
SUCCEED(cuTensorMapEncodeIm2col)
SUCCEED(cuLaunchKernelEx)

CUresult cuOccupancyMaxActiveClusters(int *n) { *n = 1; return 0; }
CUresult cuCtxGetCurrent(void **ctx) { *ctx = (void *)1; return 0; }
CUresult cuCtxGetDevice(int *device) { *device = 0; return 0; }
CUresult cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }
CUresult cuStreamIsCapturing(void *stream, int *status) { *status = 0; return 0; }
CUresult cuGetErrorString(int error, const char **text) { *text = "stub"; return 0; }
CUresult cuModuleLoadData(void **module, const void *image) { *module = (void *)1; return 0; }
CUresult cuModuleGetFunction(void **f, void *module, const char *name) {
  *f = (void *)1;
  return 0;
}

/* An H100's: 132 SMs, 227 KiB of shared memory a block, compute capability 9.0. */
CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  switch (attribute) {
    case 16: *value = 132; break;
    case 8: case 97: *value = 232448; break;
    case 75: *value = 9; break;
    case 76: *value = 0; break;
    default: *value = 1024;
  }
  return 0;
}

/* Max threads a block 1024; registers, spills and sizes 0. */
CUresult cuFuncGetAttribute(int *value, int attribute, void *f) {
  *value = attribute == 0 ? 1024 : 0;
  return 0;
}

/* Every address is a device pointer to itself. */
CUresult cuPointerGetAttribute(void *data, int attribute, uint64_t pointer) {
  memcpy(data, &pointer, sizeof pointer);
  return 0;
}
