/*
 * The lab's stand-in for nvidia-smi (a separate program, not part of libnvidia-ml.so.1).
 *
 * Like the real tool it dlopens "libnvidia-ml.so.1" (found through LD_LIBRARY_PATH / the loader
 * cache) and asks NVML only, so it shows whatever the lab NVML library shows to this process:
 * the node's state file and the process's container view (NVIDIA_VISIBLE_DEVICES).
 *
 *   nvidia-smi                      a short version of the real summary table
 *   nvidia-smi -L                   GPUs and their MIG devices with UUIDs
 *   nvidia-smi --query-gpu=F,... --format=csv[,noheader][,nounits]
 *
 * Messages and exit codes of the failure cases are the real tool's (lab/nvml/README.md says
 * which texts are approximations). Build: see the Makefile's lab-nvml rule.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_LIBRARY_NOT_FOUND 12
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_LIB_RM_VERSION_MISMATCH 18

/* nvidia-smi's documented return codes (man nvidia-smi, RETURN VALUE) */
#define SMI_OK 0
#define SMI_BAD_ARGUMENT 2
#define SMI_NOT_FOUND 6
#define SMI_DRIVER_NOT_LOADED 9
#define SMI_LIBRARY_NOT_FOUND 12
#define SMI_GPU_LOST 15
#define SMI_OTHER 255

#define MIB (1024ull * 1024ull)

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

#define NVML_MEMORY_V2_VERSION ((unsigned)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

/* The NVML entry points this tool uses, resolved with dlsym. */
static struct {
    nvmlReturn_t (*init)(void);
    nvmlReturn_t (*shutdown)(void);
    const char *(*error_string)(nvmlReturn_t);
    nvmlReturn_t (*driver_version)(char *, unsigned);
    nvmlReturn_t (*nvml_version)(char *, unsigned);
    nvmlReturn_t (*cuda_version)(int *);
    nvmlReturn_t (*count)(unsigned *);
    nvmlReturn_t (*by_index)(unsigned, nvmlDevice_t *);
    nvmlReturn_t (*name)(nvmlDevice_t, char *, unsigned);
    nvmlReturn_t (*uuid)(nvmlDevice_t, char *, unsigned);
    nvmlReturn_t (*serial)(nvmlDevice_t, char *, unsigned);
    nvmlReturn_t (*pci)(nvmlDevice_t, nvmlPciInfo_t *);
    nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t *);
    nvmlReturn_t (*memory_v2)(nvmlDevice_t, nvmlMemory_v2_t *);
    nvmlReturn_t (*persistence)(nvmlDevice_t, int *);
    nvmlReturn_t (*temperature)(nvmlDevice_t, unsigned, unsigned *);
    nvmlReturn_t (*power)(nvmlDevice_t, unsigned *);
    nvmlReturn_t (*power_limit)(nvmlDevice_t, unsigned *);
    nvmlReturn_t (*mig_mode)(nvmlDevice_t, unsigned *, unsigned *);
    nvmlReturn_t (*ecc_mode)(nvmlDevice_t, int *, int *);
    nvmlReturn_t (*ecc_errors)(nvmlDevice_t, unsigned, unsigned, unsigned long long *);
    nvmlReturn_t (*max_mig)(nvmlDevice_t, unsigned *);
    nvmlReturn_t (*mig_by_index)(nvmlDevice_t, unsigned, nvmlDevice_t *);
    nvmlReturn_t (*gi_id)(nvmlDevice_t, unsigned *);
    nvmlReturn_t (*ci_id)(nvmlDevice_t, unsigned *);
    nvmlReturn_t (*attributes)(nvmlDevice_t, nvmlDeviceAttributes_t *);
    int (*lab_bus_id)(unsigned, char *, unsigned); /* lab extension, see fake_nvml.c */
} N;

static void *sym(void *lib, const char *a, const char *b)
{
    void *p = dlsym(lib, a);
    return (p || !b) ? p : dlsym(lib, b);
}

#define LOAD(field, a, b) (*(void **)(&N.field) = sym(lib, a, b))

static void fail_library(void)
{
    printf("NVIDIA-SMI couldn't find libnvidia-ml.so library in your system. Please make sure that the "
           "NVIDIA Display Driver is properly installed and present in your system.\n"
           "Please also try adding directory that contains libnvidia-ml.so to your system PATH.\n");
    exit(SMI_LIBRARY_NOT_FOUND);
}

