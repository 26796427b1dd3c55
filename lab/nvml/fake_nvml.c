/*
 * The lab's stand-in for libnvidia-ml.so.1.
 *
 * Unmodified pynvml loads this library through the loader path and sees a simulated node
 * whose GPUs, counters and faults come from a plain-text state file (format: README.md next
 * to this file; lab/nvml_state.py is its only writer). The state file is looked up on every
 * call and re-parsed when its identity (device, inode, size, mtime, ctime) changes, so faults
 * written while a process runs are seen by that process's next call.
 *
 * Each nvmlInit also reads the process's container view from its environment
 * (GPUNODE_LAB_NVML_INIT_ERROR, NVIDIA_VISIBLE_DEVICES), and the state may give GPUs MIG devices:
 * enough of NVML's MIG API for NVIDIA's device plugin and pynvml (README.md: "MIG").
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

#define NVML_DEVICE_MIG_DISABLE 0u
#define NVML_DEVICE_MIG_ENABLE 1u
#define NVML_GPU_INSTANCE_PROFILE_COUNT 17u    /* NVML_GPU_INSTANCE_PROFILE_1_SLICE .. 2_SLICE_ALL_ME */
#define NVML_COMPUTE_INSTANCE_PROFILE_COUNT 8u /* NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE .. 1_SLICE_REV1 */
#define NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT 1u
#define NVML_DEVICE_NAME_V2_BUFFER_SIZE 96

/* ---- public structs (layouts as nvml.h; pynvml's ctypes Structures match) ---------------- */

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

struct lab_gpu_instance;
typedef struct lab_gpu_instance *nvmlGpuInstance_t;
struct lab_compute_instance;
typedef struct lab_compute_instance *nvmlComputeInstance_t;

typedef struct {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

typedef struct {
    unsigned int id;
    unsigned int isP2pSupported;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int copyEngineCount;
    unsigned int decoderCount;
    unsigned int encoderCount;
    unsigned int jpegCount;
    unsigned int ofaCount;
    unsigned long long memorySizeMB;
} nvmlGpuInstanceProfileInfo_t;

typedef struct {
    unsigned int version;
    unsigned int id;
    unsigned int isP2pSupported;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int copyEngineCount;
    unsigned int decoderCount;
    unsigned int encoderCount;
    unsigned int jpegCount;
    unsigned int ofaCount;
    unsigned long long memorySizeMB;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
} nvmlGpuInstanceProfileInfo_v2_t;

typedef struct {
    unsigned int version;
    unsigned int id;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int copyEngineCount;
    unsigned int decoderCount;
    unsigned int encoderCount;
    unsigned int jpegCount;
    unsigned int ofaCount;
    unsigned long long memorySizeMB;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    unsigned int capabilities;
} nvmlGpuInstanceProfileInfo_v3_t;

typedef struct {
    unsigned int id;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
} nvmlComputeInstanceProfileInfo_t;

typedef struct {
    unsigned int version;
    unsigned int id;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
} nvmlComputeInstanceProfileInfo_v2_t;

typedef struct {
    unsigned int version;
    unsigned int id;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    unsigned int capabilities;
} nvmlComputeInstanceProfileInfo_v3_t;

/* NVML_STRUCT_VERSION(data, ver) = sizeof(struct) | (ver << 24) */
#define LAB_STRUCT_VERSION(type, ver) ((unsigned int)(sizeof(type) | ((unsigned)(ver) << 24)))

typedef struct {
    unsigned int start;
    unsigned int size;
} nvmlGpuInstancePlacement_t;

typedef struct {
    nvmlDevice_t device;
    unsigned int id;
    unsigned int profileId;
    nvmlGpuInstancePlacement_t placement;
} nvmlGpuInstanceInfo_t;

typedef struct {
    unsigned int start;
    unsigned int size;
} nvmlComputeInstancePlacement_t;

typedef struct {
    nvmlDevice_t device;
    nvmlGpuInstance_t gpuInstance;
    unsigned int id;
    unsigned int profileId;
    nvmlComputeInstancePlacement_t placement;
} nvmlComputeInstanceInfo_t;

/* ---- simulated state ---------------------------------------------------------------- */

#define LAB_MAX_GPUS 64
#define LAB_MAX_STATE_BYTES (16u * 1024u * 1024u)
#define LAB_ENV_STATE "GPUNODE_LAB_NVML_STATE"
#define LAB_ENV_DEBUG "GPUNODE_LAB_NVML_DEBUG"
#define LAB_ENV_INIT_ERROR "GPUNODE_LAB_NVML_INIT_ERROR"
#define LAB_ENV_VISIBLE "NVIDIA_VISIBLE_DEVICES"
#define LAB_MAX_MIG 7 /* MIG devices per GPU: nvmlDeviceGetMaxMigDeviceCount of an A100/H100 */
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

/* A GPU instance profile as nvmlDeviceGetGpuInstanceProfileInfo reports it (gpu.N.mig_profile.K). */
typedef struct {
    int present;
    char name[32]; /* "1g.10gb" */
    unsigned id;   /* NVML profile id, e.g. 19 for 1g.10gb (not the profile index) */
    unsigned slices, instances, sm, ce, dec, enc, jpeg, ofa;
    unsigned long long memory_mb;
    unsigned placement_size; /* memory slices a placement spans */
} lab_mig_profile;

/* A MIG device: a GPU instance with one compute instance over all its slices (gpu.N.mig.M.*). */
typedef struct {
    int seen;
    char profile[32];
    char uuid[96];
    unsigned gi, ci, placement;
    int have_gi;
    unsigned long long memory_used; /* bytes */
    unsigned profile_index;         /* resolved from profile: index into mig_profiles */
} lab_mig;

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
    unsigned power_limit_mw; /* 0: not reported (NOT_SUPPORTED) */
    lab_mig_profile mig_profiles[NVML_GPU_INSTANCE_PROFILE_COUNT]; /* by NVML profile index */
    lab_mig migs[LAB_MAX_MIG]; /* MIG devices (one compute instance spanning its GPU instance) */
    unsigned mig_count;
} lab_gpu;

