/* Shared by the workload programs (integration/workloads): each prints exactly one line that the
 * end-to-end suite parses, "<program> ok key=value ..." or "<program> fail at=<step>
 * errno=<NAME> key=value ...", and exits 0 or 1 with it. The errno's symbolic name is what the
 * tests compare (ENOENT: no device node; EPERM: the device cgroup refused it). */
#ifndef KDP_WORKLOAD_REPORT_H
#define KDP_WORKLOAD_REPORT_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

static const char *program = "workload";
static char facts[512]; /* key=value pairs gathered on the way, printed with the result */

static void fact(const char *fmt, ...) {
    size_t used = strlen(facts);
    va_list ap;
    if (used + 2 >= sizeof facts)
        return;
    if (used)
        facts[used++] = ' ';
    va_start(ap, fmt);
    vsnprintf(facts + used, sizeof facts - used, fmt, ap);
    va_end(ap);
}

static void print_line(const char *status, const char *extra) {
    printf("%s %s%s%s%s%s\n", program, status, *extra ? " " : "", extra, *facts ? " " : "", facts);
    fflush(stdout);
}

/* The step that failed, with the errno it failed with (0: no errno, a wrong result). */
static _Noreturn void fail(const char *step, int err) {
    char extra[256];
    if (err) {
        const char *name = strerrorname_np(err);
        snprintf(extra, sizeof extra, "at=%s errno=%s msg=\"%s\"", step, name ? name : "?",
                 strerror(err));
    } else {
        snprintf(extra, sizeof extra, "at=%s", step);
    }
    print_line("fail", extra);
    exit(1);
}

static _Noreturn void succeed(void) {
    print_line("ok", "");
    exit(0);
}

/* "--mknod PATH" as the first arguments: make PATH a character device node with the numbers of the
 * host's node (passed as MAJOR:MINOR in KDP_HOST_NUMBERS) before anything else, as a container
 * with CAP_MKNOD can; the open that follows then meets the device cgroup, not a missing node. */
static void maybe_mknod(int argc, char **argv) {
    unsigned major, minor;
    const char *numbers = getenv("KDP_HOST_NUMBERS");
    if (argc < 3 || strcmp(argv[1], "--mknod") != 0)
        return;
    if (!numbers || sscanf(numbers, "%u:%u", &major, &minor) != 2)
        fail("read-KDP_HOST_NUMBERS", EINVAL);
    char dir[256];
    snprintf(dir, sizeof dir, "%s", argv[2]);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        if (mkdir(dir, 0755) != 0 && errno != EEXIST)
            fail("mkdir", errno);
    }
    if (mknod(argv[2], S_IFCHR | 0666, makedev(major, minor)) != 0)
        fail("mknod", errno);
    fact("made=%s:%u:%u", argv[2], major, minor);
}

/* What the device cgroup lets this container do with PATH's device numbers: on cgroup v1, the
 * access letters of every rule in the container's devices.list that covers them (runc mounts the
 * container's own cgroup at /sys/fs/cgroup/devices), "none" when no rule does; on cgroup v2 the
 * rules are a BPF program, which cannot be read back, so only the version is told. */
static void device_cgroup_fact(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISCHR(st.st_mode)) {
        fact("node=absent");
        return;
    }
    unsigned major = major(st.st_rdev), minor = minor(st.st_rdev);
    fact("node=%u:%u", major, minor);
    struct stat v2;
    if (stat("/sys/fs/cgroup/cgroup.controllers", &v2) == 0) {
        fact("cgroup=v2");
        return;
    }
    FILE *list = fopen("/sys/fs/cgroup/devices/devices.list", "r");
    if (!list) {
        fact("cgroup=v1 devices=unreadable");
        return;
    }
    char type, maj[16], min[16], access[8], line[128];
    int r = 0, w = 0, m = 0;
    while (fgets(line, sizeof line, list)) {
        if (sscanf(line, "%c %15[^:]:%15s %7s", &type, maj, min, access) != 4)
            continue;
        if (type != 'a' && type != 'c')
            continue;
        if (strcmp(maj, "*") != 0 && strtoul(maj, NULL, 10) != major)
            continue;
        if (strcmp(min, "*") != 0 && strtoul(min, NULL, 10) != minor)
            continue;
        r |= strchr(access, 'r') != NULL;
        w |= strchr(access, 'w') != NULL;
        m |= strchr(access, 'm') != NULL;
    }
    fclose(list);
    fact("cgroup=v1 devices=%s%s%s%s", r ? "r" : "", w ? "w" : "", m ? "m" : "", r || w || m ? "" : "none");
}

#endif
