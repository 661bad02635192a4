/* The C test programs' cases, one per subcommand (driven by tests/c_programs.rs):
 *   cases hold SEGMENT NAME exclusive|shared   lock, print "held", wait for EOF on stdin, unlock
 *   cases busy SEGMENT NAME HOLDER_PID|keeper   a held lock: try-lock busy, a timeout naming it
 *                                               (HOLDER_PID "parent": this process's parent)
 *   cases shared SEGMENT NAME                   a shared lock held: shared granted, exclusive busy
 *   cases died SEGMENT NAME                     the holder was SIGKILLed: owner_died, then not
 *   cases fork SEGMENT NAME                     a forked child gets SHMLOCK_FORKED
 *   cases args SEGMENT                          null pointers, bad names and modes, messages
 *   cases threads SEGMENT                       a client shared by threads; a client per thread
 *   cases remote ADDR SEGMENT                   a remote client through the gateway at ADDR
 *   cases cells SEGMENT                         guard handles: several at once, any order, any
 *                                               thread, none left by a failed lock
 *   cases lost ADDR SEGMENT                     a remote guard, lost once the gateway is gone:
 *                                               prints "held", then waits for EOF on stdin
 *                                               (the test kills shmlockd meanwhile) */
#include "check.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static int hold(const char *seg, const char *name, const char *mode) {
    shmlock_client *c;
    shmlock_guard *l;
    shmlock_grant g;
    uint32_t m = strcmp(mode, "shared") == 0 ? SHMLOCK_SHARED : SHMLOCK_EXCLUSIVE;
    OK(shmlock_open(seg, "c-holder", &c));
    OK(shmlock_lock(c, NAME(name), m, SHMLOCK_FOREVER, &g, &l));
    CHECK(g.mode == m);
    printf("held token=%llu\n", (unsigned long long)g.token);
    fflush(stdout);
    char buf[64];
    while (fread(buf, 1, sizeof buf, stdin) > 0) {
    }
    OK(shmlock_unlock(l));
    shmlock_close(c);
    return 0;
}

static int busy(const char *seg, const char *name, const char *holder_pid) {
    shmlock_client *c;
    shmlock_guard *l = (shmlock_guard *)&c; /* not NULL: a failed lock must set it to NULL */
    OK(shmlock_open(seg, NULL, &c));
    EXPECT(shmlock_lock(c, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l),
           SHMLOCK_WOULD_BLOCK);
    CHECK(l == NULL);
    EXPECT(shmlock_lock(c, NAME(name), SHMLOCK_SHARED, SHMLOCK_NO_WAIT, NULL, &l),
           SHMLOCK_WOULD_BLOCK);
    EXPECT(shmlock_lock(c, NAME(name), SHMLOCK_EXCLUSIVE, MS(50), NULL, &l), SHMLOCK_TIMED_OUT);
    CHECK(l == NULL);
    char msg[256], want[64];
    size_t n = shmlock_last_error_message(msg, sizeof msg);
    CHECK(n > 0 && n < sizeof msg);
    if (strcmp(holder_pid, "keeper") == 0)
        /* Under `shmlock run`, its keeper process holds the lock, labelled "run CMD". */
        snprintf(want, sizeof want, " (run ");
    else
        snprintf(want, sizeof want, "held by pid %s", holder_pid);
    if (strstr(msg, "timed out") == NULL || strstr(msg, want) == NULL) {
        fprintf(stderr, "timeout message %s does not name the holder (%s)\n", msg, want);
        return 1;
    }
    shmlock_close(c);
    return 0;
}

static int shared(const char *seg, const char *name) {
    shmlock_client *a, *b;
    shmlock_guard *la, *lb;
    shmlock_grant g;
    OK(shmlock_open(seg, NULL, &a));
    OK(shmlock_open(seg, NULL, &b));
    OK(shmlock_lock(a, NAME(name), SHMLOCK_SHARED, SHMLOCK_NO_WAIT, &g, &la));
    CHECK(g.mode == SHMLOCK_SHARED);
    EXPECT(shmlock_lock(b, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &lb),
           SHMLOCK_WOULD_BLOCK);
    OK(shmlock_lock(b, NAME(name), SHMLOCK_SHARED, MS(1000), &g, &lb));
    OK(shmlock_unlock(lb));
    OK(shmlock_unlock(la));
    shmlock_close(b);
    shmlock_close(a);
    return 0;
}

