// attnmerge: the eager fast path of the cuda and triton backends, a CPython extension built
// on first use with the host C compiler (the one Triton's launchers use) by
// attnmerge/cuda/eager.py.
//
// A call whose tensors look exactly like an earlier call's (types, dtypes, devices, shapes,
// strides, 16-byte alignment, which pointers are equal, the class of
// prefill_tokens_with_context) was validated by the Python path then, and chose the same
// kernel, grid and parameters but for the pointers and the first-partial row count. This
// module describes a call by those facts (its key), finds the launch plan the Python path
// stored under the key and runs it with the call's pointers. Anything else is a miss: the
// Python path runs the call (validation, errors, dispatch, the launch) and stores the plan
// for the next one.
//
// A plan is either the cuda backend's (bytes: PlanHeader, the key, the parameter block,
// launched with cuLaunchKernel once the pointers are patched in) or the triton backend's
// (a tuple: its compiled kernel's runner, see run_runner_plan).
//
// merge_pair(plans, code, output, prefix_output, prefix_lse, suffix_output, suffix_lse,
//            output_lse, prefill_tokens_with_context, output_scale)
// merge_partials(plans, code, out, out_lse, outputs, lses, indptr,
//                prefill_tokens_with_context, output_scale)      (stacked or packed partials)
//   -> None           launched (or nothing to do)
//   -> (hash, key)    a miss: store the plan as plans[hash] = plan (see eager.py)
//   -> int            cuLaunchKernel's error code: nothing launched
//   -> False          not a call for the fast path (a tensor subclass, a host tensor, an
//                     argument of another type...): the Python path alone
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*LaunchKernelFn)(void* function, unsigned grid_x, unsigned grid_y,
                              unsigned grid_z, unsigned block_x, unsigned block_y,
                              unsigned block_z, unsigned shared_bytes, void* stream,
                              void** params, void** extra);

static LaunchKernelFn launch_kernel;
static PyTypeObject* tensor_type;
static int accept_host_tensors;  // tests of the planning on a CPU, with a stand-in launch
static PyObject* current_device_fn;  // torch._C._cuda_getDevice
static PyObject* current_stream_fn;  // torch._C._cuda_getCurrentRawStream
static PyObject *s_data_ptr, *s_stride, *s_shape, *s_dtype, *s_get_device, *s_itemsize;
static PyObject* stream_kwnames;  // ("stream",)

enum { kMaxDims = 4, kTensors = 7, kMaxParams = 512 };
// The tensors of a two-partial call, and of a stacked or packed one, in the order of a
// plan's offsets (PLAN_FIELDS and PARTIALS_PLAN_FIELDS in eager.py).
enum { kOut, kPartial0, kLse0, kPartial1, kLse1, kOutLse, kScale };
enum { kStackOut, kStackPartials, kStackLses, kStackIndptr, kStackOutLse, kStackScale };
// The first word of a stacked or packed call's key, besides the code: no pair key has it.
static const int64_t kStackedKey = (int64_t)1 << 40;

// The plan's fixed header, packed by eager.py (PLAN_HEADER); the key and the parameter
// block follow it.
typedef struct {
  uint64_t function;  // CUfunction
  uint32_t grid, block;
  int32_t device_index;
  uint32_t num_heads;
  int32_t offsets[kTensors];  // byte offset of each tensor's pointer in the block, or -1
  int32_t rows_with_first_offset;
  uint32_t key_bytes, params_bytes;
} PlanHeader;

typedef struct {
  uint64_t ptr;
  int64_t ndim, shape[kMaxDims], stride[kMaxDims];
  int64_t itemsize;  // 0 where not read (read_tensor_python)
} Tensor;

