/* qos_tvm_shim.c: host side of TVM system-lib kernel objects (see qos_tvm_shim.h). */
#define _POSIX_C_SOURCE 200809L
#include "qos_tvm_shim.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Same prototypes as tvm/runtime/c_backend_api.h and tvm/ffi/extra/c_env_api.h, declared
 * here so that only the wheel's tvm_ffi/include directory is needed. */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint);
int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr);
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task);
int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv* penv);
int TVMFFIEnvModRegisterSystemLibSymbol(const char* name, void* symbol);
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** message_parts, int32_t num_parts);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);

/* ------------------------------------------------------------------ symbol registry */
/* Filled by static constructors before main(): zero-initialised storage only, no locks. */
#define QOS_MAX_SYMBOLS 4096
static struct { const char* name; void* ptr; } g_symbols[QOS_MAX_SYMBOLS];
static int g_num_symbols;

int TVMFFIEnvModRegisterSystemLibSymbol(const char* name, void* symbol) {
  int i;
  for (i = 0; i < g_num_symbols; ++i) {
    if (strcmp(g_symbols[i].name, name) == 0) { g_symbols[i].ptr = symbol; return 0; }
  }
  if (g_num_symbols == QOS_MAX_SYMBOLS) return -1;
  g_symbols[g_num_symbols].name = name;
  g_symbols[g_num_symbols].ptr = symbol;
  ++g_num_symbols;
  return 0;
}

void* qos_shim_lookup_symbol(const char* name) {
  int i;
  for (i = 0; i < g_num_symbols; ++i)
    if (strcmp(g_symbols[i].name, name) == 0) return g_symbols[i].ptr;
  return NULL;
}

/* Only kernel entries: a kernel registers as "__tvm_ffi_<symbol>"; the registry also holds data
 * ("<prefix>__tvm_ffi__library_ctx"), which must never be returned as a function. */
qos_shim_packed_fn qos_shim_get_function(const char* name) {
  static const char kCtx[] = "__tvm_ffi__library_ctx";
  char buf[512];
  const char* key = name;
  size_t n;
  void* p;
  if (name == NULL) return NULL;
  if (strncmp(name, "__tvm_ffi_", 10) != 0) {
    if (strlen(name) + 11 > sizeof(buf)) return NULL;
    snprintf(buf, sizeof(buf), "__tvm_ffi_%s", name);
    key = buf;
  }
  n = strlen(key);
  if (n >= sizeof(kCtx) - 1 && strcmp(key + n - (sizeof(kCtx) - 1), kCtx) == 0) return NULL;
  p = qos_shim_lookup_symbol(key);
  /* data pointer -> function pointer: the registry stores both kinds (POSIX allows this) */
  return p ? *(qos_shim_packed_fn*)&p : NULL;
}

int qos_shim_num_symbols(void) { return g_num_symbols; }
const char* qos_shim_symbol_name(int i) { return (i >= 0 && i < g_num_symbols) ? g_symbols[i].name : NULL; }

/* ------------------------------------------------------------------ errors */
static __thread char t_error[1024];

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  size_t used;
  int32_t i;
  snprintf(t_error, sizeof(t_error), "%s: ", kind ? kind : "Error");
  for (i = 0; i < num_parts; ++i) {
    used = strlen(t_error);
    if (parts[i] != NULL && used + 1 < sizeof(t_error))
      snprintf(t_error + used, sizeof(t_error) - used, "%s", parts[i]);
  }
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  TVMFFIErrorSetRaisedFromCStrParts(kind, &message, 1);
}

const char* qos_shim_last_error(void) { return t_error; }
void qos_shim_clear_error(void) { t_error[0] = '\0'; }

/* ------------------------------------------------------------------ workspace */
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  void* p = NULL;
  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;
  /* TVM expects kTempAllocaAlignment (64) */
  if (posix_memalign(&p, 64, nbytes ? (size_t)nbytes : 1) != 0) {
    TVMFFIErrorSetRaisedFromCStr("MemoryError", "TVMBackendAllocWorkspace: out of memory");
    return NULL;
  }
  return p;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  free(ptr);
  return 0;
}

/* ------------------------------------------------------------------ thread pool */
/* One job at a time: the launching thread runs task 0 and workers 1..n-1 run the others
 * (task t also runs t + n, t + 2n, ... when num_task > n). A launch from inside a task,
 * or from a second thread while a job runs, is executed serially by its caller. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_done = PTHREAD_COND_INITIALIZER;
static int g_threads;        /* configured thread count (0 = not yet chosen) */
static int g_workers;        /* live worker threads (g_threads - 1 once started) */
static pthread_t* g_worker_ids;
static unsigned long g_generation;
static int g_pending;        /* workers still running the current job */
static int g_shutdown;
static int g_busy;           /* a job is in flight */
static FTVMParallelLambda g_fn;
static void* g_cdata;
static TVMParallelGroupEnv g_env;
static int g_status;
static __thread int t_in_task;

/* barrier state for TVMBackendParallelBarrier (all tasks of the job must be live) */
static pthread_mutex_t g_bar_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_bar_cv = PTHREAD_COND_INITIALIZER;
static int g_bar_count;
static unsigned long g_bar_phase;

static int env_threads(void) {
  const char* names[2] = {"QOS_NUM_THREADS", "TVM_NUM_THREADS"};
  int i, n;
  for (i = 0; i < 2; ++i) {
    const char* v = getenv(names[i]);
    if (v != NULL && (n = atoi(v)) > 0) return n;
  }
  n = (int)sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? n : 1;
}

/* Workers and the launcher poll this long before sleeping on a condition variable: a plan
 * launches one parallel kernel after another microseconds apart, and a condvar wake-up cost
 * ~75 us per launch on a busy 2-core VM (measured with qos-run --profile). */
