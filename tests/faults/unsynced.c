/* A filesystem that forgets what was never synced, for case 4 of the fault suite.
 *
 * Preloaded (LD_PRELOAD) into a coordinator, this wraps fsync and fdatasync: for a
 * file whose path starts with $HERDER_UNSYNCED_WATCH, once the real call has
 * returned, it copies the file's whole content to "<path>.durable" (through a
 * temporary file and a rename, so the copy is always whole). The copy is what a
 * disk would still hold after a power loss that dropped every write not yet
 * synced; test_fault_crash_cycles.py puts it back after each kill -9. An unlink
 * of a watched file drops its copy. The caller waits for the copy, as it waits
 * for the disk: a write is acknowledged only after its sync returned.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_mutex_t copying = PTHREAD_MUTEX_INITIALIZER;

static int watched(const char *path) {
    const char *prefix = getenv("HERDER_UNSYNCED_WATCH");
    return prefix != NULL && *prefix != '\0' && strncmp(path, prefix, strlen(prefix)) == 0 &&
           strstr(path, ".durable") == NULL;
}

/* Copies the content of fd (read from offset 0, whatever its file position) to path.durable. */
static void keep_synced_copy(int fd) {
    char link[64], path[PATH_MAX], tmp[PATH_MAX + 16], durable[PATH_MAX + 16], buf[1 << 16];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return;
    path[n] = '\0';
    if (!watched(path)) return;
    snprintf(tmp, sizeof tmp, "%s.durable.tmp", path);
    snprintf(durable, sizeof durable, "%s.durable", path);
    pthread_mutex_lock(&copying);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) {
        perror("unsynced: open copy");
        abort();
    }
    off_t at = 0;
    ssize_t got;
    while ((got = pread(fd, buf, sizeof buf, at)) > 0) {
        if (write(out, buf, (size_t)got) != got) {
            perror("unsynced: write copy");
            abort();
        }
        at += got;
    }
    if (got < 0) {
        perror("unsynced: read");
        abort();
    }
    close(out);
    if (rename(tmp, durable) != 0) {
        perror("unsynced: rename copy");
        abort();
    }
    pthread_mutex_unlock(&copying);
}

/* The real call named `name`, then the copy once it succeeded. */
static int synced(const char *name, int (**real)(int), int fd) {
    if (*real == NULL) *real = (int (*)(int))dlsym(RTLD_NEXT, name);
    int rc = (*real)(fd);
    if (rc == 0) keep_synced_copy(fd);
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    return synced("fsync", &real, fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    return synced("fdatasync", &real, fd);
}

int unlink(const char *path) {
    static int (*real)(const char *);
    if (real == NULL) real = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    int rc = real(path);
    if (rc == 0 && path[0] == '/' && watched(path)) {
        char durable[PATH_MAX + 16];
        snprintf(durable, sizeof durable, "%s.durable", path);
        pthread_mutex_lock(&copying);
        real(durable);
        pthread_mutex_unlock(&copying);
    }
    return rc;
}