static void load(void)
{
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        fail_library();
    LOAD(init, "nvmlInit_v2", "nvmlInit");
    LOAD(shutdown, "nvmlShutdown", NULL);
    LOAD(error_string, "nvmlErrorString", NULL);
    LOAD(driver_version, "nvmlSystemGetDriverVersion", NULL);
    LOAD(nvml_version, "nvmlSystemGetNVMLVersion", NULL);
    LOAD(cuda_version, "nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion");
    LOAD(count, "nvmlDeviceGetCount_v2", "nvmlDeviceGetCount");
    LOAD(by_index, "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex");
    LOAD(name, "nvmlDeviceGetName", NULL);
    LOAD(uuid, "nvmlDeviceGetUUID", NULL);
    LOAD(serial, "nvmlDeviceGetSerial", NULL);
    LOAD(pci, "nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo");
    LOAD(memory, "nvmlDeviceGetMemoryInfo", NULL);
    LOAD(memory_v2, "nvmlDeviceGetMemoryInfo_v2", NULL);
    LOAD(persistence, "nvmlDeviceGetPersistenceMode", NULL);
    LOAD(temperature, "nvmlDeviceGetTemperature", NULL);
    LOAD(power, "nvmlDeviceGetPowerUsage", NULL);
    LOAD(power_limit, "nvmlDeviceGetEnforcedPowerLimit", NULL);
    LOAD(mig_mode, "nvmlDeviceGetMigMode", NULL);
    LOAD(ecc_mode, "nvmlDeviceGetEccMode", NULL);
    LOAD(ecc_errors, "nvmlDeviceGetTotalEccErrors", NULL);
    LOAD(max_mig, "nvmlDeviceGetMaxMigDeviceCount", NULL);
    LOAD(mig_by_index, "nvmlDeviceGetMigDeviceHandleByIndex", NULL);
    LOAD(gi_id, "nvmlDeviceGetGpuInstanceId", NULL);
    LOAD(ci_id, "nvmlDeviceGetComputeInstanceId", NULL);
    LOAD(attributes, "nvmlDeviceGetAttributes_v2", NULL);
    LOAD(lab_bus_id, "gpunodeLabGetPciBusIdByIndex", NULL);
    if (!N.init || !N.shutdown || !N.error_string || !N.count || !N.by_index || !N.name || !N.uuid)
        fail_library(); /* not an NVML library */
}

static int exit_code_for(nvmlReturn_t ret)
{
    return (ret > 0 && ret < 255) ? ret : SMI_OTHER;
}

/* "550.54.15" -> "550.54": what the real tool prints as the NVML library version. */
static void major_minor(const char *version, char *out, size_t size)
{
    const char *dot = strchr(version, '.');
    const char *second = dot ? strchr(dot + 1, '.') : NULL;
    size_t len = second ? (size_t)(second - version) : strlen(version);
    if (len >= size)
        len = size - 1;
    memcpy(out, version, len);
    out[len] = '\0';
}

static void init_or_exit(void)
{
    nvmlReturn_t ret = N.init();
    char version[96], shown[96];
    if (ret == NVML_SUCCESS)
        return;
    switch (ret) {
    case NVML_ERROR_DRIVER_NOT_LOADED:
        printf("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
               "Make sure that the latest NVIDIA driver is installed and running.\n\n");
        exit(SMI_DRIVER_NOT_LOADED);
    case NVML_ERROR_LIBRARY_NOT_FOUND:
        fail_library();
        break;
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        printf("Failed to initialize NVML: Driver/library version mismatch\n");
        /* the library's version: nvml_version is "<CUDA major>.<driver version>" */
        if (N.nvml_version && N.nvml_version(version, sizeof(version)) == NVML_SUCCESS) {
            const char *dot = strchr(version, '.');
            major_minor(dot ? dot + 1 : version, shown, sizeof(shown));
            printf("NVML library version: %s\n", shown);
        }
        exit(ret);
    default:
        printf("Failed to initialize NVML: %s\n", N.error_string(ret));
        exit(exit_code_for(ret));
    }
}

