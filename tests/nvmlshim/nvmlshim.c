/*
 * A stand-in libnvidia-ml.so.1 for machines without an NVIDIA GPU: it exports the NVML
 * symbols nvidia-ml-py calls for diversityd (init, count, handles, name, UUID, memory,
 * compute processes, error strings) and answers from a small text file named by the
 * environment variable NVMLSHIM_CONFIG, read again at every nvmlInit, one directive a line:
 *
 *   device NAME total_mib=24576 used_mib=1024 [uuid=GPU-...]   (one line per GPU, in order;
 *                                                              '_' in NAME reads as a space)
 *   process DEVICE_INDEX pid=1234 used_mib=512                  (used_mib=na: not available)
 *   error CALL CODE                                             (make CALL return CODE)
 *   hang SECONDS                                                (the memory call blocks: a
 *                                                                GPU fallen off the bus)
 *
 * CALL is one of init, count, handle, name, uuid, memory, processes; CODE an NVML return
 * code such as 9 (NVML_ERROR_DRIVER_NOT_LOADED) or 15 (NVML_ERROR_GPU_IS_LOST). Without the
 * variable the shim reports no GPU. Lines starting with '#' are comments.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_VALUE_NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL

#define MAX_DEVICES 16
#define MAX_PROCESSES 64
#define MIB (1024ULL * 1024ULL)

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
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct shim_device {
    int index;
    char name[96];
    char uuid[96];
    unsigned long long total;
    unsigned long long used;
} shim_device;

typedef struct {
    int device;
    unsigned int pid;
    unsigned long long used;
} shim_process;

typedef struct shim_device *nvmlDevice_t;

static shim_device devices[MAX_DEVICES];
static int n_devices;
static shim_process processes[MAX_PROCESSES];
static int n_processes;
static int initialized;

enum { E_INIT, E_COUNT, E_HANDLE, E_NAME, E_UUID, E_MEMORY, E_PROCESSES, E_CALLS };
static const char *call_names[E_CALLS] = {
    "init", "count", "handle", "name", "uuid", "memory", "processes",
};
static nvmlReturn_t errors[E_CALLS];
static unsigned int hang_seconds;

static unsigned long long parse_mib(const char *text) {
    if (strcmp(text, "na") == 0) {
        return NVML_VALUE_NOT_AVAILABLE;
    }
    return strtoull(text, NULL, 10) * MIB;
}

static void parse_line(char *line) {
    char *save = NULL;
    char *word = strtok_r(line, " \t\r\n", &save);
    if (word == NULL || word[0] == '#') {
        return;
    }
    if (strcmp(word, "device") == 0 && n_devices < MAX_DEVICES) {
        shim_device *dev = &devices[n_devices];
        memset(dev, 0, sizeof(*dev));
        dev->index = n_devices;
        snprintf(dev->uuid, sizeof(dev->uuid), "GPU-5b1f0000-0000-4000-8000-%012d", n_devices);
        char *name = strtok_r(NULL, " \t\r\n", &save);
        snprintf(dev->name, sizeof(dev->name), "%s", name ? name : "NVIDIA Shim GPU");
        for (char *c = dev->name; *c; c++) {
            if (*c == '_') {
                *c = ' ';
            }
        }
        for (char *kv = strtok_r(NULL, " \t\r\n", &save); kv; kv = strtok_r(NULL, " \t\r\n", &save)) {
            if (strncmp(kv, "total_mib=", 10) == 0) {
                dev->total = parse_mib(kv + 10);
            } else if (strncmp(kv, "used_mib=", 9) == 0) {
                dev->used = parse_mib(kv + 9);
            } else if (strncmp(kv, "uuid=", 5) == 0) {
                snprintf(dev->uuid, sizeof(dev->uuid), "%s", kv + 5);
            }
        }
        n_devices++;
    } else if (strcmp(word, "process") == 0 && n_processes < MAX_PROCESSES) {
        shim_process *proc = &processes[n_processes];
        char *device = strtok_r(NULL, " \t\r\n", &save);
        proc->device = device ? atoi(device) : 0;
        proc->pid = 0;
        proc->used = 0;
        for (char *kv = strtok_r(NULL, " \t\r\n", &save); kv; kv = strtok_r(NULL, " \t\r\n", &save)) {
            if (strncmp(kv, "pid=", 4) == 0) {
                proc->pid = (unsigned int)strtoul(kv + 4, NULL, 10);
            } else if (strncmp(kv, "used_mib=", 9) == 0) {
                proc->used = parse_mib(kv + 9);
            }
        }
        n_processes++;
    } else if (strcmp(word, "hang") == 0) {
        char *seconds = strtok_r(NULL, " \t\r\n", &save);
        hang_seconds = seconds ? (unsigned int)strtoul(seconds, NULL, 10) : 0;
    } else if (strcmp(word, "error") == 0) {
        char *call = strtok_r(NULL, " \t\r\n", &save);
        char *code = strtok_r(NULL, " \t\r\n", &save);
        for (int i = 0; call && code && i < E_CALLS; i++) {
            if (strcmp(call, call_names[i]) == 0) {
                errors[i] = atoi(code);
            }
        }
    }
}

static void load_config(void) {
    n_devices = 0;
    n_processes = 0;
    memset(errors, 0, sizeof(errors));
    hang_seconds = 0;
    const char *path = getenv("NVMLSHIM_CONFIG");
    if (path == NULL || path[0] == '\0') {
        return;
    }
    FILE *file = fopen(path, "r");
    if (file == NULL) {
        return;
    }
    char line[512];
    while (fgets(line, sizeof(line), file) != NULL) {
        parse_line(line);
    }
    fclose(file);
}

static shim_device *device_of(nvmlDevice_t handle) {
    if (handle == NULL || handle < devices || handle >= devices + n_devices) {
        return NULL;
    }
    return handle;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    load_config();
    if (errors[E_INIT]) {
        return errors[E_INIT];
    }
    initialized++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    initialized--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 7: return "Insufficient Size";
    case 9: return "Driver Not Loaded";
    case 12: return "NVML Shared Library Not Found";
    case 15: return "GPU is lost";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    snprintf(version, length, "%s", "999.99.99-shim");
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (errors[E_COUNT]) {
        return errors[E_COUNT];
    }
    *count = (unsigned int)n_devices;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized) {
        return NVML_ERROR_UNINITIALIZED;
    }
    if (errors[E_HANDLE]) {
        return errors[E_HANDLE];
    }
    if (index >= (unsigned int)n_devices) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t handle, char *name, unsigned int length) {
    shim_device *dev = device_of(handle);
    if (dev == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (errors[E_NAME]) {
        return errors[E_NAME];
    }
    snprintf(name, length, "%s", dev->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t handle, char *uuid, unsigned int length) {
    shim_device *dev = device_of(handle);
    if (dev == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (errors[E_UUID]) {
        return errors[E_UUID];
    }
    snprintf(uuid, length, "%s", dev->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t handle, nvmlMemory_t *memory) {
    shim_device *dev = device_of(handle);
    if (dev == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (errors[E_MEMORY]) {
        return errors[E_MEMORY];
    }
    if (hang_seconds) {
        sleep(hang_seconds);
    }
    memory->total = dev->total;
    memory->used = dev->used;
    memory->free = dev->total > dev->used ? dev->total - dev->used : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t handle, nvmlMemory_v2_t *memory) {
    nvmlMemory_t v1;
    nvmlReturn_t ret = nvmlDeviceGetMemoryInfo(handle, &v1);
    if (ret != NVML_SUCCESS) {
        return ret;
    }
    memory->total = v1.total;
    memory->reserved = 0;
    memory->free = v1.free;
    memory->used = v1.used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(
    nvmlDevice_t handle, unsigned int *count, nvmlProcessInfo_t *infos) {
    shim_device *dev = device_of(handle);
    if (dev == NULL || count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (errors[E_PROCESSES]) {
        return errors[E_PROCESSES];
    }
    unsigned int found = 0;
    for (int i = 0; i < n_processes; i++) {
        if (processes[i].device == dev->index) {
            found++;
        }
    }
    if (infos == NULL || *count < found) {
        unsigned int room = *count;
        *count = found;
        return (found == 0 && room == 0) ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned int n = 0;
    for (int i = 0; i < n_processes; i++) {
        if (processes[i].device == dev->index) {
            infos[n].pid = processes[i].pid;
            infos[n].usedGpuMemory = processes[i].used;
            infos[n].gpuInstanceId = 0xFFFFFFFFu;
            infos[n].computeInstanceId = 0xFFFFFFFFu;
            n++;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(
    nvmlDevice_t handle, unsigned int *count, nvmlProcessInfo_t *infos) {
    return nvmlDeviceGetComputeRunningProcesses_v3(handle, count, infos);
}
