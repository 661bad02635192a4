#include <shmlock.h>
#include <stdio.h>

int main(void) {
    shmlock_client *c; shmlock_guard *l; shmlock_grant g; char msg[256];
    if (shmlock_open(NULL, NULL, &c) != SHMLOCK_OK                 /* $SHMLOCK_SEGMENT or /shmlock */
        || shmlock_lock(c, (const uint8_t *)"orders/42", 9, SHMLOCK_EXCLUSIVE,
                        5000000000 /* ns */, &g, &l) != SHMLOCK_OK) {
        shmlock_last_error_message(msg, sizeof msg);
        return fprintf(stderr, "shmlock: %s\n", msg), 1;
    }
    printf("token %llu%s\n", (unsigned long long)g.token, g.owner_died ? " (holder died)" : "");
    shmlock_unlock(l);
    shmlock_close(c);
}
