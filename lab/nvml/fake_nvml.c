/*
 * The lab's stand-in for libnvidia-ml.so.1.
 *
 * Unmodified pynvml loads this library through the loader path and sees a simulated node
 * whose GPUs, counters and faults come from a plain-text state file (format: README.md next
 * to this file; lab/nvml_state.py is its only writer). The state file is looked up on every
 * call and re-parsed when its identity (device, inode, size, mtime, ctime) changes, so faults
 * written while a process runs are seen by that process's next call.
 *
 * Build: see README.md (plain C99 + POSIX, no dependency beyond libc/pthread).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define LAB_EXPORT __attribute__((visibility("default")))

/* ---- NVML constants (values as in pynvml / nvml.h) ------------------------------------ */

typedef int nvmlReturn_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_ALREADY_INITIALIZED 5
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_INSUFFICIENT_POWER 8
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_IRQ_ISSUE 11
#define NVML_ERROR_LIBRARY_NOT_FOUND 12
#define NVML_ERROR_FUNCTION_NOT_FOUND 13
#define NVML_ERROR_CORRUPTED_INFOROM 14
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_RESET_REQUIRED 16
#define NVML_ERROR_OPERATING_SYSTEM 17
#define NVML_ERROR_LIB_RM_VERSION_MISMATCH 18
#define NVML_ERROR_IN_USE 19
#define NVML_ERROR_MEMORY 20
#define NVML_ERROR_NO_DATA 21
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define NVML_DEVICE_ARCH_AMPERE 7u

#define NVML_TEMPERATURE_GPU 0u
#define NVML_MEMORY_ERROR_TYPE_CORRECTED 0u
#define NVML_MEMORY_ERROR_TYPE_UNCORRECTED 1u
#define NVML_VOLATILE_ECC 0u
#define NVML_AGGREGATE_ECC 1u
#define NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS 0u
#define NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR 1u

#define nvmlEventTypeSingleBitEccError 0x1ULL
#define nvmlEventTypeDoubleBitEccError 0x2ULL
#define nvmlEventTypePState 0x4ULL
#define nvmlEventTypeXidCriticalError 0x8ULL
#define nvmlEventTypeClock 0x10ULL

#define NVML_MEMORY_V2_VERSION 0x02000028u /* sizeof(nvmlMemory_v2_t) | (2 << 24) */
#define NVML_INVALID_INSTANCE_ID 0xFFFFFFFFu

/* ---- public structs (layouts as pynvml's ctypes Structures) ------------------------- */

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

struct lab_device;
typedef struct lab_device *nvmlDevice_t;
struct lab_event_set;
typedef struct lab_event_set *nvmlEventSet_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

typedef struct { /* layout used by the unversioned nvmlEventSetWait */
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
} nvmlEventData_v1_t;

/* ---- simulated state ---------------------------------------------------------------- */

#define LAB_MAX_GPUS 64
#define LAB_MAX_STATE_BYTES (16u * 1024u * 1024u)
#define LAB_ENV_STATE "GPUNODE_LAB_NVML_STATE"
#define LAB_ENV_DEBUG "GPUNODE_LAB_NVML_DEBUG"
#define LAB_STATE_FORMAT 1
#define LAB_POLL_MS 20u

/* Features a GPU kind may lack: listed in gpu.N.unsupported, answered NVML_ERROR_NOT_SUPPORTED. */
enum {
    F_ECC = 1u << 0,
    F_RETIRED_PAGES = 1u << 1,
    F_REMAPPED_ROWS = 1u << 2,
    F_MIG = 1u << 3,
    F_PERSISTENCE = 1u << 4,
    F_TEMPERATURE = 1u << 5,
    F_POWER = 1u << 6,
    F_SERIAL = 1u << 7,
    F_EVENTS = 1u << 8,
    F_MINOR = 1u << 9,
    F_MEMORY = 1u << 10,
    F_CUDA_CC = 1u << 11
};

static const struct {
    const char *name;
    unsigned bit;
} lab_features[] = {
    {"ecc", F_ECC},
    {"retired_pages", F_RETIRED_PAGES},
    {"remapped_rows", F_REMAPPED_ROWS},
    {"mig", F_MIG},
    {"persistence_mode", F_PERSISTENCE},
    {"temperature", F_TEMPERATURE},
    {"power_usage", F_POWER},
    {"serial", F_SERIAL},
    {"events", F_EVENTS},
    {"minor_number", F_MINOR},
    {"memory", F_MEMORY},
    {"cuda_compute_capability", F_CUDA_CC},
};

