/* bench: uncontended lock+unlock pairs through the C library, timed as `shmlock-bench stream`
 * times them: 10,000 pairs of warm-up, then --ops pairs of { lock("ABCD"); unlock } in one
 * process, one client; ns per pair = elapsed / ops. With --repeat R, R runs (each with a client
 * of its own) and the median run is reported, with the min and max ns/pair.
 *
 *   bench [--ops N] [--repeat R] [--segment NAME | --remote ADDR] [--scoped] [--json]
 *
 * --scoped times shmlock_with_lock() with an empty section instead of shmlock_lock() +
 * shmlock_unlock() (the same pair, without a guard handle).
 *
 * The segment must exist (shmlockd creates it); bench.sh runs this and `shmlock-bench stream`
 * side by side. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <shmlock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WARMUP 10000

static void die(const char *what) {
    char msg[512];
    shmlock_last_error_message(msg, sizeof msg);
    fprintf(stderr, "bench: %s: %s\n", what, msg);
    exit(1);
}

static int nothing(void *arg, const shmlock_grant *g) {
    (void)arg;
    (void)g;
    return 0;
}

static int scoped;

static void pairs(shmlock_client *c, long n) {
    static const uint8_t name[] = "ABCD";
    if (scoped) {
        for (long i = 0; i < n; i++)
            if (shmlock_with_lock(c, name, 4, SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, nothing, NULL,
                                  NULL) != SHMLOCK_OK)
                die("with_lock");
        return;
    }
    for (long i = 0; i < n; i++) {
        shmlock_guard *l;
        if (shmlock_lock(c, name, 4, SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, NULL, &l) != SHMLOCK_OK)
            die("lock");
        if (shmlock_unlock(l) != SHMLOCK_OK) die("unlock");
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long ops = 2000000, repeat = 1;
    const char *segment = NULL, *remote = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ops") == 0 && i + 1 < argc) ops = atol(argv[++i]);
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) repeat = atol(argv[++i]);
        else if (strcmp(argv[i], "--segment") == 0 && i + 1 < argc) segment = argv[++i];
        else if (strcmp(argv[i], "--remote") == 0 && i + 1 < argc) remote = argv[++i];
        else if (strcmp(argv[i], "--json") == 0) json = 1;
        else if (strcmp(argv[i], "--scoped") == 0) scoped = 1;
        else {
            fprintf(stderr, "usage: bench [--ops N] [--repeat R] [--segment NAME | --remote ADDR] "
                            "[--scoped] [--json]\n");
            return 2;
        }
    }
    if (ops < 1 || repeat < 1 || repeat > 1000) {
        fprintf(stderr, "bench: --ops and --repeat must be positive (repeat at most 1000)\n");
        return 2;
    }
    double *secs = calloc((size_t)repeat, sizeof *secs);
    if (secs == NULL) return 1;
    for (long r = 0; r < repeat; r++) {
        shmlock_client *c;
        shmlock_status s = remote ? shmlock_connect(remote, NULL, &c)
                                  : shmlock_open(segment, "bench-stream-c", &c);
        if (s != SHMLOCK_OK) die(remote ? "connect" : "open");
        pairs(c, ops < WARMUP ? ops : WARMUP);
        double t = now();
        pairs(c, ops);
        secs[r] = now() - t;
        shmlock_close(c);
    }
    qsort(secs, (size_t)repeat, sizeof *secs, by_value);
    double median = secs[(repeat - 1) / 2];
    double ns = median * 1e9 / (double)ops;
    double min_ns = secs[0] * 1e9 / (double)ops, max_ns = secs[repeat - 1] * 1e9 / (double)ops;
    const char *system = remote ? (scoped ? "remote-c-scoped" : "remote-c")
                                : (scoped ? "shmlock-c-scoped" : "shmlock-c");
    if (json) {
        printf("{\"scenario\":\"stream\",\"system\":\"%s\",\"ops\":%ld,\"seconds\":%.6f,"
               "\"ops_per_sec\":%.1f,\"ns_per_op\":%.2f,\"min_ns_per_op\":%.2f,"
               "\"max_ns_per_op\":%.2f,\"repeat\":%ld}\n",
               system, ops, median, (double)ops / median, ns, min_ns, max_ns, repeat);
    } else {
        printf("stream: %ld x { lock(\"ABCD\"); unlock } in one process, through libshmlock\n", ops);
        printf("%-10s %12.0f pairs/s %8.1f ns/pair (min %.1f, max %.1f, %ld runs)\n", system,
               (double)ops / median, ns, min_ns, max_ns, repeat);
    }
    free(secs);
    return 0;
}
