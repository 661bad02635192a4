/* counter SEGMENT NAME ITERATIONS FILE: ITERATIONS times { lock NAME; read the number in FILE;
 * write it back plus one; unlock }. The file is the witness outside the lock: its read and write
 * are not atomic, so without exclusion concurrent runs lose increments. Also checks that the
 * fencing tokens it sees strictly increase. */
#include "check.h"

#include <fcntl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    CHECK(argc == 5);
    const char *name = argv[2];
    long n = atol(argv[3]);
    shmlock_client *c;
    OK(shmlock_open(argv[1], "c-counter", &c));
    uint64_t last_token = 0;
    for (long i = 0; i < n; i++) {
        shmlock_guard *l;
        shmlock_grant g;
        OK(shmlock_lock(c, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, &g, &l));
        CHECK(g.token > last_token);
        CHECK(g.mode == SHMLOCK_EXCLUSIVE);
        last_token = g.token;
        int fd = open(argv[4], O_RDWR);
        CHECK(fd >= 0);
        char buf[32] = {0};
        ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
        CHECK(r >= 0);
        long v = atol(buf);
        if (i % 7 == 0) usleep(10); /* widen the window a race would need */
        int len = snprintf(buf, sizeof buf, "%ld\n", v + 1);
        CHECK(pwrite(fd, buf, (size_t)len, 0) == len);
        close(fd);
        OK(shmlock_unlock(l));
    }
    shmlock_close(c);
    return 0;
}