typedef struct {
    int seen;
    char uuid[96];
    char name[96];
    char serial[32];
    char pci_bus_id[32];
    unsigned arch;
    unsigned pci_device_id;
    unsigned pci_subsystem_id;
    unsigned minor_number;
    unsigned long long memory_total;
    unsigned long long memory_reserved;
    unsigned long long memory_used;
    unsigned long long memory_free;
    unsigned persistence_mode;
    unsigned mig_current;
    unsigned mig_pending;
    unsigned ecc_current;
    unsigned ecc_pending;
    unsigned long long ecc_volatile_corrected;
    unsigned long long ecc_volatile_uncorrected;
    unsigned long long ecc_aggregate_corrected;
    unsigned long long ecc_aggregate_uncorrected;
    unsigned retired_pages_sbe;
    unsigned retired_pages_dbe;
    unsigned retired_pages_pending;
    unsigned remapped_rows_correctable;
    unsigned remapped_rows_uncorrectable;
    unsigned remapped_rows_pending;
    unsigned remapped_rows_failure;
    unsigned temperature;
    unsigned power_usage_mw;
    unsigned cuda_cc_major;
    unsigned cuda_cc_minor;
    unsigned lost;
    unsigned unsupported; /* F_* bits */
} lab_gpu;

typedef struct {
    unsigned long long seq;
    unsigned gpu;
    unsigned long long xid;
} lab_xid;

typedef struct {
    char driver_version[80];
    char nvml_version[80];
    int cuda_driver_version;
    int init_error;
    unsigned gpu_count;
    lab_gpu gpus[LAB_MAX_GPUS];
    lab_xid *xids;
    size_t xid_count;
    size_t xid_capacity;
} lab_state;

struct lab_node;

#define LAB_DEVICE_MAGIC 0x6c616264u /* "labd" */
#define LAB_EVENTSET_MAGIC 0x6c616265u /* "labe" */

struct lab_device {
    unsigned magic;
    unsigned index;
    struct lab_node *node;
};

/* One simulated node = one state file path. Never freed: device handles point into it. */
typedef struct lab_node {
    struct lab_node *next;
    char *path;
    int init_count;
    lab_state *state; /* last good parse, NULL before the first */
    int have_key;
    dev_t key_dev;
    ino_t key_ino;
    off_t key_size;
    struct timespec key_mtime;
    struct timespec key_ctime;
    struct lab_device devices[LAB_MAX_GPUS];
} lab_node;

struct lab_event_set {
    unsigned magic;
    lab_node *node;
    unsigned long long mask[LAB_MAX_GPUS];   /* registered event types per GPU index */
    unsigned long long cursor[LAB_MAX_GPUS]; /* last delivered XID sequence per GPU index */
};

static pthread_mutex_t lab_lock = PTHREAD_MUTEX_INITIALIZER;
static lab_node *lab_nodes;
static char *lab_override_path;

static void lab_debug(const char *fmt, const char *arg1, const char *arg2)
{
    const char *debug = getenv(LAB_ENV_DEBUG);
    if (debug && *debug && strcmp(debug, "0") != 0) {
        fprintf(stderr, "lab-nvml: ");
        fprintf(stderr, fmt, arg1, arg2);
        fputc('\n', stderr);
    }
}

/* ---- state file parsing --------------------------------------------------------------- */

static int parse_u64(const char *value, unsigned long long *out)
{
    char *end;
    if (*value == '\0' || *value == '-')
        return -1;
    errno = 0;
    *out = strtoull(value, &end, 0);
    return (errno != 0 || *end != '\0') ? -1 : 0;
}

static int parse_u32(const char *value, unsigned *out)
{
    unsigned long long v;
    if (parse_u64(value, &v) != 0 || v > 0xFFFFFFFFull)
        return -1;
    *out = (unsigned)v;
    return 0;
}

static int parse_int(const char *value, int *out)
{
    char *end;
    long v;
    if (*value == '\0')
        return -1;
    errno = 0;
    v = strtol(value, &end, 0);
    if (errno != 0 || *end != '\0' || v < -2147483647L - 1 || v > 2147483647L)
        return -1;
    *out = (int)v;
    return 0;
}

static int copy_str(char *dst, size_t size, const char *value)
{
    size_t len = strlen(value);
    if (len >= size)
        return -1;
    memcpy(dst, value, len + 1);
    return 0;
}

static unsigned parse_features(const char *value)
{
    unsigned bits = 0;
    const char *p = value;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        size_t i;
        for (i = 0; i < sizeof(lab_features) / sizeof(lab_features[0]); i++) {
            if (strlen(lab_features[i].name) == len && strncmp(lab_features[i].name, p, len) == 0)
                bits |= lab_features[i].bit;
        }
        if (!comma)
            break;
        p = comma + 1;
    }
    return bits;
}

enum lab_field_type { FT_STR, FT_U32, FT_U64, FT_FEATURES };

