/* The README's quick start: lock a name, read the grant, unlock. */
#include <shmlock.h>
#include <stdio.h>

int main(void) {
    shmlock_client *c;
    shmlock_guard *l;
    shmlock_grant g;
    char msg[256];
    /* NULL: the segment $SHMLOCK_SEGMENT, else /shmlock (shmlockd creates it). */
    if (shmlock_open(NULL, NULL, &c) != SHMLOCK_OK) goto fail;
    if (shmlock_lock(c, (const uint8_t *)"orders/42", 9, SHMLOCK_EXCLUSIVE, 5000000000 /* 5 s */,
                     &g, &l) != SHMLOCK_OK)
        goto fail;
    printf("locked orders/42: token %llu%s\n", (unsigned long long)g.token,
           g.owner_died ? " (the previous holder died: check the data)" : "");
    shmlock_unlock(l);
    shmlock_close(c);
    return 0;
fail:
    shmlock_last_error_message(msg, sizeof msg);
    fprintf(stderr, "shmlock: %s\n", msg);
    return 1;
}