// DLPack's exchange API (DLPack 1.2 on; torch.Tensor's __dlpack_c_exchange_api__ from torch
// 2.10): one C call describes a tensor as a DLTensor, where Python's C API takes five calls
// (docs/host-overhead.md). The declarations follow the DLPack specification; the extension
// includes no header but Python's.
typedef struct {
  int32_t device_type, device_id;
} DLDevice;
typedef struct {
  uint8_t code, bits;
  uint16_t lanes;
} DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;
typedef struct DLPackExchangeAPIHeader {
  uint32_t major, minor;  // DLPackVersion
  struct DLPackExchangeAPIHeader* prev_api;
} DLPackExchangeAPIHeader;
typedef int (*DLTensorFromPyObjectFn)(void* py_object, DLTensor* out);
typedef struct {  // major version 1
  DLPackExchangeAPIHeader header;
  void *managed_tensor_allocator, *managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  DLTensorFromPyObjectFn dltensor_from_py_object_no_sync;  // may be NULL
  void* current_work_stream;
} DLPackExchangeAPI;
enum { kDLCPU = 1, kDLCUDA = 2 };
// The exchange API's reader, or NULL: read through Python's C API.
static DLTensorFromPyObjectFn dltensor_of;
// A DLPack dtype in a key, apart from any dtype object's address (which is even).
static const int64_t kDLPackDtype = 1;

// The facts of a read tensor into the key: its dtype (an identity), device, pointer's
// alignment, shape and strides.
static void add_to_key(const Tensor* t, int64_t dtype, long device, int64_t** key) {
  int64_t* k = *key;
  *k++ = dtype;
  *k++ = device;
  *k++ = (int64_t)(t->ptr % 16);
  *k++ = t->ndim;
  for (int64_t i = 0; i < t->ndim; ++i) {
    *k++ = t->shape[i];
    *k++ = t->stride[i];
  }
  *key = k;
}

// read_tensor through the exchange API.
static int read_dltensor(PyObject* t, Tensor* out, int64_t** key) {
  DLTensor dl;
  if (dltensor_of(t, &dl) != 0) return -1;
  long device;
  if (dl.device.device_type == kDLCUDA) {
    device = dl.device.device_id;
  } else if (dl.device.device_type == kDLCPU && accept_host_tensors) {
    device = -1;  // torch's get_device() of a host tensor
  } else {
    return 1;
  }
  if (dl.ndim < 0 || dl.ndim > kMaxDims) return 1;
  out->ptr = (uint64_t)(uintptr_t)dl.data + dl.byte_offset;
  out->ndim = dl.ndim;
  for (int32_t i = 0; i < dl.ndim; ++i) {
    out->shape[i] = dl.shape[i];
    out->stride[i] = dl.strides[i];
  }
  out->itemsize = (int64_t)dl.dtype.bits * dl.dtype.lanes / 8;
  const int64_t dtype = (int64_t)dl.dtype.code << 32 | (int64_t)dl.dtype.bits << 16;
  add_to_key(out, kDLPackDtype | dtype | (int64_t)dl.dtype.lanes << 40, device, key);
  return 0;
}