static const struct {
    const char *name;
    enum lab_field_type type;
    size_t offset;
    size_t size;
} lab_gpu_fields[] = {
#define LAB_F(field, type) {#field, type, offsetof(lab_gpu, field), sizeof(((lab_gpu *)0)->field)}
    LAB_F(uuid, FT_STR),
    LAB_F(name, FT_STR),
    LAB_F(serial, FT_STR),
    LAB_F(pci_bus_id, FT_STR),
    LAB_F(arch, FT_U32),
    LAB_F(pci_device_id, FT_U32),
    LAB_F(pci_subsystem_id, FT_U32),
    LAB_F(minor_number, FT_U32),
    LAB_F(memory_total, FT_U64),
    LAB_F(memory_reserved, FT_U64),
    LAB_F(memory_used, FT_U64),
    LAB_F(memory_free, FT_U64),
    LAB_F(persistence_mode, FT_U32),
    LAB_F(mig_current, FT_U32),
    LAB_F(mig_pending, FT_U32),
    LAB_F(ecc_current, FT_U32),
    LAB_F(ecc_pending, FT_U32),
    LAB_F(ecc_volatile_corrected, FT_U64),
    LAB_F(ecc_volatile_uncorrected, FT_U64),
    LAB_F(ecc_aggregate_corrected, FT_U64),
    LAB_F(ecc_aggregate_uncorrected, FT_U64),
    LAB_F(retired_pages_sbe, FT_U32),
    LAB_F(retired_pages_dbe, FT_U32),
    LAB_F(retired_pages_pending, FT_U32),
    LAB_F(remapped_rows_correctable, FT_U32),
    LAB_F(remapped_rows_uncorrectable, FT_U32),
    LAB_F(remapped_rows_pending, FT_U32),
    LAB_F(remapped_rows_failure, FT_U32),
    LAB_F(temperature, FT_U32),
    LAB_F(power_usage_mw, FT_U32),
    LAB_F(cuda_cc_major, FT_U32),
    LAB_F(cuda_cc_minor, FT_U32),
    LAB_F(lost, FT_U32),
    LAB_F(unsupported, FT_FEATURES),
#undef LAB_F
};

/* gpu.<index>.<field>=<value>; unknown fields are ignored (forward compatible). */
static int parse_gpu_line(lab_state *st, const char *key, const char *value)
{
    char *end;
    unsigned long idx;
    lab_gpu *gpu;
    size_t i;

    errno = 0;
    idx = strtoul(key, &end, 10);
    if (end == key || *end != '.' || errno != 0)
        return -1;
    if (idx >= LAB_MAX_GPUS)
        return -1;
    key = end + 1;
    gpu = &st->gpus[idx];
    gpu->seen = 1;
    for (i = 0; i < sizeof(lab_gpu_fields) / sizeof(lab_gpu_fields[0]); i++) {
        char *field;
        if (strcmp(lab_gpu_fields[i].name, key) != 0)
            continue;
        field = (char *)gpu + lab_gpu_fields[i].offset;
        switch (lab_gpu_fields[i].type) {
        case FT_STR:
            return copy_str(field, lab_gpu_fields[i].size, value);
        case FT_U32:
            return parse_u32(value, (unsigned *)(void *)field);
        case FT_U64:
            return parse_u64(value, (unsigned long long *)(void *)field);
        case FT_FEATURES:
            *(unsigned *)(void *)field = parse_features(value);
            return 0;
        }
    }
    return 0;
}

/* xid=<seq> <gpu> <xid> */
static int parse_xid_line(lab_state *st, const char *value)
{
    lab_xid ev;
    char extra;
    if (sscanf(value, "%llu %u %llu %c", &ev.seq, &ev.gpu, &ev.xid, &extra) != 3)
        return -1;
    if (st->xid_count == st->xid_capacity) {
        size_t cap = st->xid_capacity ? st->xid_capacity * 2 : 16;
        lab_xid *grown = realloc(st->xids, cap * sizeof(*grown));
        if (!grown)
            return -1;
        st->xids = grown;
        st->xid_capacity = cap;
    }
    st->xids[st->xid_count++] = ev;
    return 0;
}

static void free_state(lab_state *st)
{
    if (st) {
        free(st->xids);
        free(st);
    }
}

