/* scripts/trim-cost.c -- how long one glibc malloc_trim(0) takes after 10,000 connections'
 * worth of memory was freed (docs/OPERATIONS.md, "Size a fleet"; issue 14 item 4).
 *   gcc -O2 -pthread -o /tmp/trim-cost scripts/trim-cost.c && /tmp/trim-cost 10000 1 0
 * With BUSY=1 the "shard" threads keep allocating during the trim and report their longest
 * malloc+free meanwhile: the wait a shard has when the control thread trims its arena. */
/* How long one malloc_trim(0) takes after 10,000 connections' worth of memory was freed.
 * Two "shard" threads (two glibc arenas) each allocate what their half of the connections
 * holds while awake (connection handler, two expanded session keys, buffer lists, and with
 * CHUNKS=1 one 32 KiB buffer chunk per side), interleaved as connections arrive, then free it
 * all as the connections close or hibernate; the main thread then times malloc_trim(0).
 * usage: trim-cost CONNS CHUNKS(0|1) BUSY(0|1) */
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int conns, chunks, busy;
static pthread_barrier_t freed, go;
static double max_wait[2];
static volatile int trimming = 1;

static double ms_since(struct timespec a);

static void *shard(void *arg) {
    int id = (int)(long)arg;
    int n = conns / 2;
    int per = chunks ? 6 : 4;
    void **p = calloc((size_t)n * per, sizeof(void *));
    size_t sizes[6] = {640, 720, 720, 256, 32768, 32768}; /* handler, 2 keys, lists, 2 chunks */
    for (int i = 0; i < n; i++)
        for (int k = 0; k < per; k++) {
            p[i * per + k] = malloc(sizes[k]);
            memset(p[i * per + k], 1, sizes[k]);
        }
    /* Connections that stay keep their handler: free the rest, leaving holes. */
    for (int i = 0; i < n; i++)
        for (int k = 1; k < per; k++) free(p[i * per + k]);
    pthread_barrier_wait(&freed);
    /* Keep allocating as a busy shard would while the main thread trims. */
    while (busy && trimming) {
        struct timespec a;
        clock_gettime(CLOCK_MONOTONIC, &a);
        void *x = malloc(700);
        memset(x, 2, 700);
        free(x);
        double w = ms_since(a);
        if (w > max_wait[id]) max_wait[id] = w;
    }
    pthread_barrier_wait(&go);
    for (int i = 0; i < n; i++) free(p[i * per]);
    free(p);
    return NULL;
}

static double ms_since(struct timespec a) {
    struct timespec b;
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6;
}

int main(int argc, char **argv) {
    conns = argc > 1 ? atoi(argv[1]) : 10000;
    chunks = argc > 2 ? atoi(argv[2]) : 0;
    busy = argc > 3 ? atoi(argv[3]) : 0;
    pthread_barrier_init(&freed, NULL, 3);
    pthread_barrier_init(&go, NULL, 3);
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, shard, (void *)(long)i);
    pthread_barrier_wait(&freed);
    struct timespec a;
    clock_gettime(CLOCK_MONOTONIC, &a);
    malloc_trim(0);
    double hibernated = ms_since(a);
    trimming = 0;
    pthread_barrier_wait(&go);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &a);
    malloc_trim(0);
    double closed = ms_since(a);
    printf("conns=%d chunks=%d busy=%d  trim after hibernation: %.2f ms (longest malloc+free of a shard meanwhile: %.2f / %.2f ms)  trim after close: %.2f ms\n",
           conns, chunks, busy, hibernated, max_wait[0], max_wait[1], closed);
    return 0;
}