/* "00000000:07:00.0" -> "0000:07:00.0", as the real tool names a GPU it has no handle for. */
static void short_bus_id(const char *bus_id, char *out, size_t size)
{
    unsigned domain, bus, dev, fn;
    if (sscanf(bus_id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn) == 4)
        snprintf(out, size, "%04X:%02X:%02X.%X", domain & 0xFFFFu, bus & 0xFFu, dev & 0xFFu, fn & 0xFu);
    else
        snprintf(out, size, "%s", bus_id);
}

/* The handle of GPU i, or NULL after printing the real tool's message; *worst keeps the exit code. */
static nvmlDevice_t handle_or_report(unsigned i, int *worst)
{
    nvmlDevice_t dev = NULL;
    nvmlReturn_t ret = N.by_index(i, &dev);
    char bus[64] = "", shown[64];
    if (ret == NVML_SUCCESS)
        return dev;
    if (!N.lab_bus_id || N.lab_bus_id(i, bus, sizeof(bus)) != NVML_SUCCESS)
        snprintf(bus, sizeof(bus), "%u", i);
    short_bus_id(bus, shown, sizeof(shown));
    if (ret == NVML_ERROR_GPU_IS_LOST)
        fprintf(stderr, "Unable to determine the device handle for GPU%s: GPU is lost.  Reboot the system to "
                        "recover this GPU\n", shown);
    else
        fprintf(stderr, "Unable to determine the device handle for GPU%s: %s\n", shown, N.error_string(ret));
    *worst = exit_code_for(ret);
    return NULL;
}

static unsigned count_or_exit(void)
{
    unsigned count = 0;
    nvmlReturn_t ret = N.count(&count);
    if (ret != NVML_SUCCESS) {
        printf("Unable to determine the number of GPUs: %s\n", N.error_string(ret));
        exit(exit_code_for(ret));
    }
    if (count == 0) {
        printf("No devices were found\n");
        exit(SMI_NOT_FOUND);
    }
    return count;
}

static int mig_enabled(nvmlDevice_t dev)
{
    unsigned current = 0, pending = 0;
    return N.mig_mode && N.mig_mode(dev, &current, &pending) == NVML_SUCCESS && current == 1;
}

/* "NVIDIA A100-SXM4-80GB MIG 1g.10gb" -> "1g.10gb" */
static const char *mig_profile_of(const char *name)
{
    const char *p = strstr(name, "MIG ");
    const char *last = p;
    while (p) {
        last = p;
        p = strstr(p + 4, "MIG ");
    }
    return last ? last + 4 : name;
}

/* ---- -L -------------------------------------------------------------------------------- */

static int list_gpus(void)
{
    unsigned i, j, count = count_or_exit();
    int worst = SMI_OK;
    for (i = 0; i < count; i++) {
        char name[96] = "", uuid[96] = "";
        nvmlDevice_t dev = handle_or_report(i, &worst);
        if (!dev)
            continue;
        N.name(dev, name, sizeof(name));
        N.uuid(dev, uuid, sizeof(uuid));
        printf("GPU %u: %s (UUID: %s)\n", i, name, uuid);
        if (mig_enabled(dev) && N.max_mig && N.mig_by_index) {
            unsigned max = 0, shown = 0;
            N.max_mig(dev, &max);
            for (j = 0; j < max; j++) {
                nvmlDevice_t mig = NULL;
                char mname[128] = "", muuid[96] = "";
                if (N.mig_by_index(dev, j, &mig) != NVML_SUCCESS)
                    continue;
                N.name(mig, mname, sizeof(mname));
                N.uuid(mig, muuid, sizeof(muuid));
                printf("  MIG %-11s Device %2u: (UUID: %s)\n", mig_profile_of(mname), shown++, muuid);
            }
        }
    }
    return worst;
}

/* ---- --query-gpu ------------------------------------------------------------------------ */

enum field_kind { F_INDEX, F_UUID, F_NAME, F_DRIVER, F_MEM_TOTAL, F_MEM_USED, F_MEM_FREE, F_BUS_ID, F_SERIAL,
                  F_PERSISTENCE, F_MIG_CURRENT, F_MIG_PENDING, F_TEMPERATURE, F_POWER_DRAW, F_POWER_LIMIT,
                  F_COUNT };