/* Parses a whole state file held in buf (NUL-terminated, modified in place). */
static lab_state *parse_state(char *buf, const char *path)
{
    lab_state *st = calloc(1, sizeof(*st));
    int have_format = 0, have_end = 0, have_count = 0;
    char *line = buf;
    unsigned i;

    if (!st)
        return NULL;
    while (line && *line) {
        char *next = strchr(line, '\n');
        char *eq;
        int bad = 0;
        if (next)
            *next++ = '\0';
        else if (*line) {
            /* a last line without '\n' means the file was cut short */
            lab_debug("%s: truncated last line%s", path, "");
            goto fail;
        }
        if (*line && line[strlen(line) - 1] == '\r')
            line[strlen(line) - 1] = '\0';
        if (*line == '\0' || *line == '#') {
            line = next;
            continue;
        }
        if (have_end) {
            lab_debug("%s: content after end=%s", path, "");
            goto fail;
        }
        eq = strchr(line, '=');
        if (!eq) {
            lab_debug("%s: line without '=': %s", path, line);
            goto fail;
        }
        *eq = '\0';
        {
            const char *key = line, *value = eq + 1;
            if (strncmp(key, "gpu.", 4) == 0)
                bad = parse_gpu_line(st, key + 4, value);
            else if (strcmp(key, "xid") == 0)
                bad = parse_xid_line(st, value);
            else if (strcmp(key, "format") == 0) {
                int fmt = 0;
                bad = parse_int(value, &fmt) != 0 || fmt != LAB_STATE_FORMAT;
                have_format = 1;
            } else if (strcmp(key, "driver_version") == 0)
                bad = copy_str(st->driver_version, sizeof(st->driver_version), value);
            else if (strcmp(key, "nvml_version") == 0)
                bad = copy_str(st->nvml_version, sizeof(st->nvml_version), value);
            else if (strcmp(key, "cuda_driver_version") == 0)
                bad = parse_int(value, &st->cuda_driver_version);
            else if (strcmp(key, "init_error") == 0)
                bad = parse_int(value, &st->init_error);
            else if (strcmp(key, "gpu_count") == 0) {
                bad = parse_u32(value, &st->gpu_count) != 0 || st->gpu_count > LAB_MAX_GPUS;
                have_count = 1;
            } else if (strcmp(key, "end") == 0)
                have_end = 1;
            /* anything else (node, xid_next_seq, removed.*) is for lab/nvml_state.py */
            if (bad) {
                lab_debug("%s: bad value for %s", path, key);
                goto fail;
            }
        }
        line = next;
    }
    if (!have_format || !have_count || !have_end) {
        lab_debug("%s: %s", path, "missing format=, gpu_count= or end= (truncated?)");
        goto fail;
    }
    for (i = 0; i < st->gpu_count; i++) {
        if (!st->gpus[i].seen || st->gpus[i].uuid[0] == '\0') {
            lab_debug("%s: %s", path, "a GPU below gpu_count has no uuid");
            goto fail;
        }
    }
    return st;
fail:
    free_state(st);
    return NULL;
}

