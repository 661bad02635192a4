/* Helpers of the C test programs: a failed check prints where, the status and the library's
 * message, and exits 1. */
#ifndef SHMLOCK_TEST_CHECK_H
#define SHMLOCK_TEST_CHECK_H

#include <shmlock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void show_failure(const char *file, int line, const char *what, int got, int want) {
    char msg[512];
    shmlock_last_error_message(msg, sizeof msg);
    fprintf(stderr, "%s:%d: %s: got %s, want %s (last error: %s)\n", file, line, what,
            shmlock_status_name(got), shmlock_status_name(want), msg);
    exit(1);
}

/* EXPECT(call, SHMLOCK_X): the call returns SHMLOCK_X. */
#define EXPECT(call, want)                                                                    \
    do {                                                                                      \
        int got_ = (int)(call);                                                               \
        if (got_ != (int)(want)) show_failure(__FILE__, __LINE__, #call, got_, (int)(want)); \
    } while (0)

#define OK(call) EXPECT(call, SHMLOCK_OK)

/* CHECK(cond): a plain condition. */
#define CHECK(cond)                                                               \
    do {                                                                          \
        if (!(cond)) {                                                            \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                              \
        }                                                                         \
    } while (0)

/* A lock name from a C string. */
#define NAME(s) (const uint8_t *)(s), strlen(s)

#define MS(n) ((int64_t)(n) * 1000000)

#endif