// read_tensor through Python's C API: get_device(), dtype, shape, stride(), data_ptr().
static int read_tensor_python(PyObject* t, Tensor* out, int64_t** key) {
  PyObject* args[1] = {t};
  const size_t nargs = 1 | PY_VECTORCALL_ARGUMENTS_OFFSET;
  PyObject* value = PyObject_VectorcallMethod(s_get_device, args, nargs, NULL);
  if (value == NULL) return -1;
  const long device = PyLong_AsLong(value);
  Py_DECREF(value);
  if (device < 0 && (PyErr_Occurred() || !accept_host_tensors)) return PyErr_Occurred() ? -1 : 1;
  PyObject* dtype = PyObject_GetAttr(t, s_dtype);
  if (dtype == NULL) return -1;
  Py_DECREF(dtype);  // dtypes are module-level singletons that live as long as torch
  PyObject* shape = PyObject_GetAttr(t, s_shape);
  if (shape == NULL) return -1;
  PyObject* stride = PyObject_VectorcallMethod(s_stride, args, nargs, NULL);
  if (stride == NULL) {
    Py_DECREF(shape);
    return -1;
  }
  int status = 0;
  const Py_ssize_t ndim = PyTuple_Check(shape) ? PyTuple_GET_SIZE(shape) : kMaxDims + 1;
  if (ndim > kMaxDims || !PyTuple_Check(stride) || PyTuple_GET_SIZE(stride) != ndim) {
    status = 1;
  } else {
    out->ndim = ndim;
    for (Py_ssize_t i = 0; i < ndim; ++i) {
      out->shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
      out->stride[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(stride, i));
    }
    if (PyErr_Occurred()) status = -1;
  }
  Py_DECREF(shape);
  Py_DECREF(stride);
  if (status != 0) return status;
  value = PyObject_VectorcallMethod(s_data_ptr, args, nargs, NULL);
  if (value == NULL) return -1;
  out->ptr = PyLong_AsUnsignedLongLong(value);
  Py_DECREF(value);
  if (PyErr_Occurred()) return -1;
  out->itemsize = 0;
  add_to_key(out, (int64_t)(uintptr_t)dtype, device, key);
  return 0;
}

// 0: read; 1: not a plain torch.Tensor of at most kMaxDims dimensions on a device; -1: a
// Python error.
static int read_tensor(PyObject* t, Tensor* out, int64_t** key) {
  if (Py_TYPE(t) != tensor_type) return 1;
  return dltensor_of != NULL ? read_dltensor(t, out, key) : read_tensor_python(t, out, key);
}

static uint64_t hash_key(const int64_t* key, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (size_t i = 0; i < n; ++i) {
    h ^= (uint64_t)key[i];
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  }
  return h >> 1;  // a non-negative Python int
}

static PyObject* miss(uint64_t hash, const int64_t* key, size_t n) {
  return Py_BuildValue("(Ky#)", (unsigned long long)hash, (const char*)key,
                       (Py_ssize_t)(n * sizeof(int64_t)));
}

// The current device's index, or -2 with a Python error.
static long current_device(void) {
  PyObject* device = PyObject_CallNoArgs(current_device_fn);
  if (device == NULL) return -2;
  const long current = PyLong_AsLong(device);
  Py_DECREF(device);
  return current == -1 && PyErr_Occurred() ? -2 : current;
}