static const struct {
    const char *name;
    enum field_kind kind;
    const char *unit; /* shown in the header as "name [unit]" and after values, unless nounits */
} fields[] = {
    {"index", F_INDEX, NULL},
    {"uuid", F_UUID, NULL},
    {"gpu_uuid", F_UUID, NULL},
    {"name", F_NAME, NULL},
    {"gpu_name", F_NAME, NULL},
    {"driver_version", F_DRIVER, NULL},
    {"memory.total", F_MEM_TOTAL, "MiB"},
    {"memory.used", F_MEM_USED, "MiB"},
    {"memory.free", F_MEM_FREE, "MiB"},
    {"pci.bus_id", F_BUS_ID, NULL},
    {"gpu_bus_id", F_BUS_ID, NULL},
    {"serial", F_SERIAL, NULL},
    {"persistence_mode", F_PERSISTENCE, NULL},
    {"mig.mode.current", F_MIG_CURRENT, NULL},
    {"mig.mode.pending", F_MIG_PENDING, NULL},
    {"temperature.gpu", F_TEMPERATURE, NULL},
    {"power.draw", F_POWER_DRAW, "W"},
    {"power.limit", F_POWER_LIMIT, "W"},
    {"count", F_COUNT, NULL},
};

#define N_FIELDS (sizeof(fields) / sizeof(fields[0]))
#define MAX_QUERY 32

static void na_or_error(char *out, size_t size, nvmlReturn_t ret)
{
    if (ret == NVML_ERROR_NOT_SUPPORTED)
        snprintf(out, size, "[N/A]");
    else if (ret == NVML_ERROR_GPU_IS_LOST)
        snprintf(out, size, "[GPU is lost]");
    else
        snprintf(out, size, "[Unknown Error]");
}

static void memory_of(nvmlDevice_t dev, unsigned long long *total, unsigned long long *used,
                      unsigned long long *free_bytes, nvmlReturn_t *ret)
{
    nvmlMemory_v2_t m2;
    nvmlMemory_t m;
    memset(&m2, 0, sizeof(m2));
    m2.version = NVML_MEMORY_V2_VERSION;
    /* like the real tool: v2, whose "used" leaves out what the driver reserves */
    if (N.memory_v2 && (*ret = N.memory_v2(dev, &m2)) == NVML_SUCCESS) {
        *total = m2.total;
        *used = m2.used;
        *free_bytes = m2.free;
        return;
    }
    *ret = N.memory ? N.memory(dev, &m) : NVML_ERROR_NOT_SUPPORTED;
    if (*ret == NVML_SUCCESS) {
        *total = m.total;
        *used = m.used;
        *free_bytes = m.free;
    }
}

static void field_value(enum field_kind kind, unsigned index, unsigned count, nvmlDevice_t dev, int units,
                        char *out, size_t size)
{
    char buf[128];
    nvmlReturn_t ret = NVML_ERROR_NOT_SUPPORTED;
    unsigned long long total = 0, used = 0, free_bytes = 0;
    unsigned u = 0, pending = 0;
    int mode = 0;
    nvmlPciInfo_t pci;

    switch (kind) {
    case F_INDEX:
        snprintf(out, size, "%u", index);
        return;
    case F_COUNT:
        snprintf(out, size, "%u", count);
        return;
    case F_UUID:
        ret = N.uuid(dev, buf, sizeof(buf));
        break;
    case F_NAME:
        ret = N.name(dev, buf, sizeof(buf));
        break;
    case F_SERIAL:
        ret = N.serial ? N.serial(dev, buf, sizeof(buf)) : ret;
        break;
    case F_DRIVER:
        ret = N.driver_version ? N.driver_version(buf, sizeof(buf)) : ret;
        break;
    case F_BUS_ID:
        ret = N.pci ? N.pci(dev, &pci) : ret;
        if (ret == NVML_SUCCESS)
            snprintf(buf, sizeof(buf), "%s", pci.busId);
        break;
    case F_MEM_TOTAL:
    case F_MEM_USED:
    case F_MEM_FREE:
        memory_of(dev, &total, &used, &free_bytes, &ret);
        if (ret == NVML_SUCCESS)
            snprintf(buf, sizeof(buf), "%llu%s",
                     (kind == F_MEM_TOTAL ? total : kind == F_MEM_USED ? used : free_bytes) / MIB,
                     units ? " MiB" : "");
        break;
    case F_PERSISTENCE:
        ret = N.persistence ? N.persistence(dev, &mode) : ret;
        if (ret == NVML_SUCCESS)
            snprintf(buf, sizeof(buf), "%s", mode ? "Enabled" : "Disabled");
        break;
    case F_MIG_CURRENT:
    case F_MIG_PENDING:
        ret = N.mig_mode ? N.mig_mode(dev, &u, &pending) : ret;
        if (ret == NVML_SUCCESS)
            snprintf(buf, sizeof(buf), "%s", (kind == F_MIG_CURRENT ? u : pending) ? "Enabled" : "Disabled");
        break;
    case F_TEMPERATURE:
        ret = N.temperature ? N.temperature(dev, 0, &u) : ret;
        if (ret == NVML_SUCCESS)
            snprintf(buf, sizeof(buf), "%u", u);
        break;
    case F_POWER_DRAW:
    case F_POWER_LIMIT:
        if (kind == F_POWER_DRAW)
            ret = N.power ? N.power(dev, &u) : ret;
        else
            ret = N.power_limit ? N.power_limit(dev, &u) : ret;
        if (ret == NVML_SUCCESS)
            snprintf(buf, sizeof(buf), "%.2f%s", u / 1000.0, units ? " W" : "");
        break;
    }
    if (ret == NVML_SUCCESS)
        snprintf(out, size, "%s", buf);
    else
        na_or_error(out, size, ret);
}

