/* A FUSE filesystem mounted and read, served from inside the same pod: open /dev/fuse, mount a
 * "fuse" filesystem on it (CAP_SYS_ADMIN), serve the kernel's requests in a child process (one
 * read-only file whose content names the server's PID), and read the file through the mount in
 * the parent. The FUSE protocol is spoken directly (linux/fuse.h), no libfuse. Run in a pod by the
 * e2e suite. */
#include "report.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#define MOUNTPOINT "/tmp/kdp-fuse"
#define FILE_NAME "hello"
#define ROOT_ID FUSE_ROOT_ID
#define FILE_ID 2

static char content[64];

static void attr_of(uint64_t node, struct fuse_attr *a) {
    memset(a, 0, sizeof *a);
    a->ino = node;
    a->nlink = node == ROOT_ID ? 2 : 1;
    a->mode = node == ROOT_ID ? (S_IFDIR | 0555) : (S_IFREG | 0444);
    a->size = node == ROOT_ID ? 0 : strlen(content);
    a->blksize = 4096;
}

/* One answer: the header, then `len` bytes of `body` (none for an error). */
static void reply(int fd, uint64_t unique, int error, const void *body, size_t len) {
    struct fuse_out_header out = {.len = (uint32_t)(sizeof out + len), .error = error, .unique = unique};
    char buf[sizeof out + 4096];
    if (len > 4096)
        len = 0, out.error = -EIO, out.len = sizeof out;
    memcpy(buf, &out, sizeof out);
    if (len)
        memcpy(buf + sizeof out, body, len);
    /* ENOENT here: the request was interrupted and the kernel no longer waits for it. */
    if (write(fd, buf, out.len) < 0 && errno != ENOENT)
        _exit(3);
}

/* The server: answers until the connection goes (ENODEV on unmount) or it is killed. */
static _Noreturn void serve(int fd) {
    static char buf[FUSE_MIN_READ_BUFFER + 65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT)
                continue;
            _exit(errno == ENODEV ? 0 : 2);
        }
        const struct fuse_in_header *in = (const void *)buf;
        const void *arg = buf + sizeof *in;
        switch (in->opcode) {
        case FUSE_INIT: {
            const struct fuse_init_in *init = arg;
            struct fuse_init_out out = {
                .major = FUSE_KERNEL_VERSION,
                .minor = FUSE_KERNEL_MINOR_VERSION,
                .max_readahead = init->max_readahead,
                .max_write = 4096,
            };
            if (init->major != FUSE_KERNEL_VERSION) {
                reply(fd, in->unique, -EPROTO, NULL, 0);
                _exit(4);
            }
            reply(fd, in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_LOOKUP: {
            struct fuse_entry_out out = {0};
            if (in->nodeid != ROOT_ID || strcmp(arg, FILE_NAME) != 0) {
                reply(fd, in->unique, -ENOENT, NULL, 0);
                break;
            }
            out.nodeid = FILE_ID;
            attr_of(FILE_ID, &out.attr);
            reply(fd, in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_GETATTR: {
            struct fuse_attr_out out = {0};
            if (in->nodeid != ROOT_ID && in->nodeid != FILE_ID) {
                reply(fd, in->unique, -ENOENT, NULL, 0);
                break;
            }
            attr_of(in->nodeid, &out.attr);
            reply(fd, in->unique, 0, &out, sizeof out);
            break;
        }
        case FUSE_OPEN: {
            struct fuse_open_out out = {0};
            reply(fd, in->unique, in->nodeid == FILE_ID ? 0 : -EISDIR, &out,
                  in->nodeid == FILE_ID ? sizeof out : 0);
            break;
        }
        case FUSE_READ: {
            const struct fuse_read_in *rd = arg;
            size_t size = strlen(content);
            size_t off = rd->offset < size ? (size_t)rd->offset : size;
            size_t len = size - off < rd->size ? size - off : rd->size;
            reply(fd, in->unique, 0, content + off, len);
            break;
        }
        case FUSE_FLUSH:
        case FUSE_RELEASE:
        case FUSE_RELEASEDIR:
            reply(fd, in->unique, 0, NULL, 0);
            break;
        case FUSE_FORGET:
        case FUSE_BATCH_FORGET:
        case FUSE_INTERRUPT:
            break; /* the kernel expects no answer to these */
        default:
            reply(fd, in->unique, -ENOSYS, NULL, 0);
        }
    }
}

int main(int argc, char **argv) {
    program = "fuse-hello";
    maybe_mknod(argc, argv);
    device_cgroup_fact("/dev/fuse");
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        fail("open", errno);
    if (mkdir(MOUNTPOINT, 0755) != 0 && errno != EEXIST)
        fail("mkdir", errno);
    char opts[128];
    snprintf(opts, sizeof opts, "fd=%d,rootmode=40000,user_id=0,group_id=0", fd);
    if (mount("kdp-hello", MOUNTPOINT, "fuse.kdp-hello", MS_NOSUID | MS_NODEV, opts) != 0)
        fail("mount", errno);
    fact("mounted=%s", MOUNTPOINT);

    pid_t server = fork();
    if (server < 0)
        fail("fork", errno);
    if (server == 0) {
        snprintf(content, sizeof content, "served by pid %d", (int)getpid());
        serve(fd);
    }
    char want[64], got[64] = {0};
    snprintf(want, sizeof want, "served by pid %d", (int)server);
    int file = open(MOUNTPOINT "/" FILE_NAME, O_RDONLY | O_CLOEXEC);
    int err = errno;
    ssize_t n = file < 0 ? -1 : read(file, got, sizeof got - 1);
    if (n < 0 && file >= 0)
        err = errno;
    if (file >= 0)
        close(file);
    kill(server, SIGKILL);
    waitpid(server, NULL, 0);
    umount2(MOUNTPOINT, MNT_DETACH);
    if (file < 0)
        fail("open-through-mount", err);
    if (n < 0)
        fail("read-through-mount", err);
    fact("read=\"%s\"", got);
    if (strcmp(got, want) != 0)
        fail("content", 0);
    succeed();
}