// A runner's plan, (key, device index, runner, arguments, slots, first_at): calls
// runner(*arguments, stream=<current stream>) with arguments[slots[2 i]] replaced by the
// data pointer (an int) of the call's tensor slots[2 i + 1] and arguments[first_at] by its
// number of tokens with a first partial; a None runner launches nothing (no rows). An int
// spares Triton's launcher a data_ptr() call and a driver query per tensor
// (docs/host-overhead.md). ``plan`` is held by the caller.
enum { kMaxRunnerArgs = 64 };
static PyObject* run_runner_plan(PyObject* plan, uint64_t hash, const int64_t* key, size_t n,
                                 const Tensor* tensors, int present, int64_t with_first) {
  if (PyTuple_GET_SIZE(plan) != 6) return miss(hash, key, n);
  PyObject* plan_key = PyTuple_GET_ITEM(plan, 0);
  PyObject* runner = PyTuple_GET_ITEM(plan, 2);
  PyObject* arguments = PyTuple_GET_ITEM(plan, 3);
  PyObject* slots = PyTuple_GET_ITEM(plan, 4);
  if (!PyBytes_Check(plan_key) || (size_t)PyBytes_GET_SIZE(plan_key) != n * sizeof(int64_t) ||
      memcmp(PyBytes_AS_STRING(plan_key), key, n * sizeof(int64_t)) != 0 ||
      !PyTuple_Check(arguments) || PyTuple_GET_SIZE(arguments) > kMaxRunnerArgs ||
      !PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) % 2 != 0) {
    return miss(hash, key, n);
  }
  if (runner == Py_None) Py_RETURN_NONE;  // no rows
  const long device_index = PyLong_AsLong(PyTuple_GET_ITEM(plan, 1));
  const long first_at = PyLong_AsLong(PyTuple_GET_ITEM(plan, 5));
  if (PyErr_Occurred()) return NULL;
  const Py_ssize_t nargs = PyTuple_GET_SIZE(arguments);
  const Py_ssize_t nslots = PyTuple_GET_SIZE(slots) / 2;
  if (nslots > kMaxRunnerArgs) return miss(hash, key, n);
  long at[kMaxRunnerArgs], which[kMaxRunnerArgs];
  for (Py_ssize_t i = 0; i < nslots; ++i) {
    at[i] = PyLong_AsLong(PyTuple_GET_ITEM(slots, 2 * i));
    which[i] = PyLong_AsLong(PyTuple_GET_ITEM(slots, 2 * i + 1));
    if (at[i] < 0 || at[i] >= nargs || which[i] < 0 || which[i] >= kTensors ||
        !(present & (1 << which[i]))) {
      return PyErr_Occurred() ? NULL : miss(hash, key, n);
    }
  }
  const long current = current_device();
  if (current == -2) return NULL;
  if (current != device_index) return miss(hash, key, n);  // context switch: Python
  // Every new reference of the call: the pointers, the first-partial count, the stream.
  PyObject* owned[kMaxRunnerArgs + 2] = {NULL};
  int owned_count = 0;
  PyObject* stack[kMaxRunnerArgs + 1];
  PyObject* result = NULL;
  for (Py_ssize_t i = 0; i < nargs; ++i) stack[i] = PyTuple_GET_ITEM(arguments, i);
  for (Py_ssize_t i = 0; i < nslots; ++i) {
    PyObject* pointer = PyLong_FromUnsignedLongLong(tensors[which[i]].ptr);
    if (pointer == NULL) goto done;
    stack[at[i]] = owned[owned_count++] = pointer;
  }
  if (first_at >= 0 && first_at < nargs) {
    PyObject* first = PyLong_FromLongLong(with_first);
    if (first == NULL) goto done;
    stack[first_at] = owned[owned_count++] = first;
  }
  PyObject* index = PyLong_FromLong(device_index);
  PyObject* stream = index == NULL ? NULL : PyObject_CallOneArg(current_stream_fn, index);
  Py_XDECREF(index);
  if (stream == NULL) goto done;
  stack[nargs] = owned[owned_count++] = stream;
  result = PyObject_Vectorcall(runner, stack, (size_t)nargs, stream_kwnames);
done:
  for (int i = 0; i < owned_count; ++i) Py_DECREF(owned[i]);
  if (result == NULL) return NULL;
  Py_DECREF(result);
  Py_RETURN_NONE;
}

// The class of prefill_tokens_with_context for the key (0: None, 1: T, 2: 0, 3: between)
// and the number of tokens with a first partial in *with_first; -1: not for the fast path
// (not an int, or out of range: the Python path raises).
static int prefill_class(PyObject* prefill, int64_t tokens, int64_t* with_first) {
  *with_first = tokens;
  if (prefill == Py_None) return 0;
  if (!PyLong_CheckExact(prefill)) return -1;
  const int64_t value = PyLong_AsLongLong(prefill);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return -1;
  }
  if (value < 0 || value > tokens) return -1;
  *with_first = value;
  return value == tokens ? 1 : value == 0 ? 2 : 3;
}

