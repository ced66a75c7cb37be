/* A slow-flush model of an SD card or cheap eMMC, for `make bench`: an LD_PRELOAD shim that delays every
 * flush to stable storage by KKTD_SLOW_FSYNC_MS milliseconds (default 5; fractions allowed, 0 disables the
 * delay) and then makes the real call, looked up with dlsym(RTLD_NEXT). Ordinary writes are not delayed:
 * on such media they land in the device's cache quickly; it is the flush that waits for the flash.
 *
 *     gcc -shared -fPIC -O2 -o build/slowsync.so bench/slowsync.c -ldl      (the Makefile's rule)
 *     LD_PRELOAD=build/slowsync.so KKTD_SLOW_FSYNC_MS=5 kktd serve ...
 *
 * SQLite reaches the disk through libc's fsync/fdatasync (Python's os.fsync too), so interposing them
 * covers every commit and checkpoint. The delay is a nanosleep in the calling thread, as a real slow flush
 * blocks only the thread that asked for it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static long delay_ns = -1;

static void slow_down(void)
{
    if (delay_ns < 0) {
        /* Races between threads are harmless: every thread computes the same value. */
        const char *text = getenv("KKTD_SLOW_FSYNC_MS");
        double ms = text != NULL && *text != '\0' ? strtod(text, NULL) : 5.0;
        delay_ns = ms > 0 ? (long)(ms * 1e6) : 0;
    }
    if (delay_ns == 0)
        return;
    struct timespec left = {delay_ns / 1000000000L, delay_ns % 1000000000L};
    int saved = errno;
    while (nanosleep(&left, &left) != 0 && errno == EINTR)
        ;
    errno = saved;
}

static void *real(const char *name)
{
    void *fn = dlsym(RTLD_NEXT, name);
    if (fn == NULL)
        abort(); /* libc without the call: nothing sensible to fall back to */
    return fn;
}

int fsync(int fd)
{
    static int (*next)(int);
    if (next == NULL)
        next = (int (*)(int))real("fsync");
    slow_down();
    return next(fd);
}

int fdatasync(int fd)
{
    static int (*next)(int);
    if (next == NULL)
        next = (int (*)(int))real("fdatasync");
    slow_down();
    return next(fd);
}

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags)
{
    static int (*next)(int, off64_t, off64_t, unsigned int);
    if (next == NULL)
        next = (int (*)(int, off64_t, off64_t, unsigned int))real("sync_file_range");
    /* Only a call that waits for the write-out is a flush; starting write-back alone returns at once. */
    if (flags & SYNC_FILE_RANGE_WAIT_AFTER)
        slow_down();
    return next(fd, offset, nbytes, flags);
}

int msync(void *addr, size_t length, int flags)
{
    static int (*next)(void *, size_t, int);
    if (next == NULL)
        next = (int (*)(void *, size_t, int))real("msync");
    if (flags & MS_SYNC)
        slow_down();
    return next(addr, length, flags);
}