static int query_gpu(const char *query, const char *format)
{
    enum field_kind kinds[MAX_QUERY];
    const char *names[MAX_QUERY];
    int header = 1, units = 1;
    unsigned nq = 0, i, k, count;
    int worst = SMI_OK;
    char *copy, *tok, *save = NULL;

    if (!format) {
        printf("Option --format is required for --query-gpu. Please run 'nvidia-smi -h' for help.\n");
        return SMI_BAD_ARGUMENT;
    }
    copy = strdup(format);
    if (!copy)
        return SMI_OTHER;
    for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (strcmp(tok, "noheader") == 0) {
            header = 0;
        } else if (strcmp(tok, "nounits") == 0) {
            units = 0;
        } else if (strcmp(tok, "csv") != 0) {
            printf("\"%s\" is not a valid format option. Please run 'nvidia-smi -h' for help.\n", tok);
            free(copy);
            return SMI_BAD_ARGUMENT;
        }
    }
    free(copy);

    copy = strdup(query);
    if (!copy)
        return SMI_OTHER;
    for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = 0;
        while (*tok == ' ')
            tok++;
        for (k = 0; k < N_FIELDS; k++) {
            if (strcmp(fields[k].name, tok) == 0 && nq < MAX_QUERY) {
                kinds[nq] = fields[k].kind;
                names[nq] = fields[k].name;
                nq++;
                found = 1;
                break;
            }
        }
        if (!found) {
            printf("Field \"%s\" is not a valid field to query.\n\n", tok);
            free(copy);
            return SMI_BAD_ARGUMENT;
        }
    }
    free(copy);
    if (nq == 0) {
        printf("Field \"\" is not a valid field to query.\n\n");
        return SMI_BAD_ARGUMENT;
    }

    init_or_exit();
    count = count_or_exit();
    if (header) {
        for (k = 0; k < nq; k++) {
            const char *unit = NULL;
            for (i = 0; i < N_FIELDS; i++) {
                if (fields[i].kind == kinds[k] && strcmp(fields[i].name, names[k]) == 0)
                    unit = fields[i].unit;
            }
            printf("%s%s", k ? ", " : "", names[k]);
            if (unit && units)
                printf(" [%s]", unit);
        }
        printf("\n");
    }
    for (i = 0; i < count; i++) {
        nvmlDevice_t dev = handle_or_report(i, &worst);
        if (!dev)
            continue;
        for (k = 0; k < nq; k++) {
            char value[160];
            field_value(kinds[k], i, count, dev, units, value, sizeof(value));
            printf("%s%s", k ? ", " : "", value);
        }
        printf("\n");
    }
    N.shutdown();
    return worst;
}

/* ---- the summary table ------------------------------------------------------------------ */

#define RULE_FULL "+-----------------------------------------------------------------------------------------+\n"
#define RULE_GPU "+-----------------------------------------+------------------------+----------------------+\n"
#define RULE_MIG "+------------------+----------------------------------+-----------+-----------------------+\n"