// Runs the plan stored under the key's hash, or reports a miss (see the top of the file).
static PyObject* run_plan(PyObject* plans, const int64_t* key, size_t n, const Tensor* tensors,
                          int present, int64_t with_first) {
  const uint64_t hash = hash_key(key, n);
  PyObject* hash_obj = PyLong_FromUnsignedLongLong(hash);
  if (hash_obj == NULL) return NULL;
  PyObject* plan = PyDict_GetItemWithError(plans, hash_obj);  // borrowed
  Py_DECREF(hash_obj);
  if (plan == NULL) return PyErr_Occurred() ? NULL : miss(hash, key, n);
  if (PyTuple_Check(plan)) {
    Py_INCREF(plan);  // the runner runs Python code, which could drop the plan
    PyObject* result = run_runner_plan(plan, hash, key, n, tensors, present, with_first);
    Py_DECREF(plan);
    return result;
  }
  if (!PyBytes_Check(plan) || (size_t)PyBytes_GET_SIZE(plan) < sizeof(PlanHeader)) {
    return miss(hash, key, n);
  }
  PlanHeader header;
  const char* bytes = PyBytes_AS_STRING(plan);
  memcpy(&header, bytes, sizeof header);
  if (header.key_bytes != n * sizeof(int64_t) || header.params_bytes > kMaxParams ||
      (size_t)PyBytes_GET_SIZE(plan) != sizeof header + header.key_bytes + header.params_bytes ||
      memcmp(bytes + sizeof header, key, header.key_bytes) != 0) {
    return miss(hash, key, n);  // another key with the same hash: the Python path re-plans
  }
  if (header.grid == 0) Py_RETURN_NONE;  // no rows
  // The block is copied before any call into Python, which could drop the plan.
  // 8-byte aligned: the block's pointer fields are patched as 64-bit words.
  uint64_t block_words[kMaxParams / 8];
  char* block = (char*)block_words;
  memcpy(block, bytes + sizeof header + header.key_bytes, header.params_bytes);
  for (int i = 0; i < kTensors; ++i) {
    const int32_t at = header.offsets[i];
    if (at >= 0 && (present & (1 << i))) memcpy(block + at, &tensors[i].ptr, sizeof(uint64_t));
  }
  if (header.rows_with_first_offset >= 0) {
    const uint32_t rows = (uint32_t)with_first * header.num_heads;
    memcpy(block + header.rows_with_first_offset, &rows, sizeof rows);
  }

  const long current = current_device();
  if (current == -2) return NULL;
  if (current != header.device_index) return miss(hash, key, n);  // context switch: Python
  PyObject* index = PyLong_FromLong(header.device_index);
  if (index == NULL) return NULL;
  PyObject* stream_obj = PyObject_CallOneArg(current_stream_fn, index);
  Py_DECREF(index);
  if (stream_obj == NULL) return NULL;
  void* stream = PyLong_AsVoidPtr(stream_obj);
  Py_DECREF(stream_obj);
  if (PyErr_Occurred()) return NULL;

  void* params[1] = {block};
  const int code = launch_kernel((void*)(uintptr_t)header.function, header.grid, 1, 1,
                                 header.block, 1, 1, 0, stream, params, NULL);
  if (code != 0) return PyLong_FromLong(code);
  Py_RETURN_NONE;
}

static PyObject* merge_pair(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 10 || !PyDict_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "merge_pair(plans, code, 8 arguments of the op)");
    return NULL;
  }
  if (launch_kernel == NULL) Py_RETURN_FALSE;  // setup() not called
  int64_t key[2 + kTensors * (4 + 2 * kMaxDims) + 2];
  int64_t* k = key;
  *k++ = PyLong_AsLongLong(args[1]);  // the LSE base and the requested backend
  Tensor tensors[kTensors];
  int present = 0;
  for (int i = 0; i < kTensors; ++i) {
    PyObject* t = args[i < kOutLse ? 2 + i : (i == kOutLse ? 7 : 9)];
    if (t == Py_None && i >= kOutLse) continue;
    const int status = read_tensor(t, &tensors[i], &k);
    if (status < 0) PyErr_Clear();  // e.g. a sparse tensor's stride(): the Python path says
    if (status != 0) Py_RETURN_FALSE;
    present |= 1 << i;
  }
  // Which written tensors are the very inputs (in place), and the prefill class.
  const uint64_t out = tensors[kOut].ptr;
  int64_t facts = present;
  facts |= (int64_t)(out == tensors[kPartial0].ptr) << 8;
  facts |= (int64_t)(out == tensors[kPartial1].ptr) << 9;
  if (present & (1 << kOutLse)) {
    facts |= (int64_t)(tensors[kOutLse].ptr == tensors[kLse0].ptr) << 10;
    facts |= (int64_t)(tensors[kOutLse].ptr == tensors[kLse1].ptr) << 11;
  }
  const int64_t tokens = tensors[kOut].ndim == 3 ? tensors[kOut].shape[0] : -1;
  int64_t with_first;
  const int prefill = prefill_class(args[8], tokens, &with_first);
  if (prefill < 0) Py_RETURN_FALSE;
  facts |= (int64_t)prefill << 12;
  *k++ = facts;
  return run_plan(args[0], key, (size_t)(k - key), tensors, present, with_first);
}