static lab_state *read_state_file(const char *path, struct stat *key_out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    lab_state *st = NULL;

    if (fd < 0) {
        lab_debug("%s: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, key_out) != 0 || !S_ISREG(key_out->st_mode))
        goto out;
    cap = (size_t)key_out->st_size + 1;
    if (cap > LAB_MAX_STATE_BYTES)
        goto out;
    buf = malloc(cap + 1);
    if (!buf)
        goto out;
    for (;;) {
        ssize_t got;
        if (len == cap) { /* the file grew while we read it: keep reading up to the limit */
            char *grown;
            if (cap * 2 > LAB_MAX_STATE_BYTES)
                goto out;
            grown = realloc(buf, cap * 2 + 1);
            if (!grown)
                goto out;
            buf = grown;
            cap *= 2;
        }
        got = read(fd, buf + len, cap - len);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        if (got == 0)
            break;
        len += (size_t)got;
    }
    buf[len] = '\0';
    if (memchr(buf, '\0', len)) {
        lab_debug("%s: %s", path, "NUL byte in state file");
        goto out;
    }
    st = parse_state(buf, path);
out:
    free(buf);
    close(fd);
    return st;
}

static int same_key(const lab_node *n, const struct stat *s)
{
    return n->have_key && n->key_dev == s->st_dev && n->key_ino == s->st_ino &&
           n->key_size == s->st_size && n->key_mtime.tv_sec == s->st_mtim.tv_sec &&
           n->key_mtime.tv_nsec == s->st_mtim.tv_nsec && n->key_ctime.tv_sec == s->st_ctim.tv_sec &&
           n->key_ctime.tv_nsec == s->st_ctim.tv_nsec;
}

/*
 * Brings n->state up to date with the file. strict (nvmlInit): the file must be readable and
 * valid now. Otherwise a process that initialized keeps its last good state when the file is
 * briefly missing or broken, like a loaded library keeps working. Caller holds lab_lock.
 */
static nvmlReturn_t lab_refresh(lab_node *n, int strict)
{
    struct stat s;
    lab_state *fresh;

    if (stat(n->path, &s) == 0 && n->state && same_key(n, &s))
        return NVML_SUCCESS;
    fresh = read_state_file(n->path, &s);
    if (!fresh)
        return (!strict && n->state) ? NVML_SUCCESS : NVML_ERROR_LIBRARY_NOT_FOUND;
    free_state(n->state);
    n->state = fresh;
    n->have_key = 1;
    n->key_dev = s.st_dev;
    n->key_ino = s.st_ino;
    n->key_size = s.st_size;
    n->key_mtime = s.st_mtim;
    n->key_ctime = s.st_ctim;
    return NVML_SUCCESS;
}

/* The node the next handle-less call is about. Caller holds lab_lock. */
static lab_node *lab_current_node(void)
{
    const char *path = lab_override_path ? lab_override_path : getenv(LAB_ENV_STATE);
    lab_node *n;
    unsigned i;

    if (!path || !*path)
        return NULL;
    for (lab_node **link = &lab_nodes; (n = *link) != NULL; link = &n->next) {
        if (strcmp(n->path, path) == 0) {
            *link = n->next; /* move to front: the daemon switches between a few hot nodes */
            n->next = lab_nodes;
            lab_nodes = n;
            return n;
        }
    }
    n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->path = strdup(path);
    if (!n->path) {
        free(n);
        return NULL;
    }
    for (i = 0; i < LAB_MAX_GPUS; i++) {
        n->devices[i].magic = LAB_DEVICE_MAGIC;
        n->devices[i].index = i;
        n->devices[i].node = n;
    }
    n->next = lab_nodes;
    lab_nodes = n;
    return n;
}

/* Current node, initialized and refreshed. Caller holds lab_lock. */
static nvmlReturn_t lab_system(lab_node **out)
{
    lab_node *n = lab_current_node();
    if (!n || n->init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    lab_refresh(n, 0);
    if (!n->state)
        return NVML_ERROR_UNINITIALIZED;
    *out = n;
    return NVML_SUCCESS;
}

/* The GPU behind a handle, on the handle's own node. Caller holds lab_lock. */
static nvmlReturn_t lab_gpu_of(nvmlDevice_t device, const lab_gpu **out)
{
    lab_node *n;
    if (!device || device->magic != LAB_DEVICE_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    n = device->node;
    if (n->init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    lab_refresh(n, 0);
    if (!n->state)
        return NVML_ERROR_UNINITIALIZED;
    /* a GPU that is gone from the state (fell off the bus) answers like a lost one */
    if (device->index >= n->state->gpu_count || n->state->gpus[device->index].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *out = &n->state->gpus[device->index];
    return NVML_SUCCESS;
}

static nvmlReturn_t lab_copy_string(char *buf, unsigned length, const char *value)
{
    size_t len = strlen(value);
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (len + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, value, len + 1);
    return NVML_SUCCESS;
}

/* Row remapping replaced page retirement with Ampere: a real A100/H100 answers NOT_SUPPORTED
 * for retired pages, and pre-Ampere GPUs answer NOT_SUPPORTED for remapped rows. */
static int lab_uses_row_remapping(const lab_gpu *g)
{
    return g->arch >= NVML_DEVICE_ARCH_AMPERE;
}

/* ---- init / shutdown / errors --------------------------------------------------------- */

/* Each simulated node (state path) is reference counted on its own, like one host's NVML.
 * Every nvmlInit checks the node's state file afresh, so an injected init error is reported
 * to the next initializer even while another user of the same node holds a reference. */
LAB_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    lab_node *n;
    nvmlReturn_t ret;
    (void)flags;
    pthread_mutex_lock(&lab_lock);
    n = lab_current_node();
    if (!n) {
        lab_debug("%s is not set (and no gpunodeLabSetStatePath)%s", LAB_ENV_STATE, "");
        ret = NVML_ERROR_LIBRARY_NOT_FOUND;
    } else {
        ret = lab_refresh(n, 1);
        if (ret == NVML_SUCCESS && n->state->init_error != 0)
            ret = n->state->init_error;
        if (ret == NVML_SUCCESS)
            n->init_count++;
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

LAB_EXPORT nvmlReturn_t nvmlInit(void)
{
    return nvmlInitWithFlags(0);
}

LAB_EXPORT nvmlReturn_t nvmlShutdown(void)
{
    lab_node *n;
    nvmlReturn_t ret = NVML_ERROR_UNINITIALIZED;
    pthread_mutex_lock(&lab_lock);
    n = lab_current_node();
    if (n && n->init_count > 0) {
        n->init_count--;
        ret = NVML_SUCCESS;
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* Lab extension: serve another node's state from this process. NULL goes back to
 * $GPUNODE_LAB_NVML_STATE. Returns 0 (NVML_SUCCESS) or NVML_ERROR_MEMORY. */
LAB_EXPORT int gpunodeLabSetStatePath(const char *path)
{
    char *copy = NULL;
    if (path) {
        copy = strdup(path);
        if (!copy)
            return NVML_ERROR_MEMORY;
    }
    pthread_mutex_lock(&lab_lock);
    free(lab_override_path);
    lab_override_path = copy;
    pthread_mutex_unlock(&lab_lock);
    return NVML_SUCCESS;
}

/* ---- system queries ------------------------------------------------------------------- */

LAB_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS)
        ret = lab_copy_string(version, length, n->state->driver_version);
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS)
        ret = lab_copy_string(version, length, n->state->nvml_version);
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        if (!cudaDriverVersion)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else
            *cudaDriverVersion = n->state->cuda_driver_version;
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return nvmlSystemGetCudaDriverVersion(cudaDriverVersion);
}

/* ---- device discovery ----------------------------------------------------------------- */

LAB_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        if (!deviceCount)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else
            *deviceCount = n->state->gpu_count; /* a lost GPU is still counted */
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        if (!device || index >= n->state->gpu_count)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else if (n->state->gpus[index].lost)
            ret = NVML_ERROR_GPU_IS_LOST;
        else
            *device = &n->devices[index];
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    lab_node *n;
    nvmlReturn_t ret;
    unsigned i;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        ret = (!uuid || !device) ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_NOT_FOUND;
        for (i = 0; uuid && device && i < n->state->gpu_count; i++) {
            if (strcmp(n->state->gpus[i].uuid, uuid) == 0) {
                if (n->state->gpus[i].lost) {
                    ret = NVML_ERROR_GPU_IS_LOST;
                } else {
                    *device = &n->devices[i];
                    ret = NVML_SUCCESS;
                }
                break;
            }
        }
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

/* Compares PCI bus ids numerically, so "0000:07:00.0" matches "00000000:07:00.0". */
static int lab_same_bus_id(const char *a, const char *b)
{
    unsigned d1, b1, s1, f1, d2, b2, s2, f2;
    if (sscanf(a, "%x:%x:%x.%x", &d1, &b1, &s1, &f1) != 4)
        return strcasecmp(a, b) == 0;
    if (sscanf(b, "%x:%x:%x.%x", &d2, &b2, &s2, &f2) != 4)
        return 0;
    return d1 == d2 && b1 == b2 && s1 == s2 && f1 == f2;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    lab_node *n;
    nvmlReturn_t ret;
    unsigned i;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        ret = (!pciBusId || !device) ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_NOT_FOUND;
        for (i = 0; pciBusId && device && i < n->state->gpu_count; i++) {
            if (lab_same_bus_id(pciBusId, n->state->gpus[i].pci_bus_id)) {
                if (n->state->gpus[i].lost) {
                    ret = NVML_ERROR_GPU_IS_LOST;
                } else {
                    *device = &n->devices[i];
                    ret = NVML_SUCCESS;
                }
                break;
            }
        }
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *pciBusId, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByPciBusId_v2(pciBusId, device);
}

/* ---- per-device queries --------------------------------------------------------------- */

/* Opens a per-device query: lock, resolve the handle, check the feature; `g` is valid until
 * LAB_DEVICE_END. Every per-device call answers GPU_IS_LOST for a lost GPU. */
#define LAB_DEVICE_BEGIN(device, feature)                                                      \
    const lab_gpu *g = NULL;                                                               \
    nvmlReturn_t ret;                                                                      \
    pthread_mutex_lock(&lab_lock);                                                         \
    ret = lab_gpu_of((device), &g);                                                        \
    if (ret == NVML_SUCCESS && (g->unsupported & (feature)))                              \
        ret = NVML_ERROR_NOT_SUPPORTED;                                                    \
    if (ret == NVML_SUCCESS) {
#define LAB_DEVICE_END                                                                         \
    }                                                                                      \
    pthread_mutex_unlock(&lab_lock);                                                       \
    return ret;

LAB_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    LAB_DEVICE_BEGIN(device, 0)
    if (!index)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *index = device->index;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    LAB_DEVICE_BEGIN(device, 0)
    ret = lab_copy_string(uuid, length, g->uuid);
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    LAB_DEVICE_BEGIN(device, 0)
    ret = lab_copy_string(name, length, g->name);
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length)
{
    LAB_DEVICE_BEGIN(device, F_SERIAL)
    ret = lab_copy_string(serial, length, g->serial);
    LAB_DEVICE_END
}

static void lab_fill_pci(const lab_gpu *g, nvmlPciInfo_t *pci)
{
    unsigned domain = 0, bus = 0, dev = 0, fn = 0;
    memset(pci, 0, sizeof(*pci));
    if (sscanf(g->pci_bus_id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn) != 4)
        domain = bus = dev = fn = 0;
    pci->domain = domain;
    pci->bus = bus;
    pci->device = dev;
    pci->pciDeviceId = g->pci_device_id;
    pci->pciSubSystemId = g->pci_subsystem_id;
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%04X:%02X:%02X.%X", domain & 0xFFFFu,
             bus & 0xFFu, dev & 0xFFu, fn & 0xFu);
    snprintf(pci->busId, sizeof(pci->busId), "%s", g->pci_bus_id);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    LAB_DEVICE_BEGIN(device, 0)
    if (!pci)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        lab_fill_pci(g, pci);
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    LAB_DEVICE_BEGIN(device, F_MEMORY)
    if (!memory) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        memory->total = g->memory_total;
        memory->free = g->memory_free;
        memory->used = g->memory_used;
    }
    LAB_DEVICE_END
}

/* v2 reports reserved memory separately; `used` then excludes it. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    LAB_DEVICE_BEGIN(device, F_MEMORY)
    if (!memory) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (memory->version != NVML_MEMORY_V2_VERSION) {
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    } else {
        memory->total = g->memory_total;
        memory->reserved = g->memory_reserved;
        memory->free = g->memory_free;
        memory->used = g->memory_used > g->memory_reserved ? g->memory_used - g->memory_reserved : 0;
    }
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, int *mode)
{
    LAB_DEVICE_BEGIN(device, F_PERSISTENCE)
    if (!mode)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *mode = g->persistence_mode ? 1 : 0;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                             unsigned int *pendingMode)
{
    LAB_DEVICE_BEGIN(device, F_MIG)
    if (!currentMode || !pendingMode) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        *currentMode = g->mig_current;
        *pendingMode = g->mig_pending;
    }
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t device, int *current, int *pending)
{
    LAB_DEVICE_BEGIN(device, F_ECC)
    if (!current || !pending) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        *current = g->ecc_current ? 1 : 0;
        *pending = g->ecc_pending ? 1 : 0;
    }
    LAB_DEVICE_END
}

/* Counters exist only while ECC is enabled: with ECC off NVML answers NOT_SUPPORTED. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int errorType,
                                                    unsigned int counterType,
                                                    unsigned long long *eccCounts)
{
    LAB_DEVICE_BEGIN(device, F_ECC)
    if (!eccCounts || errorType > NVML_MEMORY_ERROR_TYPE_UNCORRECTED ||
        counterType > NVML_AGGREGATE_ECC) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (!g->ecc_current) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else if (counterType == NVML_VOLATILE_ECC) {
        *eccCounts = errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED ? g->ecc_volatile_corrected
                                                                   : g->ecc_volatile_uncorrected;
    } else {
        *eccCounts = errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED ? g->ecc_aggregate_corrected
                                                                   : g->ecc_aggregate_uncorrected;
    }
    LAB_DEVICE_END
}

/* Synthetic, stable page addresses: the state keeps counts, not addresses. */
static unsigned long long lab_page_address(unsigned cause, unsigned i)
{
    return 0x100000ull * (cause + 1u) + 0x1000ull * i;
}

static nvmlReturn_t lab_retired_pages(nvmlDevice_t device, unsigned int cause, unsigned int *pageCount,
                                      unsigned long long *addresses, unsigned long long *timestamps)
{
    LAB_DEVICE_BEGIN(device, F_RETIRED_PAGES)
    unsigned have, i;
    if (lab_uses_row_remapping(g)) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else if (!pageCount || cause > NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        have = cause == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR ? g->retired_pages_dbe
                                                                        : g->retired_pages_sbe;
        if (*pageCount < have) {
            ret = NVML_ERROR_INSUFFICIENT_SIZE;
        } else if (have > 0 && !addresses) {
            ret = NVML_ERROR_INVALID_ARGUMENT;
        } else {
            for (i = 0; i < have; i++) {
                addresses[i] = lab_page_address(cause, i);
                if (timestamps)
                    timestamps[i] = 1700000000ull + i;
            }
        }
        *pageCount = have;
    }
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t device, unsigned int cause,
                                                  unsigned int *pageCount, unsigned long long *addresses)
{
    return lab_retired_pages(device, cause, pageCount, addresses, NULL);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetRetiredPages_v2(nvmlDevice_t device, unsigned int cause,
                                                     unsigned int *pageCount,
                                                     unsigned long long *addresses,
                                                     unsigned long long *timestamps)
{
    return lab_retired_pages(device, cause, pageCount, addresses, timestamps);
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, int *isPending)
{
    LAB_DEVICE_BEGIN(device, F_RETIRED_PAGES)
    if (lab_uses_row_remapping(g))
        ret = NVML_ERROR_NOT_SUPPORTED;
    else if (!isPending)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *isPending = g->retired_pages_pending ? 1 : 0;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows,
                                                  unsigned int *uncRows, unsigned int *isPending,
                                                  unsigned int *failureOccurred)
{
    LAB_DEVICE_BEGIN(device, F_REMAPPED_ROWS)
    if (!lab_uses_row_remapping(g)) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else if (!corrRows || !uncRows || !isPending || !failureOccurred) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        *corrRows = g->remapped_rows_correctable;
        *uncRows = g->remapped_rows_uncorrectable;
        *isPending = g->remapped_rows_pending ? 1 : 0;
        *failureOccurred = g->remapped_rows_failure ? 1 : 0;
    }
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensorType,
                                                 unsigned int *temp)
{
    LAB_DEVICE_BEGIN(device, F_TEMPERATURE)
    if (!temp || sensorType != NVML_TEMPERATURE_GPU)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *temp = g->temperature;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    LAB_DEVICE_BEGIN(device, F_POWER)
    if (!power)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *power = g->power_usage_mw;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    LAB_DEVICE_BEGIN(device, F_MINOR)
    if (!minorNumber)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *minorNumber = g->minor_number;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, unsigned int *arch)
{
    LAB_DEVICE_BEGIN(device, 0)
    if (!arch)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *arch = g->arch;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    LAB_DEVICE_BEGIN(device, F_CUDA_CC)
    if (!major || !minor) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        *major = (int)g->cuda_cc_major;
        *minor = (int)g->cuda_cc_minor;
    }
    LAB_DEVICE_END
}

/* ---- events --------------------------------------------------------------------------- */

static unsigned long long lab_supported_events(const lab_gpu *g)
{
    unsigned long long types = nvmlEventTypePState | nvmlEventTypeXidCriticalError | nvmlEventTypeClock;
    if (!(g->unsupported & F_ECC))
        types |= nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError;
    return types;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    LAB_DEVICE_BEGIN(device, F_EVENTS)
    if (!eventTypes)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *eventTypes = lab_supported_events(g);
    LAB_DEVICE_END
}

/* An event set belongs to the node that was current when it was created. */
LAB_EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        struct lab_event_set *es;
        if (!set) {
            ret = NVML_ERROR_INVALID_ARGUMENT;
        } else if (!(es = calloc(1, sizeof(*es)))) {
            ret = NVML_ERROR_MEMORY;
        } else {
            es->magic = LAB_EVENTSET_MAGIC;
            es->node = n;
            *set = es;
        }
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                                 nvmlEventSet_t set)
{
    LAB_DEVICE_BEGIN(device, F_EVENTS)
    if (!set || set->magic != LAB_EVENTSET_MAGIC || set->node != device->node)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else if (eventTypes & ~lab_supported_events(g))
        ret = NVML_ERROR_NOT_SUPPORTED;
    else
        set->mask[device->index] |= eventTypes;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    nvmlReturn_t ret = NVML_SUCCESS;
    pthread_mutex_lock(&lab_lock);
    if (!set || set->magic != LAB_EVENTSET_MAGIC) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        set->magic = 0;
        free(set);
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

/* The oldest queued XID event this set has not delivered, for a GPU registered for XIDs.
 * Caller holds lab_lock. Returns 1 and advances the set's cursor when one is found. */
static int lab_next_xid(struct lab_event_set *set, nvmlEventData_t *data)
{
    const lab_state *st = set->node->state;
    const lab_xid *best = NULL;
    size_t i;
    if (!st)
        return 0;
    for (i = 0; i < st->xid_count; i++) {
        const lab_xid *ev = &st->xids[i];
        if (ev->gpu >= LAB_MAX_GPUS || ev->gpu >= st->gpu_count)
            continue;
        if (!(set->mask[ev->gpu] & nvmlEventTypeXidCriticalError) || ev->seq <= set->cursor[ev->gpu])
            continue;
        if (!best || ev->seq < best->seq)
            best = ev;
    }
    if (!best)
        return 0;
    set->cursor[best->gpu] = best->seq;
    data->device = &set->node->devices[best->gpu];
    data->eventType = nvmlEventTypeXidCriticalError;
    data->eventData = best->xid;
    data->gpuInstanceId = NVML_INVALID_INSTANCE_ID;
    data->computeInstanceId = NVML_INVALID_INSTANCE_ID;
    return 1;
}

static unsigned long long lab_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000ull + (unsigned long long)ts.tv_nsec / 1000000ull;
}

/* Polls the node's state file every LAB_POLL_MS until an event arrives or timeoutms passes.
 * The lock is not held while sleeping, so other threads keep working. */
LAB_EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    unsigned long long deadline = lab_now_ms() + timeoutms;
    for (;;) {
        nvmlReturn_t ret = NVML_ERROR_TIMEOUT;
        unsigned long long now, wait_ms;
        struct timespec pause;

        pthread_mutex_lock(&lab_lock);
        if (!set || set->magic != LAB_EVENTSET_MAGIC || !data) {
            ret = NVML_ERROR_INVALID_ARGUMENT;
        } else if (set->node->init_count <= 0) {
            ret = NVML_ERROR_UNINITIALIZED;
        } else {
            lab_refresh(set->node, 0);
            if (lab_next_xid(set, data))
                ret = NVML_SUCCESS;
        }
        pthread_mutex_unlock(&lab_lock);
        if (ret != NVML_ERROR_TIMEOUT)
            return ret;
        now = lab_now_ms();
        if (now >= deadline)
            return NVML_ERROR_TIMEOUT;
        wait_ms = deadline - now < LAB_POLL_MS ? deadline - now : LAB_POLL_MS;
        pause.tv_sec = 0;
        pause.tv_nsec = (long)(wait_ms * 1000000ull);
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR)
            ;
    }
}

LAB_EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_v1_t *data, unsigned int timeoutms)
{
    nvmlEventData_t full;
    nvmlReturn_t ret;
    if (!data)
        return NVML_ERROR_INVALID_ARGUMENT;
    ret = nvmlEventSetWait_v2(set, &full, timeoutms);
    if (ret == NVML_SUCCESS) {
        data->device = full.device;
        data->eventType = full.eventType;
        data->eventData = full.eventData;
    }
    return ret;
}