typedef struct {
    unsigned long long seq;
    unsigned gpu;
    unsigned long long xid;
    unsigned gi; /* NVML_INVALID_INSTANCE_ID unless the event names a MIG device */
    unsigned ci;
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
#define LAB_GI_MAGIC 0x6c616267u /* "labg" */
#define LAB_CI_MAGIC 0x6c616263u /* "labc" */

/* A GPU handle (is_mig 0, one per host GPU index, in the node) or a MIG device handle (is_mig 1,
 * allocated on first use per (GPU, GPU instance, compute instance), kept for the process). */
struct lab_device {
    unsigned magic;
    unsigned index; /* host GPU index (the state file's) */
    struct lab_node *node;
    int is_mig;
    unsigned gi, ci;
    struct lab_device *next_mig;
};

struct lab_gpu_instance {
    unsigned magic;
    struct lab_node *node;
    unsigned gpu, gi;
    struct lab_gpu_instance *next;
};

struct lab_compute_instance {
    unsigned magic;
    struct lab_node *node;
    unsigned gpu, gi, ci;
    struct lab_compute_instance *next;
};

/* What NVIDIA_VISIBLE_DEVICES leaves of a node's GPUs, as NVML inside the container sees them. */
typedef struct {
    unsigned count;                    /* visible GPUs */
    unsigned host[LAB_MAX_GPUS];       /* container index -> host index, host (PCI) order */
    int index_of[LAB_MAX_GPUS];        /* host index -> container index, -1 when hidden */
    unsigned mig_mask[LAB_MAX_GPUS];   /* bit m: MIG device m (state order) visible */
} lab_view;

/* One simulated node = one state file path. Never freed: device handles point into it. */
typedef struct lab_node {
    struct lab_node *next;
    char *path;
    int init_count;
    lab_state *state; /* last good parse, NULL before the first */
    unsigned long state_gen; /* bumped whenever state is replaced */
    int have_key;
    dev_t key_dev;
    ino_t key_ino;
    off_t key_size;
    struct timespec key_mtime;
    struct timespec key_ctime;
    struct lab_device devices[LAB_MAX_GPUS];
    struct lab_device *mig_devices;          /* MIG device handles handed out */
    struct lab_gpu_instance *gpu_instances;  /* GPU instance handles handed out */
    struct lab_compute_instance *compute_instances;
    lab_view view;               /* valid while view_state_gen == state_gen && view_gen == lab_view_gen */
    unsigned long view_state_gen;
    unsigned long view_gen;
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

/* The process's container view, read from the environment at each nvmlInit (lab_read_env). */
static int lab_env_init_error;   /* GPUNODE_LAB_NVML_INIT_ERROR; 0 = none */
static char *lab_visible_spec;   /* NVIDIA_VISIBLE_DEVICES; NULL = unset or "all" */
static unsigned long lab_view_gen = 1;

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
    LAB_F(power_limit_mw, FT_U32),
#undef LAB_F
};

/* gpu.N.mig_profile.<profile index>=<name> <id> <slices> <instances> <sm> <ce> <dec> <enc> <jpeg>
 * <ofa> <memory MiB> <placement size> */
static int parse_mig_profile_line(lab_gpu *gpu, const char *key, const char *value)
{
    char *end;
    unsigned long idx;
    lab_mig_profile p;
    char extra;
    errno = 0;
    idx = strtoul(key, &end, 10);
    if (end == key || *end != '\0' || errno != 0 || idx >= NVML_GPU_INSTANCE_PROFILE_COUNT)
        return -1;
    memset(&p, 0, sizeof(p));
    if (sscanf(value, "%31s %u %u %u %u %u %u %u %u %u %llu %u %c", p.name, &p.id, &p.slices,
               &p.instances, &p.sm, &p.ce, &p.dec, &p.enc, &p.jpeg, &p.ofa, &p.memory_mb,
               &p.placement_size, &extra) != 12)
        return -1;
    if (p.slices == 0 || p.placement_size == 0)
        return -1;
    p.present = 1;
    gpu->mig_profiles[idx] = p;
    return 0;
}

/* gpu.N.mig.<M>.<field>=<value>: profile, uuid, gi, ci, placement, memory_used */
static int parse_mig_line(lab_gpu *gpu, const char *key, const char *value)
{
    char *end;
    unsigned long idx;
    lab_mig *m;
    errno = 0;
    idx = strtoul(key, &end, 10);
    if (end == key || *end != '.' || errno != 0 || idx >= LAB_MAX_MIG)
        return -1;
    key = end + 1;
    m = &gpu->migs[idx];
    m->seen = 1;
    if (strcmp(key, "profile") == 0)
        return copy_str(m->profile, sizeof(m->profile), value);
    if (strcmp(key, "uuid") == 0)
        return copy_str(m->uuid, sizeof(m->uuid), value);
    if (strcmp(key, "gi") == 0) {
        m->have_gi = 1;
        return parse_u32(value, &m->gi);
    }
    if (strcmp(key, "ci") == 0)
        return parse_u32(value, &m->ci);
    if (strcmp(key, "placement") == 0)
        return parse_u32(value, &m->placement);
    if (strcmp(key, "memory_used") == 0)
        return parse_u64(value, &m->memory_used);
    return 0; /* unknown MIG field: informational */
}

/* After the whole file: MIG devices 0..k-1 complete, profiles known, GPU instance ids unique. */
static int check_migs(lab_gpu *gpu)
{
    unsigned m, k, count = 0;
    while (count < LAB_MAX_MIG && gpu->migs[count].seen)
        count++;
    for (m = count; m < LAB_MAX_MIG; m++) {
        if (gpu->migs[m].seen)
            return -1; /* a gap in the MIG device indexes */
    }
    for (m = 0; m < count; m++) {
        lab_mig *mig = &gpu->migs[m];
        int found = 0;
        if (mig->uuid[0] == '\0' || !mig->have_gi)
            return -1;
        for (k = 0; k < NVML_GPU_INSTANCE_PROFILE_COUNT; k++) {
            if (gpu->mig_profiles[k].present && strcmp(gpu->mig_profiles[k].name, mig->profile) == 0) {
                mig->profile_index = k;
                found = 1;
                break;
            }
        }
        if (!found)
            return -1;
        for (k = 0; k < m; k++) {
            if (gpu->migs[k].gi == mig->gi) /* one compute instance per GPU instance */
                return -1;
        }
    }
    gpu->mig_count = count;
    return 0;
}

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
    if (strncmp(key, "mig_profile.", 12) == 0)
        return parse_mig_profile_line(gpu, key + 12, value);
    if (strncmp(key, "mig.", 4) == 0)
        return parse_mig_line(gpu, key + 4, value);
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

/* xid=<seq> <gpu> <xid> [<gpu instance id> <compute instance id>] */
static int parse_xid_line(lab_state *st, const char *value)
{
    lab_xid ev;
    char extra;
    int n = sscanf(value, "%llu %u %llu %u %u %c", &ev.seq, &ev.gpu, &ev.xid, &ev.gi, &ev.ci, &extra);
    if (n == 3)
        ev.gi = ev.ci = NVML_INVALID_INSTANCE_ID;
    else if (n != 5)
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
        if (check_migs(&st->gpus[i]) != 0) {
            lab_debug("%s: %s", path, "a GPU's MIG devices are incomplete, duplicated or of an unknown profile");
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
    n->state_gen++;
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

/* ---- the container view (NVIDIA_VISIBLE_DEVICES) -------------------------------------- */

/* Reads the process's environment; called by every nvmlInit under lab_lock. */
static void lab_read_env(void)
{
    const char *err = getenv(LAB_ENV_INIT_ERROR);
    const char *vis = getenv(LAB_ENV_VISIBLE);
    char *spec = NULL;
    int code = 0;

    if (err && *err && parse_int(err, &code) != 0) {
        lab_debug("%s=%s is not an integer: ignored", LAB_ENV_INIT_ERROR, err);
        code = 0;
    }
    lab_env_init_error = code;
    if (vis && strcmp(vis, "all") != 0) {
        spec = strdup(vis);
        if (!spec)
            return; /* out of memory: keep the previous view */
    }
    if ((spec == NULL) != (lab_visible_spec == NULL) ||
        (spec && strcmp(spec, lab_visible_spec) != 0)) {
        free(lab_visible_spec);
        lab_visible_spec = spec;
        lab_view_gen++;
    } else {
        free(spec);
    }
}

/* Does the GPU have MIG devices right now (MIG supported and enabled)? */
static int lab_mig_on(const lab_gpu *g)
{
    return !(g->unsupported & F_MIG) && g->mig_current == NVML_DEVICE_MIG_ENABLE;
}

static int lab_all_digits(const char *p, size_t len)
{
    size_t i;
    if (len == 0)
        return 0;
    for (i = 0; i < len; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
    }
    return 1;
}

/* One NVIDIA_VISIBLE_DEVICES entry: a host GPU index, GPU-<uuid>, MIG-<uuid>,
 * MIG-GPU-<uuid>/<gi>/<ci> or <gpu index>:<MIG index>. Unknown entries are ignored. */
static void lab_view_entry(const lab_state *st, const char *tok, size_t len, int *whole, unsigned *mig)
{
    char buf[160];
    unsigned i, m;
    if (len == 0 || len >= sizeof(buf))
        return;
    memcpy(buf, tok, len);
    buf[len] = '\0';
    if (lab_all_digits(buf, len)) {
        unsigned long idx = strtoul(buf, NULL, 10);
        if (idx < st->gpu_count)
            whole[idx] = 1;
        return;
    }
    if (strncmp(buf, "GPU-", 4) == 0) {
        for (i = 0; i < st->gpu_count; i++) {
            if (strcasecmp(st->gpus[i].uuid, buf) == 0)
                whole[i] = 1;
        }
        return;
    }
    if (strncmp(buf, "MIG-GPU-", 8) == 0) { /* the pre-R470 MIG device name */
        char *slash = strchr(buf, '/');
        unsigned gi, ci;
        char extra;
        if (!slash || sscanf(slash, "/%u/%u%c", &gi, &ci, &extra) != 2)
            return;
        *slash = '\0';
        for (i = 0; i < st->gpu_count; i++) {
            if (strcasecmp(st->gpus[i].uuid, buf + 4) != 0)
                continue;
            for (m = 0; m < st->gpus[i].mig_count; m++) {
                if (st->gpus[i].migs[m].gi == gi && st->gpus[i].migs[m].ci == ci)
                    mig[i] |= 1u << m;
            }
        }
        return;
    }
    if (strncmp(buf, "MIG-", 4) == 0) {
        for (i = 0; i < st->gpu_count; i++) {
            for (m = 0; m < st->gpus[i].mig_count; m++) {
                if (strcasecmp(st->gpus[i].migs[m].uuid, buf) == 0)
                    mig[i] |= 1u << m;
            }
        }
        return;
    }
    {
        char *colon = strchr(buf, ':');
        if (colon && lab_all_digits(buf, (size_t)(colon - buf)) && lab_all_digits(colon + 1, strlen(colon + 1))) {
            unsigned long gpu = strtoul(buf, NULL, 10), idx = strtoul(colon + 1, NULL, 10);
            if (gpu < st->gpu_count && idx < st->gpus[gpu].mig_count)
                mig[gpu] |= 1u << idx;
        }
    }
}

/* The node's GPUs as this process sees them. Caller holds lab_lock; n->state is set. */
static const lab_view *lab_view_of(lab_node *n)
{
    const lab_state *st = n->state;
    lab_view *v = &n->view;
    int whole[LAB_MAX_GPUS];
    unsigned mig[LAB_MAX_GPUS];
    unsigned i;

    if (n->view_state_gen == n->state_gen && n->view_gen == lab_view_gen)
        return v;
    memset(whole, 0, sizeof(whole));
    memset(mig, 0, sizeof(mig));
    if (!lab_visible_spec) {
        for (i = 0; i < st->gpu_count; i++)
            whole[i] = 1;
    } else if (strcmp(lab_visible_spec, "none") != 0 && strcmp(lab_visible_spec, "void") != 0) {
        const char *p = lab_visible_spec;
        for (;;) {
            const char *comma = strchr(p, ',');
            const char *end = comma ? comma : p + strlen(p);
            const char *b = p;
            while (b < end && (*b == ' ' || *b == '\t'))
                b++;
            while (end > b && (end[-1] == ' ' || end[-1] == '\t'))
                end--;
            lab_view_entry(st, b, (size_t)(end - b), whole, mig);
            if (!comma)
                break;
            p = comma + 1;
        }
    }
    v->count = 0;
    for (i = 0; i < LAB_MAX_GPUS; i++) {
        v->index_of[i] = -1;
        v->mig_mask[i] = 0;
    }
    for (i = 0; i < st->gpu_count; i++) {
        if (!whole[i] && !mig[i])
            continue;
        v->index_of[i] = (int)v->count;
        v->host[v->count++] = i;
        v->mig_mask[i] = whole[i] ? (1u << LAB_MAX_MIG) - 1u : mig[i];
    }
    n->view_state_gen = n->state_gen;
    n->view_gen = lab_view_gen;
    return v;
}

static int lab_visible(lab_node *n, unsigned host)
{
    return host < LAB_MAX_GPUS && lab_view_of(n)->index_of[host] >= 0;
}

/* State index of the visible MIG device (gi, ci) on host GPU `host`, or -1. */
static int lab_find_mig(lab_node *n, unsigned host, unsigned gi, unsigned ci)
{
    const lab_gpu *g = &n->state->gpus[host];
    unsigned m, mask = lab_view_of(n)->mig_mask[host];
    if (!lab_mig_on(g))
        return -1;
    for (m = 0; m < g->mig_count; m++) {
        if ((mask & (1u << m)) && g->migs[m].gi == gi && g->migs[m].ci == ci)
            return (int)m;
    }
    return -1;
}

/* State index of the index-th visible MIG device of host GPU `host` (the container renumbers
 * them from 0 in state order), or -1. */
static int lab_mig_by_index(lab_node *n, unsigned host, unsigned index)
{
    const lab_gpu *g = &n->state->gpus[host];
    unsigned m, seen = 0, mask = lab_view_of(n)->mig_mask[host];
    if (!lab_mig_on(g))
        return -1;
    for (m = 0; m < g->mig_count; m++) {
        if (!(mask & (1u << m)))
            continue;
        if (seen++ == index)
            return (int)m;
    }
    return -1;
}

/* The (stable) MIG device handle for (host GPU, gi, ci) of node n; NULL when out of memory. */
static struct lab_device *lab_mig_handle(lab_node *n, unsigned host, unsigned gi, unsigned ci)
{
    struct lab_device *d;
    for (d = n->mig_devices; d; d = d->next_mig) {
        if (d->index == host && d->gi == gi && d->ci == ci)
            return d;
    }
    d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->magic = LAB_DEVICE_MAGIC;
    d->index = host;
    d->node = n;
    d->is_mig = 1;
    d->gi = gi;
    d->ci = ci;
    d->next_mig = n->mig_devices;
    n->mig_devices = d;
    return d;
}

static struct lab_gpu_instance *lab_gi_handle(lab_node *n, unsigned host, unsigned gi)
{
    struct lab_gpu_instance *h;
    for (h = n->gpu_instances; h; h = h->next) {
        if (h->gpu == host && h->gi == gi)
            return h;
    }
    h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->magic = LAB_GI_MAGIC;
    h->node = n;
    h->gpu = host;
    h->gi = gi;
    h->next = n->gpu_instances;
    n->gpu_instances = h;
    return h;
}

static struct lab_compute_instance *lab_ci_handle(lab_node *n, unsigned host, unsigned gi, unsigned ci)
{
    struct lab_compute_instance *h;
    for (h = n->compute_instances; h; h = h->next) {
        if (h->gpu == host && h->gi == gi && h->ci == ci)
            return h;
    }
    h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    h->magic = LAB_CI_MAGIC;
    h->node = n;
    h->gpu = host;
    h->gi = gi;
    h->ci = ci;
    h->next = n->compute_instances;
    n->compute_instances = h;
    return h;
}

/* Initialized, refreshed node `n` with host GPU `host` present, visible and not lost. */
static nvmlReturn_t lab_host_gpu(lab_node *n, unsigned host, const lab_gpu **out)
{
    if (n->init_count <= 0)
        return NVML_ERROR_UNINITIALIZED;
    lab_refresh(n, 0);
    if (!n->state)
        return NVML_ERROR_UNINITIALIZED;
    /* a GPU that is gone from the state (fell off the bus) or from the container's view answers
     * like a lost one */
    if (host >= n->state->gpu_count || !lab_visible(n, host) || n->state->gpus[host].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *out = &n->state->gpus[host];
    return NVML_SUCCESS;
}

/* The GPU behind a handle, on the handle's own node, and for a MIG device handle its MIG device
 * (else *mig_out = NULL). Caller holds lab_lock. */
static nvmlReturn_t lab_resolve(nvmlDevice_t device, const lab_gpu **out, const lab_mig **mig_out)
{
    nvmlReturn_t ret;
    *mig_out = NULL;
    if (!device || device->magic != LAB_DEVICE_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    ret = lab_host_gpu(device->node, device->index, out);
    if (ret != NVML_SUCCESS || !device->is_mig)
        return ret;
    {
        int m = lab_find_mig(device->node, device->index, device->gi, device->ci);
        if (m < 0)
            return NVML_ERROR_INVALID_ARGUMENT; /* its compute instance is gone */
        *mig_out = &(*out)->migs[m];
    }
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
    lab_read_env();
    n = lab_current_node();
    if (lab_env_init_error != 0) {
        /* the container's driver injection is broken: whatever the state file says */
        ret = lab_env_init_error;
    } else if (!n) {
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

/* The library's own version: like real NVML this works before nvmlInit (nvidia-smi prints it
 * when init fails with a driver/library mismatch), as long as the node's state was readable. */
LAB_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    lab_node *n;
    nvmlReturn_t ret = NVML_ERROR_UNINITIALIZED;
    pthread_mutex_lock(&lab_lock);
    n = lab_current_node();
    if (n) {
        lab_refresh(n, 0);
        if (n->state)
            ret = lab_copy_string(version, length, n->state->nvml_version);
    }
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

/* Counts only the GPUs of the container view; a lost GPU is still counted. */
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
            *deviceCount = lab_view_of(n)->count;
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

/* index: the container's (0..count-1, host order). */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        const lab_view *v = lab_view_of(n);
        if (!device || index >= v->count)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else if (n->state->gpus[v->host[index]].lost)
            ret = NVML_ERROR_GPU_IS_LOST;
        else
            *device = &n->devices[v->host[index]];
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

/* A GPU UUID gives the GPU's handle, a MIG-<uuid> the MIG device's; only visible ones are found. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    lab_node *n;
    nvmlReturn_t ret;
    unsigned i, m;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        const lab_state *st = n->state;
        ret = (!uuid || !device) ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_NOT_FOUND;
        for (i = 0; ret == NVML_ERROR_NOT_FOUND && i < st->gpu_count; i++) {
            const lab_gpu *g = &st->gpus[i];
            if (!lab_visible(n, i))
                continue;
            if (strcmp(g->uuid, uuid) == 0) {
                if (g->lost) {
                    ret = NVML_ERROR_GPU_IS_LOST;
                } else {
                    *device = &n->devices[i];
                    ret = NVML_SUCCESS;
                }
                break;
            }
            for (m = 0; m < g->mig_count; m++) {
                if (strcmp(g->migs[m].uuid, uuid) != 0 || lab_find_mig(n, i, g->migs[m].gi, g->migs[m].ci) < 0)
                    continue;
                if (g->lost) {
                    ret = NVML_ERROR_GPU_IS_LOST;
                } else {
                    struct lab_device *d = lab_mig_handle(n, i, g->migs[m].gi, g->migs[m].ci);
                    ret = d ? NVML_SUCCESS : NVML_ERROR_MEMORY;
                    if (d)
                        *device = d;
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
            if (lab_visible(n, i) && lab_same_bus_id(pciBusId, n->state->gpus[i].pci_bus_id)) {
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

/* Lab extension (not NVML): the PCI bus id of the GPU at container index `index`, also when that
 * GPU is lost -- what real nvidia-smi learns through the driver to name a GPU it has no handle
 * for ("Unable to determine the device handle for GPU<bus id>: GPU is lost..."). */
LAB_EXPORT int gpunodeLabGetPciBusIdByIndex(unsigned int index, char *busId, unsigned int length)
{
    lab_node *n;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_system(&n);
    if (ret == NVML_SUCCESS) {
        const lab_view *v = lab_view_of(n);
        if (index >= v->count)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else
            ret = lab_copy_string(busId, length, n->state->gpus[v->host[index]].pci_bus_id);
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

/* ---- per-device queries --------------------------------------------------------------- */

/* Opens a per-device query: lock, resolve the handle, check the feature; `g` (the GPU, for a MIG
 * device handle its parent) and `mig` (the MIG device, or NULL) are valid until LAB_DEVICE_END.
 * Every per-device call answers GPU_IS_LOST for a lost GPU. LAB_DEVICE_BEGIN answers
 * NOT_SUPPORTED for a MIG device handle; LAB_ANY_DEVICE_BEGIN lets the query handle it. */
#define LAB_DEVICE_OPEN(device, feature, allow_mig)                                            \
    const lab_gpu *g = NULL;                                                               \
    const lab_mig *mig = NULL;                                                             \
    nvmlReturn_t ret;                                                                      \
    pthread_mutex_lock(&lab_lock);                                                         \
    ret = lab_resolve((device), &g, &mig);                                                 \
    if (ret == NVML_SUCCESS && mig && !(allow_mig))                                        \
        ret = NVML_ERROR_NOT_SUPPORTED;                                                    \
    if (ret == NVML_SUCCESS && (g->unsupported & (feature)))                              \
        ret = NVML_ERROR_NOT_SUPPORTED;                                                    \
    if (ret == NVML_SUCCESS) {
#define LAB_DEVICE_BEGIN(device, feature) LAB_DEVICE_OPEN(device, feature, 0) (void)mig;
#define LAB_ANY_DEVICE_BEGIN(device, feature) LAB_DEVICE_OPEN(device, feature, 1)
#define LAB_DEVICE_END                                                                         \
    }                                                                                      \
    pthread_mutex_unlock(&lab_lock);                                                       \
    return ret;

/* The container's index (0..count-1), not the host's. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    LAB_DEVICE_BEGIN(device, 0)
    if (!index)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *index = (unsigned)lab_view_of(device->node)->index_of[device->index];
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    LAB_ANY_DEVICE_BEGIN(device, 0)
    ret = lab_copy_string(uuid, length, mig ? mig->uuid : g->uuid);
    LAB_DEVICE_END
}

/* A MIG device is named after its parent and profile: "NVIDIA A100-SXM4-80GB MIG 1g.10gb". */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    LAB_ANY_DEVICE_BEGIN(device, 0)
    if (mig) {
        char full[sizeof(g->name) + sizeof(mig->profile) + 8];
        snprintf(full, sizeof(full), "%s MIG %s", g->name, mig->profile);
        ret = lab_copy_string(name, length, full);
    } else {
        ret = lab_copy_string(name, length, g->name);
    }
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

/* A MIG device's own memory: its profile's size, gpu.N.mig.M.memory_used of it in use. */
static void lab_mig_memory(const lab_gpu *g, const lab_mig *mig, unsigned long long *total,
                           unsigned long long *used, unsigned long long *free_bytes)
{
    *total = g->mig_profiles[mig->profile_index].memory_mb * 1024ull * 1024ull;
    *used = mig->memory_used < *total ? mig->memory_used : *total;
    *free_bytes = *total - *used;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    LAB_ANY_DEVICE_BEGIN(device, F_MEMORY)
    if (!memory) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (mig) {
        lab_mig_memory(g, mig, &memory->total, &memory->used, &memory->free);
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
    LAB_ANY_DEVICE_BEGIN(device, F_MEMORY)
    if (!memory) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (memory->version != NVML_MEMORY_V2_VERSION) {
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    } else if (mig) {
        memory->reserved = 0;
        lab_mig_memory(g, mig, &memory->total, &memory->used, &memory->free);
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

/* gpu.N.power_limit_mw; NOT_SUPPORTED when the state has none (0). */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    LAB_DEVICE_BEGIN(device, F_POWER)
    if (!limit)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else if (g->power_limit_mw == 0)
        ret = NVML_ERROR_NOT_SUPPORTED;
    else
        *limit = g->power_limit_mw;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    return nvmlDeviceGetEnforcedPowerLimit(device, limit);
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
    LAB_ANY_DEVICE_BEGIN(device, 0)
    if (!arch)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *arch = g->arch;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    LAB_ANY_DEVICE_BEGIN(device, F_CUDA_CC)
    if (!major || !minor) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else {
        *major = (int)g->cuda_cc_major;
        *minor = (int)g->cuda_cc_minor;
    }
    LAB_DEVICE_END
}

/* ---- topology (what NVIDIA's go-gpuallocator asks for GetPreferredAllocation) ---------- */

#define NVML_TOPOLOGY_MULTIPLE 20u
#define NVML_TOPOLOGY_NODE 40u
#define NVML_TOPOLOGY_SYSTEM 50u

/* A DGX-like layout by host index: GPU pairs (0-1, 2-3, ...) behind one PCIe switch tree,
 * each half of eight on one CPU socket. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2,
                                                            unsigned int *pathInfo)
{
    const lab_gpu *g1 = NULL, *g2 = NULL;
    const lab_mig *m1 = NULL, *m2 = NULL;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = lab_resolve(device1, &g1, &m1);
    if (ret == NVML_SUCCESS)
        ret = lab_resolve(device2, &g2, &m2);
    if (ret == NVML_SUCCESS && (m1 || m2))
        ret = NVML_ERROR_NOT_SUPPORTED;
    else if (ret == NVML_SUCCESS && (!pathInfo || device1->node != device2->node || device1 == device2))
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else if (ret == NVML_SUCCESS)
        *pathInfo = device1->index / 2 == device2->index / 2   ? NVML_TOPOLOGY_MULTIPLE
                    : device1->index / 4 == device2->index / 4 ? NVML_TOPOLOGY_NODE
                                                               : NVML_TOPOLOGY_SYSTEM;
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

/* NVLinks are not modelled: every link answers NOT_SUPPORTED (NVIDIA's allocator skips them). */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, unsigned int *isActive)
{
    LAB_DEVICE_BEGIN(device, 0)
    (void)link;
    ret = isActive ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci)
{
    LAB_DEVICE_BEGIN(device, 0)
    (void)link;
    ret = pci ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
    LAB_DEVICE_END
}

/* ---- MIG ------------------------------------------------------------------------------ */

/* Compute slices of each NVML_COMPUTE_INSTANCE_PROFILE_* index. */
static const unsigned lab_ci_slices[NVML_COMPUTE_INSTANCE_PROFILE_COUNT] = {1, 2, 3, 4, 7, 8, 6, 1};

/* The compute instance profile index of a compute instance spanning `slices` slices. */
static unsigned lab_ci_profile_for(unsigned slices)
{
    unsigned j;
    for (j = 0; j < 7; j++) { /* not 1_SLICE_REV1 */
        if (lab_ci_slices[j] == slices)
            return j;
    }
    return 0;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    LAB_ANY_DEVICE_BEGIN(device, 0)
    if (!isMigDevice)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *isMigDevice = mig ? 1u : 0u;
    LAB_DEVICE_END
}

/* 7 while MIG is enabled, 0 when it is disabled or not supported (as nvml.h says). */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    LAB_DEVICE_BEGIN(device, 0)
    if (!count)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *count = lab_mig_on(g) ? LAB_MAX_MIG : 0u;
    LAB_DEVICE_END
}

/* index: among the MIG devices this process sees, in state order (GPU instance id order). */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                            nvmlDevice_t *migDevice)
{
    LAB_DEVICE_BEGIN(device, F_MIG)
    int m;
    if (!migDevice || index >= LAB_MAX_MIG) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (!lab_mig_on(g)) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else if ((m = lab_mig_by_index(device->node, device->index, index)) < 0) {
        ret = NVML_ERROR_NOT_FOUND;
    } else {
        struct lab_device *d = lab_mig_handle(device->node, device->index, g->migs[m].gi, g->migs[m].ci);
        if (!d)
            ret = NVML_ERROR_MEMORY;
        else
            *migDevice = d;
    }
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device)
{
    LAB_ANY_DEVICE_BEGIN(migDevice, 0)
    if (!device || !mig)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *device = &migDevice->node->devices[migDevice->index];
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    LAB_ANY_DEVICE_BEGIN(device, 0)
    if (!id || !mig)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *id = mig->gi;
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    LAB_ANY_DEVICE_BEGIN(device, 0)
    if (!id || !mig)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        *id = mig->ci;
    LAB_DEVICE_END
}

/* MIG device handles only (as nvml.h says); a GPU handle answers NOT_SUPPORTED. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes)
{
    LAB_ANY_DEVICE_BEGIN(device, 0)
    if (!attributes) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (!mig) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else {
        const lab_mig_profile *p = &g->mig_profiles[mig->profile_index];
        attributes->multiprocessorCount = p->sm;
        attributes->sharedCopyEngineCount = p->ce;
        attributes->sharedDecoderCount = p->dec;
        attributes->sharedEncoderCount = p->enc;
        attributes->sharedJpegCount = p->jpeg;
        attributes->sharedOfaCount = p->ofa;
        attributes->gpuInstanceSliceCount = p->slices;
        attributes->computeInstanceSliceCount = p->slices;
        attributes->memorySizeMB = p->memory_mb;
    }
    LAB_DEVICE_END
}

/* The GPU instance profile at NVML profile index `profile`; NOT_SUPPORTED while MIG is disabled
 * or for a profile this GPU lacks, INVALID_ARGUMENT past the last profile index. */
static nvmlReturn_t lab_gi_profile(const lab_gpu *g, unsigned profile, const lab_mig_profile **out)
{
    if (profile >= NVML_GPU_INSTANCE_PROFILE_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!lab_mig_on(g) || !g->mig_profiles[profile].present)
        return NVML_ERROR_NOT_SUPPORTED;
    *out = &g->mig_profiles[profile];
    return NVML_SUCCESS;
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfo(nvmlDevice_t device, unsigned int profile,
                                                            nvmlGpuInstanceProfileInfo_t *info)
{
    LAB_DEVICE_BEGIN(device, F_MIG)
    const lab_mig_profile *p = NULL;
    if (!info)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        ret = lab_gi_profile(g, profile, &p);
    if (ret == NVML_SUCCESS) {
        memset(info, 0, sizeof(*info));
        info->id = p->id;
        info->isP2pSupported = 0;
        info->sliceCount = p->slices;
        info->instanceCount = p->instances;
        info->multiprocessorCount = p->sm;
        info->copyEngineCount = p->ce;
        info->decoderCount = p->dec;
        info->encoderCount = p->enc;
        info->jpegCount = p->jpeg;
        info->ofaCount = p->ofa;
        info->memorySizeMB = p->memory_mb;
    }
    LAB_DEVICE_END
}

/* Versioned form: nvmlGpuInstanceProfileInfo_v2 or _v3 (what pynvml calls by default). */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfoV(nvmlDevice_t device, unsigned int profile, void *info)
{
    LAB_DEVICE_BEGIN(device, F_MIG)
    const lab_mig_profile *p = NULL;
    unsigned version = info ? *(const unsigned *)info : 0;
    if (!info)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else if (version != LAB_STRUCT_VERSION(nvmlGpuInstanceProfileInfo_v2_t, 2) &&
             version != LAB_STRUCT_VERSION(nvmlGpuInstanceProfileInfo_v3_t, 3))
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    else
        ret = lab_gi_profile(g, profile, &p);
    if (ret == NVML_SUCCESS && version == LAB_STRUCT_VERSION(nvmlGpuInstanceProfileInfo_v2_t, 2)) {
        nvmlGpuInstanceProfileInfo_v2_t *v2 = info;
        memset(v2, 0, sizeof(*v2));
        v2->version = version;
        v2->id = p->id;
        v2->sliceCount = p->slices;
        v2->instanceCount = p->instances;
        v2->multiprocessorCount = p->sm;
        v2->copyEngineCount = p->ce;
        v2->decoderCount = p->dec;
        v2->encoderCount = p->enc;
        v2->jpegCount = p->jpeg;
        v2->ofaCount = p->ofa;
        v2->memorySizeMB = p->memory_mb;
        snprintf(v2->name, sizeof(v2->name), "MIG %s", p->name);
    } else if (ret == NVML_SUCCESS) {
        nvmlGpuInstanceProfileInfo_v3_t *v3 = info;
        memset(v3, 0, sizeof(*v3));
        v3->version = version;
        v3->id = p->id;
        v3->sliceCount = p->slices;
        v3->instanceCount = p->instances;
        v3->multiprocessorCount = p->sm;
        v3->copyEngineCount = p->ce;
        v3->decoderCount = p->dec;
        v3->encoderCount = p->enc;
        v3->jpegCount = p->jpeg;
        v3->ofaCount = p->ofa;
        v3->memorySizeMB = p->memory_mb;
        snprintf(v3->name, sizeof(v3->name), "MIG %s", p->name);
    }
    LAB_DEVICE_END
}

LAB_EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceById(nvmlDevice_t device, unsigned int id,
                                                     nvmlGpuInstance_t *gpuInstance)
{
    LAB_DEVICE_BEGIN(device, F_MIG)
    unsigned m;
    if (!gpuInstance) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (!lab_mig_on(g)) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else {
        ret = NVML_ERROR_NOT_FOUND;
        for (m = 0; m < g->mig_count; m++) {
            if (g->migs[m].gi == id && lab_find_mig(device->node, device->index, id, g->migs[m].ci) >= 0) {
                struct lab_gpu_instance *h = lab_gi_handle(device->node, device->index, id);
                ret = h ? NVML_SUCCESS : NVML_ERROR_MEMORY;
                if (h)
                    *gpuInstance = h;
                break;
            }
        }
    }
    LAB_DEVICE_END
}

/* The GPU instances of NVML profile id `profileId` (e.g. 19), in GPU instance id order. */
LAB_EXPORT nvmlReturn_t nvmlDeviceGetGpuInstances(nvmlDevice_t device, unsigned int profileId,
                                                  nvmlGpuInstance_t *gpuInstances, unsigned int *count)
{
    LAB_DEVICE_BEGIN(device, F_MIG)
    unsigned m, found = 0;
    if (!count) {
        ret = NVML_ERROR_INVALID_ARGUMENT;
    } else if (!lab_mig_on(g)) {
        ret = NVML_ERROR_NOT_SUPPORTED;
    } else {
        for (m = 0; m < g->mig_count && ret == NVML_SUCCESS; m++) {
            const lab_mig *x = &g->migs[m];
            if (g->mig_profiles[x->profile_index].id != profileId ||
                lab_find_mig(device->node, device->index, x->gi, x->ci) < 0)
                continue;
            if (gpuInstances) {
                struct lab_gpu_instance *h = lab_gi_handle(device->node, device->index, x->gi);
                if (!h)
                    ret = NVML_ERROR_MEMORY;
                else
                    gpuInstances[found] = h;
            }
            found++;
        }
        *count = found;
    }
    LAB_DEVICE_END
}

/* The GPU and MIG device behind a GPU instance handle. Caller holds lab_lock. */
static nvmlReturn_t lab_gi_resolve(nvmlGpuInstance_t gi, const lab_gpu **g, const lab_mig **mig)
{
    nvmlReturn_t ret;
    unsigned m;
    if (!gi || gi->magic != LAB_GI_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    ret = lab_host_gpu(gi->node, gi->gpu, g);
    if (ret != NVML_SUCCESS)
        return ret;
    for (m = 0; m < (*g)->mig_count; m++) {
        if ((*g)->migs[m].gi == gi->gi && lab_find_mig(gi->node, gi->gpu, gi->gi, (*g)->migs[m].ci) >= 0) {
            *mig = &(*g)->migs[m];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_INVALID_ARGUMENT; /* destroyed */
}

LAB_EXPORT nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t gpuInstance, nvmlGpuInstanceInfo_t *info)
{
    const lab_gpu *g = NULL;
    const lab_mig *mig = NULL;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = info ? lab_gi_resolve(gpuInstance, &g, &mig) : NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        const lab_mig_profile *p = &g->mig_profiles[mig->profile_index];
        memset(info, 0, sizeof(*info));
        info->device = &gpuInstance->node->devices[gpuInstance->gpu];
        info->id = mig->gi;
        info->profileId = p->id;
        info->placement.start = mig->placement;
        info->placement.size = p->placement_size;
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

/* Compute instance profiles of a GPU instance with `g_slices` slices: 1, 2, 3, 4 or 7 slices,
 * no more than the GPU instance has and, below that, at most about half of it (what A100/H100
 * offer: 1c/2c/3c/4c/7c on 7g, 1c/2c/4c on 4g, 1c/2c/3c on 3g, 1c/2c on 2g, 1c on 1g). */
static nvmlReturn_t lab_ci_profile(const lab_mig_profile *gp, unsigned profile, unsigned engProfile,
                                   nvmlComputeInstanceProfileInfo_t *out, char *name, size_t name_size)
{
    unsigned c, gs = gp->slices;
    if (profile >= NVML_COMPUTE_INSTANCE_PROFILE_COUNT || engProfile >= NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    c = lab_ci_slices[profile];
    if (profile > 4 || c > gs || (c < gs && c * 2 > gs + 1))
        return NVML_ERROR_NOT_SUPPORTED;
    memset(out, 0, sizeof(*out));
    out->id = profile;
    out->sliceCount = c;
    out->instanceCount = gs / c;
    out->multiprocessorCount = c == gs ? gp->sm : c * (gp->sm / gs);
    out->sharedCopyEngineCount = gp->ce;
    out->sharedDecoderCount = gp->dec;
    out->sharedEncoderCount = gp->enc;
    out->sharedJpegCount = gp->jpeg;
    out->sharedOfaCount = gp->ofa;
    if (c == gs)
        snprintf(name, name_size, "MIG %s", gp->name);
    else
        snprintf(name, name_size, "MIG %uc.%s", c, gp->name);
    return NVML_SUCCESS;
}

LAB_EXPORT nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfo(nvmlGpuInstance_t gpuInstance, unsigned int profile,
                                                                     unsigned int engProfile,
                                                                     nvmlComputeInstanceProfileInfo_t *info)
{
    const lab_gpu *g = NULL;
    const lab_mig *mig = NULL;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = info ? lab_gi_resolve(gpuInstance, &g, &mig) : NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS)
        ret = lab_ci_profile(&g->mig_profiles[mig->profile_index], profile, engProfile, info, name, sizeof(name));
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfoV(nvmlGpuInstance_t gpuInstance, unsigned int profile,
                                                                      unsigned int engProfile, void *info)
{
    const lab_gpu *g = NULL;
    const lab_mig *mig = NULL;
    nvmlComputeInstanceProfileInfo_t v1;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
    unsigned version = info ? *(const unsigned *)info : 0;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    if (!info)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else if (version != LAB_STRUCT_VERSION(nvmlComputeInstanceProfileInfo_v2_t, 2) &&
             version != LAB_STRUCT_VERSION(nvmlComputeInstanceProfileInfo_v3_t, 3))
        ret = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    else
        ret = lab_gi_resolve(gpuInstance, &g, &mig);
    if (ret == NVML_SUCCESS)
        ret = lab_ci_profile(&g->mig_profiles[mig->profile_index], profile, engProfile, &v1, name, sizeof(name));
    if (ret == NVML_SUCCESS) {
        /* v2 and v3 share their first fields; v3 adds capabilities (0) at the end */
        nvmlComputeInstanceProfileInfo_v3_t out;
        memset(&out, 0, sizeof(out));
        out.version = version;
        out.id = v1.id;
        out.sliceCount = v1.sliceCount;
        out.instanceCount = v1.instanceCount;
        out.multiprocessorCount = v1.multiprocessorCount;
        out.sharedCopyEngineCount = v1.sharedCopyEngineCount;
        out.sharedDecoderCount = v1.sharedDecoderCount;
        out.sharedEncoderCount = v1.sharedEncoderCount;
        out.sharedJpegCount = v1.sharedJpegCount;
        out.sharedOfaCount = v1.sharedOfaCount;
        memcpy(out.name, name, sizeof(out.name));
        memcpy(info, &out, version == LAB_STRUCT_VERSION(nvmlComputeInstanceProfileInfo_v3_t, 3)
                               ? sizeof(nvmlComputeInstanceProfileInfo_v3_t)
                               : sizeof(nvmlComputeInstanceProfileInfo_v2_t));
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlGpuInstanceGetComputeInstanceById(nvmlGpuInstance_t gpuInstance, unsigned int id,
                                                              nvmlComputeInstance_t *computeInstance)
{
    const lab_gpu *g = NULL;
    const lab_mig *mig = NULL;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = computeInstance ? lab_gi_resolve(gpuInstance, &g, &mig) : NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        if (mig->ci != id) {
            ret = NVML_ERROR_NOT_FOUND;
        } else {
            struct lab_compute_instance *h = lab_ci_handle(gpuInstance->node, gpuInstance->gpu, mig->gi, mig->ci);
            ret = h ? NVML_SUCCESS : NVML_ERROR_MEMORY;
            if (h)
                *computeInstance = h;
        }
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

/* The compute instances of compute instance profile `profileId` in a GPU instance. */
LAB_EXPORT nvmlReturn_t nvmlGpuInstanceGetComputeInstances(nvmlGpuInstance_t gpuInstance, unsigned int profileId,
                                                           nvmlComputeInstance_t *computeInstances,
                                                           unsigned int *count)
{
    const lab_gpu *g = NULL;
    const lab_mig *mig = NULL;
    nvmlReturn_t ret;
    pthread_mutex_lock(&lab_lock);
    ret = count ? lab_gi_resolve(gpuInstance, &g, &mig) : NVML_ERROR_INVALID_ARGUMENT;
    if (ret == NVML_SUCCESS) {
        *count = 0;
        if (lab_ci_profile_for(g->mig_profiles[mig->profile_index].slices) == profileId) {
            if (computeInstances) {
                struct lab_compute_instance *h = lab_ci_handle(gpuInstance->node, gpuInstance->gpu, mig->gi, mig->ci);
                if (!h)
                    ret = NVML_ERROR_MEMORY;
                else
                    computeInstances[0] = h;
            }
            if (ret == NVML_SUCCESS)
                *count = 1;
        }
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
}

LAB_EXPORT nvmlReturn_t nvmlComputeInstanceGetInfo_v2(nvmlComputeInstance_t computeInstance,
                                                      nvmlComputeInstanceInfo_t *info)
{
    const lab_gpu *g = NULL;
    nvmlReturn_t ret;
    int m = -1;
    pthread_mutex_lock(&lab_lock);
    if (!info || !computeInstance || computeInstance->magic != LAB_CI_MAGIC)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    else
        ret = lab_host_gpu(computeInstance->node, computeInstance->gpu, &g);
    if (ret == NVML_SUCCESS &&
        (m = lab_find_mig(computeInstance->node, computeInstance->gpu, computeInstance->gi, computeInstance->ci)) < 0)
        ret = NVML_ERROR_INVALID_ARGUMENT; /* destroyed */
    if (ret == NVML_SUCCESS) {
        const lab_mig_profile *p = &g->mig_profiles[g->migs[m].profile_index];
        struct lab_gpu_instance *gi = lab_gi_handle(computeInstance->node, computeInstance->gpu, computeInstance->gi);
        if (!gi) {
            ret = NVML_ERROR_MEMORY;
        } else {
            memset(info, 0, sizeof(*info));
            info->device = &computeInstance->node->devices[computeInstance->gpu];
            info->gpuInstance = gi;
            info->id = computeInstance->ci;
            info->profileId = lab_ci_profile_for(p->slices);
            info->placement.start = 0;
            info->placement.size = p->slices;
        }
    }
    pthread_mutex_unlock(&lab_lock);
    return ret;
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
        if (ev->gpu >= LAB_MAX_GPUS || ev->gpu >= st->gpu_count || !lab_visible(set->node, ev->gpu))
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
    data->gpuInstanceId = best->gi;
    data->computeInstanceId = best->ci;
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