// The element size of a tensor, 0 where it cannot be read (a Python error is cleared).
static int64_t item_size(PyObject* t) {
  PyObject* value = PyObject_GetAttr(t, s_itemsize);
  if (value == NULL) {
    PyErr_Clear();
    return 0;
  }
  const int64_t size = PyLong_AsLongLong(value);
  Py_DECREF(value);
  if (size == -1 && PyErr_Occurred()) PyErr_Clear();
  return size > 0 ? size : 0;
}

// Where a written tensor starts relative to a stacked input (the checks of
// _check_written_stack in api.py depend on nothing else): 1 + k where it starts where
// partial k does (stacked; k < the partial count), -1 where it starts where the input
// does (packed), else 0.
static int64_t start_within(const Tensor* written, const Tensor* stack, int64_t step_bytes,
                            int packed) {
  const int64_t offset = (int64_t)(written->ptr - stack->ptr);
  if (packed) return offset == 0 ? -1 : 0;
  if (step_bytes == 0) return offset == 0 ? 1 : 0;
  if (offset % step_bytes != 0 || stack->ndim < 1) return 0;
  const int64_t k = offset / step_bytes;
  return k >= 0 && k < stack->shape[0] ? 1 + k : 0;
}

static PyObject* merge_partials(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9 || !PyDict_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "merge_partials(plans, code, 7 arguments of the op)");
    return NULL;
  }
  if (launch_kernel == NULL) Py_RETURN_FALSE;  // setup() not called
  int64_t key[2 + kTensors * (4 + 2 * kMaxDims) + 4];
  int64_t* k = key;
  *k++ = PyLong_AsLongLong(args[1]) | kStackedKey;  // the LSE base and the requested backend
  // args: out, out_lse, outputs, lses, indptr, prefill, output_scale
  static const int kArgOf[] = {2, 4, 5, 6, 3, 8};  // of kStackOut .. kStackScale
  Tensor tensors[kTensors];
  int present = 0;
  for (int i = 0; i <= kStackScale; ++i) {
    PyObject* t = args[kArgOf[i]];
    if (t == Py_None && (i == kStackIndptr || i == kStackOutLse || i == kStackScale)) continue;
    const int status = read_tensor(t, &tensors[i], &k);
    if (status < 0) PyErr_Clear();
    if (status != 0) Py_RETURN_FALSE;
    present |= 1 << i;
  }
  const int packed = (present >> kStackIndptr) & 1;
  const Tensor* partials = &tensors[kStackPartials];
  const Tensor* lses = &tensors[kStackLses];
  const int64_t itemsize =
      partials->itemsize ? partials->itemsize : item_size(args[kArgOf[kStackPartials]]);
  const int64_t partial_step = partials->stride[0] * itemsize;
  *k++ = present;
  *k++ = start_within(&tensors[kStackOut], partials, partial_step, packed);
  // A stacked LSE's partial axis is its first. float32: LSEs of another dtype (in the key)
  // are never planned, so their start fact may be anything.
  *k++ = present & (1 << kStackOutLse)
             ? start_within(&tensors[kStackOutLse], lses, lses->stride[0] * 4, packed)
             : 0;
  const int64_t tokens = tensors[kStackOut].ndim == 3 ? tensors[kStackOut].shape[0] : -1;
  int64_t with_first;
  const int prefill = prefill_class(args[7], tokens, &with_first);
  if (prefill < 0) Py_RETURN_FALSE;
  *k++ = prefill;
  return run_plan(args[0], key, (size_t)(k - key), tensors, present, with_first);
}