static void print_mig_rows(unsigned gpu, nvmlDevice_t dev, int *any)
{
    unsigned j, max = 0, shown = 0;
    if (!N.max_mig || !N.mig_by_index || N.max_mig(dev, &max) != NVML_SUCCESS)
        return;
    for (j = 0; j < max; j++) {
        nvmlDevice_t mig = NULL;
        nvmlDeviceAttributes_t a;
        unsigned gi = 0, ci = 0;
        unsigned long long total = 0, used = 0, free_bytes = 0;
        nvmlReturn_t ret;
        char used_s[32], total_s[32];
        if (N.mig_by_index(dev, j, &mig) != NVML_SUCCESS)
            continue;
        memset(&a, 0, sizeof(a));
        if (N.gi_id)
            N.gi_id(mig, &gi);
        if (N.ci_id)
            N.ci_id(mig, &ci);
        if (N.attributes)
            N.attributes(mig, &a);
        memory_of(mig, &total, &used, &free_bytes, &ret);
        snprintf(used_s, sizeof(used_s), "%lluMiB", used / MIB);
        snprintf(total_s, sizeof(total_s), "%lluMiB", total / MIB);
        printf("|%3u %4u %3u %3u  |%19s / %-12s|%3u%7s |%3u %3u %4u %4u %4u |\n", gpu, gi, ci, shown, used_s, total_s,
               a.multiprocessorCount, "0", a.sharedCopyEngineCount, a.sharedEncoderCount, a.sharedDecoderCount,
               a.sharedOfaCount, a.sharedJpegCount);
        printf("|                  |%21s / %-10s|           |                       |\n", "0MiB", "65535MiB");
        printf(RULE_MIG);
        shown++;
        *any = 1;
    }
}