#define QOS_SPIN 4000

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int run_tasks(int first, int stride) {
  int t, rc = 0;
  for (t = first; t < g_env.num_task; t += stride) {
    int r = g_fn(t, &g_env, g_cdata);
    if (r != 0) rc = r;
  }
  return rc;
}

static void* worker_main(void* arg) {
  int id = (int)(intptr_t)arg;
  unsigned long seen = 0;
  t_in_task = 1;
  for (;;) {
    int rc;
    int spins;
    for (spins = 0; spins < QOS_SPIN && __atomic_load_n(&g_generation, __ATOMIC_ACQUIRE) == seen &&
                    !__atomic_load_n(&g_shutdown, __ATOMIC_ACQUIRE); ++spins)
      cpu_relax();
    pthread_mutex_lock(&g_mu);
    while (g_generation == seen && !g_shutdown) pthread_cond_wait(&g_wake, &g_mu);
    if (g_shutdown) { pthread_mutex_unlock(&g_mu); return NULL; }
    seen = g_generation;
    pthread_mutex_unlock(&g_mu);
    rc = run_tasks(id, g_workers + 1);
    pthread_mutex_lock(&g_mu);
    if (rc != 0) g_status = rc;
    if (__atomic_sub_fetch(&g_pending, 1, __ATOMIC_ACQ_REL) == 0) pthread_cond_broadcast(&g_done);
    pthread_mutex_unlock(&g_mu);
  }
}

static void stop_pool(void) {   /* caller holds g_mu, no job in flight */
  int i, n = g_workers;
  __atomic_store_n(&g_shutdown, 1, __ATOMIC_RELEASE);
  pthread_cond_broadcast(&g_wake);
  pthread_mutex_unlock(&g_mu);
  for (i = 0; i < n; ++i) pthread_join(g_worker_ids[i], NULL);
  pthread_mutex_lock(&g_mu);
  free(g_worker_ids);
  g_worker_ids = NULL;
  g_workers = 0;
  g_shutdown = 0;
}

static void start_pool(void) {  /* caller holds g_mu */
  int i;
  if (g_threads <= 0) g_threads = env_threads();
  if (g_threads <= 1 || g_workers == g_threads - 1) return;
  g_worker_ids = (pthread_t*)calloc((size_t)(g_threads - 1), sizeof(pthread_t));
  if (g_worker_ids == NULL) { g_threads = 1; return; }
  for (i = 0; i < g_threads - 1; ++i) {
    if (pthread_create(&g_worker_ids[i], NULL, worker_main, (void*)(intptr_t)(i + 1)) != 0) break;
  }
  g_workers = i;
  g_threads = i + 1;   /* run with the threads we got */
}

int qos_shim_set_num_threads(int n) {
  pthread_mutex_lock(&g_mu);
  while (g_busy) pthread_cond_wait(&g_done, &g_mu);
  if (g_workers > 0) stop_pool();
  g_threads = n > 0 ? n : env_threads();
  n = g_threads;
  pthread_mutex_unlock(&g_mu);
  return n;
}

int qos_shim_num_threads(void) {
  int n;
  pthread_mutex_lock(&g_mu);
  if (g_threads <= 0) g_threads = env_threads();
  n = g_threads;
  pthread_mutex_unlock(&g_mu);
  return n;
}

int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int rc, threads;
  pthread_mutex_lock(&g_mu);
  if (t_in_task || g_busy) {          /* nested or concurrent launch: run it here, serially */
    TVMParallelGroupEnv env;
    pthread_mutex_unlock(&g_mu);
    env.sync_handle = NULL;
    env.num_task = 1;
    return flambda(0, &env, cdata);
  }
  start_pool();
  threads = g_workers + 1;
  g_busy = 1;
  g_fn = flambda;
  g_cdata = cdata;
  g_env.sync_handle = NULL;
  g_env.num_task = num_task > 0 ? num_task : threads;
  g_status = 0;
  g_pending = g_workers;
  g_bar_count = 0;
  __atomic_store_n(&g_generation, g_generation + 1, __ATOMIC_RELEASE);
  pthread_cond_broadcast(&g_wake);
  pthread_mutex_unlock(&g_mu);

  t_in_task = 1;
  rc = run_tasks(0, threads);
  t_in_task = 0;

  {
    int spins;
    for (spins = 0; spins < QOS_SPIN && __atomic_load_n(&g_pending, __ATOMIC_ACQUIRE) > 0; ++spins) cpu_relax();
  }
  pthread_mutex_lock(&g_mu);
  while (g_pending > 0) pthread_cond_wait(&g_done, &g_mu);
  if (rc == 0) rc = g_status;
  g_busy = 0;
  pthread_cond_broadcast(&g_done);
  pthread_mutex_unlock(&g_mu);
  return rc;
}

int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv* penv) {
  unsigned long phase;
  (void)task_id;
  if (penv->num_task <= 1) return 0;
  pthread_mutex_lock(&g_bar_mu);
  phase = g_bar_phase;
  if (++g_bar_count == penv->num_task) {
    g_bar_count = 0;
    ++g_bar_phase;
    pthread_cond_broadcast(&g_bar_cv);
  } else {
    while (phase == g_bar_phase) pthread_cond_wait(&g_bar_cv, &g_bar_mu);
  }
  pthread_mutex_unlock(&g_bar_mu);
  return 0;
}

/* ------------------------------------------------------------------ argument helpers */
TVMFFIAny qos_shim_tensor_arg(DLTensor* t) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFIDLTensorPtr;
  a.v_ptr = t;
  return a;
}

TVMFFIAny qos_shim_int_arg(int64_t v) {
  TVMFFIAny a;
  memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFIInt;
  a.v_int64 = v;
  return a;
}