static int died(const char *seg, const char *name) {
    shmlock_client *c;
    shmlock_guard *l;
    shmlock_grant g;
    OK(shmlock_open(seg, NULL, &c));
    OK(shmlock_lock(c, NAME(name), SHMLOCK_EXCLUSIVE, MS(20000), &g, &l));
    CHECK(g.owner_died);
    shmlock_grant again;
    OK(shmlock_guard_grant(l, &again));
    CHECK(again.owner_died && again.token == g.token);
    OK(shmlock_unlock(l));
    OK(shmlock_lock(c, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, &g, &l));
    CHECK(!g.owner_died); /* the previous holder unlocked */
    OK(shmlock_unlock(l));
    shmlock_close(c);
    return 0;
}

static int forked(const char *seg, const char *name) {
    shmlock_client *c;
    shmlock_guard *l;
    shmlock_grant g;
    OK(shmlock_open(seg, NULL, &c));
    OK(shmlock_lock(c, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, &g, &l));
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        shmlock_guard *mine;
        /* The parent's client: refused, whatever the name. */
        EXPECT(shmlock_lock(c, NAME("other"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &mine),
               SHMLOCK_FORKED);
        char msg[512];
        shmlock_last_error_message(msg, sizeof msg);
        CHECK(strstr(msg, "fork") != NULL);
        /* The parent's lock: not the child's to release (the handle is freed). */
        EXPECT(shmlock_unlock(l), SHMLOCK_FORKED);
        shmlock_close(c); /* frees the child's copy, releases nothing */
        /* A client of its own works, and sees the parent's lock still held. */
        shmlock_client *own;
        OK(shmlock_open(seg, NULL, &own));
        EXPECT(shmlock_lock(own, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &mine),
               SHMLOCK_WOULD_BLOCK);
        OK(shmlock_lock(own, NAME("other"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &mine));
        OK(shmlock_unlock(mine));
        shmlock_close(own);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* Still the parent's: another client of the parent finds it busy, and the parent unlocks. */
    shmlock_client *other;
    shmlock_guard *l2;
    OK(shmlock_open(seg, NULL, &other));
    EXPECT(shmlock_lock(other, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_WOULD_BLOCK);
    OK(shmlock_unlock(l));
    OK(shmlock_lock(other, NAME(name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2));
    OK(shmlock_unlock(l2));
    shmlock_close(other);
    shmlock_close(c);
    return 0;
}

struct seen {
    uint64_t token;
    bool owner_died;
    uint32_t mode;
    int calls;
    shmlock_client *other; /* a second client, to try the lock from inside */
    const char *name;
};

static int in_section(void *arg, const shmlock_grant *g) {
    struct seen *s = arg;
    s->token = g->token;
    s->owner_died = g->owner_died;
    s->mode = g->mode;
    s->calls++;
    shmlock_guard *l;
    /* Held while this runs: another client finds it busy. */
    if (shmlock_lock(s->other, NAME(s->name), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l) !=
        SHMLOCK_WOULD_BLOCK)
        return -1;
    return 42;
}

static int calls;
static bool third_call(void *arg) {
    (void)arg;
    return ++calls >= 3;
}

static int args(const char *seg) {
    shmlock_client *c = NULL, *c2 = NULL;
    shmlock_guard *l = NULL, *l2 = NULL;
    shmlock_grant g;
    char msg[256];

    CHECK(shmlock_abi_version() == SHMLOCK_ABI_VERSION);
    CHECK(strlen(shmlock_version()) > 0);
    CHECK(strcmp(shmlock_status_name(SHMLOCK_TIMED_OUT), "SHMLOCK_TIMED_OUT") == 0);
    CHECK(strcmp(shmlock_status_name(-5), "SHMLOCK_UNKNOWN") == 0);
    CHECK(shmlock_last_error_message(msg, sizeof msg) == 0 && msg[0] == 0); /* nothing failed */

    /* Opening. */
    EXPECT(shmlock_open(seg, NULL, NULL), SHMLOCK_INVALID_ARGUMENT);
    CHECK(shmlock_last_error_message(NULL, 0) > 0);
    EXPECT(shmlock_open("/shmlock-ctest-does-not-exist", NULL, &c), SHMLOCK_SEGMENT_MISSING);
    CHECK(c == NULL);
    size_t need = shmlock_last_error_message(NULL, 0);
    char tiny[8];
    CHECK(shmlock_last_error_message(tiny, sizeof tiny) == need && strlen(tiny) == 7);
    EXPECT(shmlock_open("no-slash", NULL, &c), SHMLOCK_BAD_SEGMENT_NAME);
    EXPECT(shmlock_open("/bad\xff", NULL, &c), SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_connect(NULL, NULL, &c), SHMLOCK_INVALID_ARGUMENT);
    OK(shmlock_open(seg, "c-args", &c));
    OK(shmlock_open(seg, NULL, &c2));

    /* Locking: null pointers, modes, names. */
    EXPECT(shmlock_lock(NULL, NAME("a"), SHMLOCK_EXCLUSIVE, 0, NULL, &l), SHMLOCK_INVALID_ARGUMENT);
    CHECK(l == NULL);
    EXPECT(shmlock_lock(c, NAME("a"), SHMLOCK_EXCLUSIVE, 0, NULL, NULL), SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_lock(c, NULL, 3, SHMLOCK_EXCLUSIVE, 0, NULL, &l), SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_lock(c, NAME("a"), 0, 0, NULL, &l), SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_lock(c, NAME("a"), 7, 0, NULL, &l), SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_lock(c, NULL, 0, SHMLOCK_EXCLUSIVE, 0, NULL, &l), SHMLOCK_BAD_NAME);
    char longname[2000];
    memset(longname, 'x', sizeof longname);
    EXPECT(shmlock_lock(c, (const uint8_t *)longname, sizeof longname, SHMLOCK_EXCLUSIVE, 0, NULL,
                        &l),
           SHMLOCK_BAD_NAME);
    shmlock_last_error_message(msg, sizeof msg);
    CHECK(strstr(msg, "2000 bytes") != NULL);
    EXPECT(shmlock_unlock(NULL), SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_guard_grant(NULL, &g), SHMLOCK_INVALID_ARGUMENT);
    CHECK(shmlock_last_os_error() == 0);

    /* Any bytes are a name: a NUL and 0xff inside. */
    const uint8_t odd[] = {'a', 0, 0xff, 'b'};
    OK(shmlock_lock(c, odd, sizeof odd, SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, &g, &l));
    EXPECT(shmlock_lock(c2, odd, sizeof odd, SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_WOULD_BLOCK);
    EXPECT(shmlock_lock(c2, odd, 1, SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2), SHMLOCK_OK);
    OK(shmlock_unlock(l2));
    /* Re-locking by the same client: an error at once, never a self-deadlock. */
    EXPECT(shmlock_lock(c, odd, sizeof odd, SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, NULL, &l2),
           SHMLOCK_ALREADY_HELD);
    /* An interruptible wait gives up when its callback says so, holding nothing. */
    EXPECT(shmlock_lock_interruptible(c2, odd, sizeof odd, SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER,
                                      NULL, NULL, NULL, &l2),
           SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_lock_interruptible(c2, odd, sizeof odd, SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER,
                                      third_call, NULL, NULL, &l2),
           SHMLOCK_INTERRUPTED);
    CHECK(calls >= 3 && l2 == NULL);
    uint64_t first = g.token;
    OK(shmlock_unlock(l));
    /* Granted once free, with a later token. */
    OK(shmlock_lock_interruptible(c2, odd, sizeof odd, SHMLOCK_EXCLUSIVE, MS(1000), third_call,
                                  NULL, &g, &l2));
    CHECK(g.token > first && !g.owner_died);
    OK(shmlock_unlock(l2));

    /* The scoped lock: the section runs with the lock held, its result comes back, and the lock
     * is free afterwards; a busy lock does not run it. */
    struct seen s = {.other = c2, .name = "scoped"};
    int result = 0;
    OK(shmlock_with_lock(c, NAME("scoped"), SHMLOCK_EXCLUSIVE, MS(1000), in_section, &s, &result));
    CHECK(result == 42 && s.calls == 1 && s.token > 0 && !s.owner_died &&
          s.mode == SHMLOCK_EXCLUSIVE);
    OK(shmlock_lock(c2, NAME("scoped"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2));
    result = 7;
    EXPECT(shmlock_with_lock(c, NAME("scoped"), SHMLOCK_SHARED, SHMLOCK_NO_WAIT, in_section, &s,
                             &result),
           SHMLOCK_WOULD_BLOCK);
    CHECK(s.calls == 1 && result == 7);
    OK(shmlock_unlock(l2));
    EXPECT(shmlock_with_lock(c, NAME("scoped"), SHMLOCK_EXCLUSIVE, 0, NULL, NULL, NULL),
           SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_with_lock(NULL, NAME("scoped"), SHMLOCK_EXCLUSIVE, 0, in_section, &s, NULL),
           SHMLOCK_INVALID_ARGUMENT);
    EXPECT(shmlock_with_lock(c, NULL, 0, SHMLOCK_EXCLUSIVE, 0, in_section, &s, NULL),
           SHMLOCK_BAD_NAME);

    /* Closing with a lock held releases it (the guard is dangling then, and left alone). */
    OK(shmlock_lock(c, NAME("held-at-close"), SHMLOCK_SHARED, SHMLOCK_NO_WAIT, NULL, &l));
    EXPECT(shmlock_lock(c2, NAME("held-at-close"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_WOULD_BLOCK);
    shmlock_close(c);
    shmlock_close(NULL);
    OK(shmlock_lock(c2, NAME("held-at-close"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2));
    OK(shmlock_unlock(l2));
    shmlock_close(c2);
    return 0;
}

static int remote(const char *addr, const char *seg) {
    shmlock_client *r, *r2, *local;
    shmlock_guard *l, *l2;
    shmlock_grant g;
    OK(shmlock_connect(addr, NULL, &r));
    OK(shmlock_connect(addr, NULL, &r2));
    OK(shmlock_open(seg, NULL, &local));

    OK(shmlock_lock(r, NAME("jobs/1"), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, &g, &l));
    CHECK(g.mode == SHMLOCK_EXCLUSIVE && g.token > 0 && !g.owner_died);
    EXPECT(shmlock_lock(r, NAME("jobs/1"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_ALREADY_HELD);
    EXPECT(shmlock_lock(r2, NAME("jobs/1"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_WOULD_BLOCK);
    EXPECT(shmlock_lock(r2, NAME("jobs/1"), SHMLOCK_SHARED, MS(30), NULL, &l2), SHMLOCK_TIMED_OUT);
    /* The same table: a local client sees the remote holder. */
    EXPECT(shmlock_lock(local, NAME("jobs/1"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_WOULD_BLOCK);
    EXPECT(shmlock_lock(r2, NAME("has space"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_BAD_NAME);
    EXPECT(shmlock_lock(r2, NULL, 0, SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2),
           SHMLOCK_BAD_NAME);
    uint64_t first = g.token;
    OK(shmlock_unlock(l));
    OK(shmlock_lock(r2, NAME("jobs/1"), SHMLOCK_SHARED, MS(5000), &g, &l2));
    CHECK(g.mode == SHMLOCK_SHARED && g.token > first);
    OK(shmlock_lock(r, NAME("jobs/1"), SHMLOCK_SHARED, SHMLOCK_NO_WAIT, NULL, &l));
    OK(shmlock_unlock(l));
    OK(shmlock_unlock(l2));
    OK(shmlock_lock(local, NAME("jobs/1"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2));
    OK(shmlock_unlock(l2));

    /* The scoped lock through the gateway. */
    struct seen s = {.other = r2, .name = "jobs/3"};
    int result = 0;
    OK(shmlock_with_lock(r, NAME("jobs/3"), SHMLOCK_SHARED, MS(5000), in_section, &s, &result));
    CHECK(result == 42 && s.calls == 1 && s.mode == SHMLOCK_SHARED);
    OK(shmlock_lock(r2, NAME("jobs/3"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l2));
    OK(shmlock_unlock(l2));

    /* An interruptible remote wait gives up when asked, holding nothing. */
    OK(shmlock_lock(r, NAME("jobs/4"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l));
    calls = 0;
    EXPECT(shmlock_lock_interruptible(r2, NAME("jobs/4"), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER,
                                      third_call, NULL, NULL, &l2),
           SHMLOCK_INTERRUPTED);
    CHECK(calls >= 3 && l2 == NULL);
    OK(shmlock_unlock(l));
    OK(shmlock_lock(r2, NAME("jobs/4"), SHMLOCK_EXCLUSIVE, MS(5000), NULL, &l2));
    OK(shmlock_unlock(l2));

    /* A fork child may not use the parent's session either. */
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        EXPECT(shmlock_lock(r, NAME("jobs/2"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l),
               SHMLOCK_FORKED);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    OK(shmlock_lock(r, NAME("jobs/2"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l));
    OK(shmlock_unlock(l));

    shmlock_close(local);
    shmlock_close(r2);
    shmlock_close(r);
    /* Nothing listens on port 1. */
    EXPECT(shmlock_connect("127.0.0.1:1", NULL, &r), SHMLOCK_CONNECTION);
    CHECK(r == NULL);
    return 0;
}

struct shared_state {
    shmlock_client *client; /* the client both threads use */
    shmlock_guard *guard;   /* taken by the thread, unlocked by main */
    const char *segment;
    long counter;           /* incremented under the lock by both threads' own clients */
};

static void *take(void *arg) {
    struct shared_state *st = arg;
    OK(shmlock_lock(st->client, NAME("threads/a"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL,
                    &st->guard));
    return NULL;
}

static void *count(void *arg) {
    struct shared_state *st = arg;
    shmlock_client *own;
    OK(shmlock_open(st->segment, NULL, &own));
    for (int i = 0; i < 20000; i++) {
        shmlock_guard *l;
        OK(shmlock_lock(own, NAME("threads/count"), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, NULL, &l));
        long v = __atomic_load_n(&st->counter, __ATOMIC_RELAXED);
        __atomic_store_n(&st->counter, v + 1, __ATOMIC_RELAXED); /* not atomic as a whole */
        OK(shmlock_unlock(l));
    }
    shmlock_close(own);
    return NULL;
}

/* One client shared by threads is one owner; a client per thread excludes. */
static int threads(const char *seg) {
    struct shared_state st = {.segment = seg};
    OK(shmlock_open(seg, NULL, &st.client));
    pthread_t t;
    CHECK(pthread_create(&t, NULL, take, &st) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    shmlock_guard *l;
    EXPECT(shmlock_lock(st.client, NAME("threads/a"), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, NULL,
                        &l),
           SHMLOCK_ALREADY_HELD);
    OK(shmlock_unlock(st.guard)); /* another thread's lock, unlocked here */
    OK(shmlock_lock(st.client, NAME("threads/a"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l));
    OK(shmlock_unlock(l));
    pthread_t a, b;
    CHECK(pthread_create(&a, NULL, count, &st) == 0);
    CHECK(pthread_create(&b, NULL, count, &st) == 0);
    CHECK(pthread_join(a, NULL) == 0 && pthread_join(b, NULL) == 0);
    CHECK(st.counter == 40000);
    shmlock_close(st.client);
    return 0;
}

struct handoff {
    shmlock_guard *guard;
    int status;
};

static void *unlock_there(void *arg) {
    struct handoff *h = arg;
    h->status = shmlock_unlock(h->guard);
    return NULL;
}

/* A client's guard handles: the one its locking thread keeps in the client and the allocated
 * ones of further locks held at once, or of other threads, all alike to the caller. */
static int cells(const char *seg) {
    shmlock_client *c, *other;
    OK(shmlock_open(seg, NULL, &c));
    OK(shmlock_open(seg, NULL, &other));
    const char *names[4] = {"cells/0", "cells/1", "cells/2", "cells/3"};
    shmlock_guard *g[4], *l;
    shmlock_grant gr, seen;
    for (int i = 0; i < 4; i++) {
        uint32_t m = i % 2 ? SHMLOCK_SHARED : SHMLOCK_EXCLUSIVE;
        OK(shmlock_lock(c, NAME(names[i]), m, SHMLOCK_NO_WAIT, &gr, &g[i]));
        OK(shmlock_guard_grant(g[i], &seen));
        CHECK(seen.token == gr.token && seen.mode == m && !seen.owner_died);
        CHECK(!shmlock_guard_lost(g[i]));
    }
    CHECK(!shmlock_guard_lost(NULL));
    for (int i = 0; i < 4; i++)
        EXPECT(shmlock_lock(other, NAME(names[i]), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l),
               SHMLOCK_WOULD_BLOCK);
    /* Out of the order they were taken in; each unlock frees its own lock only. */
    int order[4] = {2, 0, 3, 1};
    for (int k = 0; k < 4; k++) {
        OK(shmlock_unlock(g[order[k]]));
        for (int j = k + 1; j < 4; j++) OK(shmlock_guard_grant(g[order[j]], &seen));
        OK(shmlock_lock(other, NAME(names[order[k]]), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l));
        OK(shmlock_unlock(l));
    }
    /* A lock that is not had leaves nothing behind: the next pairs run as before. */
    shmlock_guard *h;
    OK(shmlock_lock(other, NAME("cells/busy"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &h));
    EXPECT(shmlock_lock(c, NAME("cells/busy"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l),
           SHMLOCK_WOULD_BLOCK);
    CHECK(l == NULL);
    OK(shmlock_unlock(h));
    uint64_t last = 0;
    for (int k = 0; k < 1000; k++) {
        OK(shmlock_lock(c, NAME("cells/loop"), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, &gr, &l));
        CHECK(gr.token > last);
        last = gr.token;
        OK(shmlock_unlock(l));
    }
    /* Locked here, unlocked by another thread, locked here again: over and over. */
    last = 0;
    for (int k = 0; k < 200; k++) {
        struct handoff ho = {.status = -1};
        OK(shmlock_lock(c, NAME("cells/handoff"), SHMLOCK_EXCLUSIVE, SHMLOCK_FOREVER, &gr, &ho.guard));
        CHECK(gr.token > last);
        last = gr.token;
        if (k % 2) OK(shmlock_lock(c, NAME("cells/second"), SHMLOCK_SHARED, SHMLOCK_NO_WAIT, NULL, &l));
        pthread_t t;
        CHECK(pthread_create(&t, NULL, unlock_there, &ho) == 0);
        CHECK(pthread_join(t, NULL) == 0);
        EXPECT(ho.status, SHMLOCK_OK);
        if (k % 2) OK(shmlock_unlock(l));
        OK(shmlock_lock(other, NAME("cells/handoff"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &h));
        OK(shmlock_unlock(h));
    }
    shmlock_close(other);
    shmlock_close(c);
    return 0;
}

/* A remote guard is lost once the client has seen its gateway connection end; a local guard
 * is never. */
static int lost(const char *addr, const char *seg) {
    shmlock_client *r, *local;
    shmlock_guard *l, *k, *x;
    OK(shmlock_connect(addr, NULL, &r));
    OK(shmlock_open(seg, NULL, &local));
    OK(shmlock_lock(r, NAME("lost/1"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &l));
    OK(shmlock_lock(local, NAME("lost/local"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &k));
    CHECK(!shmlock_guard_lost(l) && !shmlock_guard_lost(k));
    printf("held\n");
    fflush(stdout);
    char buf[64];
    while (fread(buf, 1, sizeof buf, stdin) > 0) {
    }
    /* shmlockd is gone: the next request sees the connection closed, and so does the guard. */
    EXPECT(shmlock_lock(r, NAME("lost/2"), SHMLOCK_EXCLUSIVE, SHMLOCK_NO_WAIT, NULL, &x),
           SHMLOCK_CONNECTION);
    CHECK(shmlock_guard_lost(l));
    CHECK(!shmlock_guard_lost(k));
    int s = shmlock_unlock(l);
    CHECK(s == SHMLOCK_CONNECTION || s == SHMLOCK_NOT_HELD);
    OK(shmlock_unlock(k));
    shmlock_close(local);
    shmlock_close(r);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "hold") == 0) return hold(argv[2], argv[3], argv[4]);
    if (argc == 5 && strcmp(argv[1], "busy") == 0) return busy(argv[2], argv[3], argv[4]);
    if (argc == 4 && strcmp(argv[1], "shared") == 0) return shared(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "died") == 0) return died(argv[2], argv[3]);
    if (argc == 4 && strcmp(argv[1], "fork") == 0) return forked(argv[2], argv[3]);
    if (argc == 3 && strcmp(argv[1], "args") == 0) return args(argv[2]);
    if (argc == 3 && strcmp(argv[1], "threads") == 0) return threads(argv[2]);
    if (argc == 4 && strcmp(argv[1], "remote") == 0) return remote(argv[2], argv[3]);
    if (argc == 3 && strcmp(argv[1], "cells") == 0) return cells(argv[2]);
    if (argc == 4 && strcmp(argv[1], "lost") == 0) return lost(argv[2], argv[3]);
    fprintf(stderr, "usage: see the comment at the top of cases.c\n");
    return 2;
}