static int summary(void)
{
    char driver[96] = "N/A", timebuf[64];
    int cuda = 0, worst = SMI_OK, any_mig = 0;
    unsigned i, count;
    nvmlDevice_t devs[64];
    time_t now = time(NULL);
    struct tm tm;

    init_or_exit();
    count = count_or_exit();
    if (count > 64)
        count = 64;
    for (i = 0; i < count; i++)
        devs[i] = handle_or_report(i, &worst);
    if (N.driver_version)
        N.driver_version(driver, sizeof(driver));
    if (N.cuda_version)
        N.cuda_version(&cuda);
    localtime_r(&now, &tm);
    strftime(timebuf, sizeof(timebuf), "%a %b %e %H:%M:%S %Y", &tm);
    printf("%s       \n", timebuf);
    printf(RULE_FULL);
    {
        char cuda_s[16];
        snprintf(cuda_s, sizeof(cuda_s), "%d.%d", cuda / 1000, (cuda % 1000) / 10);
        printf("| NVIDIA-SMI %-23sDriver Version: %-15sCUDA Version: %-9s|\n", driver, driver, cuda_s);
    }
    printf("|-----------------------------------------+------------------------+----------------------+\n");
    printf("| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n");
    printf("| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |\n");
    printf("|                                         |                        |               MIG M. |\n");
    printf("|=========================================+========================+======================|\n");
    for (i = 0; i < count; i++) {
        nvmlDevice_t dev = devs[i];
        char name[96] = "", persist[8] = "N/A", bus[40] = "", ecc[24] = "N/A", temp[16] = "N/A", pwr[16] = "N/A",
             cap[16] = "N/A", used_s[32] = "N/A", total_s[32] = "N/A", migm[16] = "N/A";
        unsigned u = 0, pending = 0;
        int mode = 0, ecc_cur = 0, ecc_pend = 0, mig_on;
        unsigned long long total = 0, used = 0, free_bytes = 0, unc = 0;
        nvmlReturn_t ret;
        nvmlPciInfo_t pci;
        if (!dev)
            continue;
        N.name(dev, name, sizeof(name));
        if (N.persistence && N.persistence(dev, &mode) == NVML_SUCCESS)
            snprintf(persist, sizeof(persist), "%s", mode ? "On" : "Off");
        if (N.pci && N.pci(dev, &pci) == NVML_SUCCESS)
            snprintf(bus, sizeof(bus), "%s", pci.busId);
        mig_on = mig_enabled(dev);
        if (N.mig_mode && N.mig_mode(dev, &u, &pending) == NVML_SUCCESS)
            snprintf(migm, sizeof(migm), "%s", u ? "Enabled" : "Disabled");
        any_mig |= mig_on;
        if (N.ecc_mode && N.ecc_mode(dev, &ecc_cur, &ecc_pend) == NVML_SUCCESS) {
            if (!ecc_cur)
                snprintf(ecc, sizeof(ecc), "Off");
            else if (mig_on)
                snprintf(ecc, sizeof(ecc), "On");
            else if (N.ecc_errors && N.ecc_errors(dev, 1, 0, &unc) == NVML_SUCCESS)
                snprintf(ecc, sizeof(ecc), "%llu", unc);
        }
        if (N.temperature && N.temperature(dev, 0, &u) == NVML_SUCCESS)
            snprintf(temp, sizeof(temp), "%uC", u);
        if (N.power && N.power(dev, &u) == NVML_SUCCESS)
            snprintf(pwr, sizeof(pwr), "%uW", (u + 500) / 1000);
        if (N.power_limit && N.power_limit(dev, &u) == NVML_SUCCESS)
            snprintf(cap, sizeof(cap), "%uW", u / 1000);
        memory_of(dev, &total, &used, &free_bytes, &ret);
        if (ret == NVML_SUCCESS) {
            snprintf(used_s, sizeof(used_s), "%lluMiB", used / MIB);
            snprintf(total_s, sizeof(total_s), "%lluMiB", total / MIB);
        }
        printf("|%4u  %-29.29s%4s  |   %-16s %3s |%21s |\n", i, name, persist, bus, "Off", ecc);
        printf("| N/A %5s %5s %15s / %5s |%11s / %9s |%8s %12s |\n", temp, "P0", pwr, cap, used_s, total_s,
               mig_on ? "N/A" : "0%", "Default");
        printf("|                                         |                        |%21s |\n", migm);
        printf(RULE_GPU);
    }
    if (any_mig) {
        int any = 0;
        printf("\n" RULE_FULL);
        printf("| MIG devices:                                                                            |\n");
        printf(RULE_MIG);
        printf("| GPU  GI  CI  MIG |                     Memory-Usage |        Vol|      Shared           |\n");
        printf("|      ID  ID  Dev |                       BAR1-Usage | SM     Unc| CE ENC DEC OFA JPG    |\n");
        printf("|                  |                                  |        ECC|                       |\n");
        printf("|==================+==================================+===========+=======================|\n");
        for (i = 0; i < count; i++) {
            if (devs[i] && mig_enabled(devs[i]))
                print_mig_rows(i, devs[i], &any);
        }
        if (!any) {
            printf("|  No MIG devices found                                                                   |\n");
            printf(RULE_FULL);
        }
    }
    printf("\n" RULE_FULL);
    printf("| Processes:                                                                              |\n");
    printf("|  GPU   GI   CI        PID   Type   Process name                              GPU Memory |\n");
    printf("|        ID   ID                                                               Usage      |\n");
    printf("|=========================================================================================|\n");
    printf("|  No running processes found                                                             |\n");
    printf(RULE_FULL);
    N.shutdown();
    return worst;
}

static void usage(void)
{
    printf("NVIDIA System Management Interface -- lab stand-in (gpunode.bringup lab/nvml)\n\n"
           "    nvidia-smi                 summary table\n"
           "    nvidia-smi -L              list GPUs and MIG devices\n"
           "    nvidia-smi --query-gpu=<fields> --format=csv[,noheader][,nounits]\n");
}

int main(int argc, char **argv)
{
    const char *query = NULL, *format = NULL;
    int list = 0, i;

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-L") == 0 || strcmp(a, "--list-gpus") == 0) {
            list = 1;
        } else if (strncmp(a, "--query-gpu=", 12) == 0) {
            query = a + 12;
        } else if (strcmp(a, "--query-gpu") == 0 && i + 1 < argc) {
            query = argv[++i];
        } else if (strncmp(a, "--format=", 9) == 0) {
            format = a + 9;
        } else if (strcmp(a, "--format") == 0 && i + 1 < argc) {
            format = argv[++i];
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage();
            return SMI_OK;
        } else {
            printf("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n\n");
            return SMI_BAD_ARGUMENT;
        }
    }
    if (list && query) {
        printf("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n\n");
        return SMI_BAD_ARGUMENT;
    }
    load();
    if (query)
        return query_gpu(query, format);
    if (list) {
        int rc;
        init_or_exit();
        rc = list_gpus();
        N.shutdown();
        return rc;
    }
    return summary();
}