// The exchange API's reader in a torch.Tensor.__dlpack_c_exchange_api__ capsule (one of
// major version 1 along its chain), or NULL.
static DLTensorFromPyObjectFn exchange_reader(PyObject* capsule) {
  if (capsule == Py_None || !PyCapsule_CheckExact(capsule)) return NULL;
  const DLPackExchangeAPIHeader* header = PyCapsule_GetPointer(capsule, "dlpack_exchange_api");
  if (header == NULL) {
    PyErr_Clear();
    return NULL;
  }
  while (header != NULL && header->major != 1) header = header->prev_api;
  if (header == NULL) return NULL;
  return ((const DLPackExchangeAPI*)header)->dltensor_from_py_object_no_sync;
}

// setup(torch.Tensor, torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream,
//       address of cuLaunchKernel, accept_host_tensors, exchange API capsule or None)
//   -> whether tensors are read through the exchange API
static PyObject* setup(PyObject* self, PyObject* args) {
  PyObject *type, *device_fn, *stream_fn, *exchange = Py_None;
  unsigned long long launch_address;
  int host;
  if (!PyArg_ParseTuple(args, "O!OOKp|O", &PyType_Type, &type, &device_fn, &stream_fn,
                        &launch_address, &host, &exchange)) {
    return NULL;
  }
  Py_INCREF(type);
  Py_INCREF(device_fn);
  Py_INCREF(stream_fn);
  Py_XDECREF((PyObject*)tensor_type);
  Py_XDECREF(current_device_fn);
  Py_XDECREF(current_stream_fn);
  tensor_type = (PyTypeObject*)type;
  current_device_fn = device_fn;
  current_stream_fn = stream_fn;
  launch_kernel = (LaunchKernelFn)(uintptr_t)launch_address;
  accept_host_tensors = host;
  dltensor_of = exchange_reader(exchange);
  return PyBool_FromLong(dltensor_of != NULL);
}

static PyMethodDef methods[] = {
    {"merge_pair", (PyCFunction)(void (*)(void))merge_pair, METH_FASTCALL,
     "Launch a two-partial merge from its stored plan, or report a miss."},
    {"merge_partials", (PyCFunction)(void (*)(void))merge_partials, METH_FASTCALL,
     "Launch a stacked or packed merge from its stored plan, or report a miss."},
    {"setup", setup, METH_VARARGS,
     "Bind torch's tensor type, getters, cuLaunchKernel and DLPack's exchange API."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_attnmerge_eager", NULL, -1,
                                    methods};

PyMODINIT_FUNC PyInit__attnmerge_eager(void) {
  s_data_ptr = PyUnicode_InternFromString("data_ptr");
  s_stride = PyUnicode_InternFromString("stride");
  s_shape = PyUnicode_InternFromString("shape");
  s_dtype = PyUnicode_InternFromString("dtype");
  s_get_device = PyUnicode_InternFromString("get_device");
  s_itemsize = PyUnicode_InternFromString("itemsize");
  if (!s_data_ptr || !s_stride || !s_shape || !s_dtype || !s_get_device || !s_itemsize) {
    return NULL;
  }
  stream_kwnames = Py_BuildValue("(s)", "stream");
  if (stream_kwnames == NULL) return NULL;
  return PyModule_Create(&module);
}
