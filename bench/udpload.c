/* udpload: the UDP side of scripts/bench — an echo backend and a load generator.
 *
 *   udpload echo  PORT                         echo every datagram on 127.0.0.1:PORT
 *   udpload load  PORT CLIENTS SECONDS [new [FILE]]
 *                                              CLIENTS sockets each keep one request in
 *                                              flight; with "new" every request comes from a
 *                                              fresh socket (a new source port), like DNS;
 *                                              with FILE every request is that file's bytes
 *                                              (up to 2048: a QUIC Initial, say), and a reply
 *                                              must equal them
 *   udpload sessions PORT N HOLD               N sockets each send one datagram, in batches of
 *                                              200 (each batch waits for its replies, up to 2 s),
 *                                              then hold the sockets open until stdin closes or
 *                                              HOLD seconds pass
 * load prints: "<replies> <bad> <timeouts> <seconds>" — a reply must equal its request byte for
 * byte; a late reply to a request that was already re-sent is ignored (neither good nor bad).
 * sessions prints "ready <replies> <bad> <missing>" once every batch is done.
 * Traffic goes to 127.0.0.1 only. Every loop is bounded by SECONDS / HOLD.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 64
#define MAXC 4096

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static int echo(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1, big = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    struct sockaddr_in a = addr_of(port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    static char bufs[64][2048];
    struct sockaddr_in from[64];
    for (;;) {
        for (int i = 0; i < 64; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = sizeof bufs[i];
            memset(&msgs[i], 0, sizeof msgs[i]);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int n = recvmmsg(fd, msgs, 64, MSG_WAITFORONE, NULL);
        if (n < 0) { if (errno == EINTR) continue; perror("recvmmsg"); return 1; }
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        sendmmsg(fd, msgs, n, 0);
    }
}

struct client { int fd; uint64_t seq; double sent; };

static int open_client(int ep, struct sockaddr_in *dst, struct client *c, int idx) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)dst, sizeof *dst) < 0) { close(fd); return -1; }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    c->fd = fd;
    return 0;
}

static char fixed[2048];              /* load ... new FILE: every request is these bytes */
static ssize_t fixed_len = -1;

static void fill(char *buf, uint64_t seq, int idx) {
    memset(buf, 'a' + idx % 26, PAYLOAD);
    memcpy(buf, &seq, sizeof seq);
}

static void send_req(struct client *c, int idx) {
    char buf[PAYLOAD];
    c->sent = now();
    if (fixed_len >= 0) { send(c->fd, fixed, fixed_len, 0); return; }
    fill(buf, c->seq, idx);
    send(c->fd, buf, sizeof buf, 0);
}

/* 1: the reply to the request in flight; 0: a late reply to an earlier (re-sent) one; -1: bad */
static int check_reply(const char *buf, ssize_t got, uint64_t want, int idx) {
    char expect[PAYLOAD];
    uint64_t seq;
    if (fixed_len >= 0)               /* fixed requests: a fresh socket's reply is its request's */
        return got == fixed_len && memcmp(buf, fixed, fixed_len) == 0 ? 1 : -1;
    if (got != PAYLOAD) return -1;
    memcpy(&seq, buf, sizeof seq);
    fill(expect, seq, idx);
    if (memcmp(buf, expect, PAYLOAD) != 0) return -1;
    if (seq == want) return 1;
    return seq < want ? 0 : -1;
}

static int load(int port, int nclients, double seconds, int fresh) {
    if (nclients > MAXC) nclients = MAXC;
    struct sockaddr_in dst = addr_of(port);
    int ep = epoll_create1(0);
    static struct client cs[MAXC];
    for (int i = 0; i < nclients; i++) {
        if (open_client(ep, &dst, &cs[i], i) < 0) { perror("socket"); return 1; }
        cs[i].seq = 0;
        send_req(&cs[i], i);
    }
    uint64_t replies = 0, bad = 0, timeouts = 0;
    double start = now(), end = start + seconds, last_check = start;
    struct epoll_event evs[256];
    char buf[2048];
    while (now() < end) {
        int n = epoll_wait(ep, evs, 256, 10);
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            struct client *c = &cs[i];
            ssize_t got = recv(c->fd, buf, sizeof buf, 0);
            if (got < 0) continue;
            int ok = check_reply(buf, got, c->seq, i);
            if (ok < 0) bad++;
            if (ok <= 0) continue;
            replies++;
            c->seq++;
            if (fresh) {
                close(c->fd);
                if (open_client(ep, &dst, c, i) < 0) { perror("socket"); return 1; }
            }
            send_req(c, i);
        }
        double t = now();
        if (t - last_check > 0.1) {          /* a lost datagram: count it and send again */
            last_check = t;
            for (int i = 0; i < nclients; i++)
                if (t - cs[i].sent > 1.0) { timeouts++; cs[i].seq++; send_req(&cs[i], i); }
        }
    }
    printf("%llu %llu %llu %.3f\n", (unsigned long long)replies, (unsigned long long)bad,
           (unsigned long long)timeouts, now() - start);
    return 0;
}

#define BATCH 200

static int sessions(int port, int n, double hold) {
    struct sockaddr_in dst = addr_of(port);
    struct client *cs = calloc(n, sizeof *cs);
    char *done = calloc(n, 1);
    int ep = epoll_create1(0);
    uint64_t replies = 0, bad = 0, missing = 0;
    struct epoll_event evs[256];
    char buf[2048];
    if (!cs || !done || ep < 0) { perror("setup"); return 1; }
    for (int b = 0; b < n; b += BATCH) {
        int end_i = b + BATCH < n ? b + BATCH : n, waiting = end_i - b;
        for (int i = b; i < end_i; i++) {
            if (open_client(ep, &dst, &cs[i], i) < 0) { perror("socket"); return 1; }
            cs[i].seq = 0;
            send_req(&cs[i], i);
        }
        double deadline = now() + 2.0;
        while (waiting > 0 && now() < deadline) {
            int k = epoll_wait(ep, evs, 256, 20);
            for (int e = 0; e < k; e++) {
                int i = evs[e].data.u32;
                ssize_t got = recv(cs[i].fd, buf, sizeof buf, 0);
                if (got < 0) continue;
                if (done[i] || check_reply(buf, got, 0, i) != 1) { bad++; continue; }
                done[i] = 1; replies++; waiting--;
            }
        }
        missing += waiting;
        usleep(5000);                 /* let the proxy's receive queue drain between batches */
    }
    printf("ready %llu %llu %llu\n", (unsigned long long)replies, (unsigned long long)bad,
           (unsigned long long)missing);
    fflush(stdout);
    struct pollfd in = {.fd = 0, .events = POLLIN};
    double end = now() + hold;
    while (now() < end) {             /* hold until stdin closes (or HOLD seconds) */
        int r = poll(&in, 1, 100);
        if (r > 0) {
            if (read(0, buf, sizeof buf) <= 0) break;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "echo")) return echo(atoi(argv[2]));
    if (argc >= 5 && !strcmp(argv[1], "load")) {
        if (argc > 6) {
            FILE *f = fopen(argv[6], "rb");
            if (!f) { perror(argv[6]); return 1; }
            fixed_len = fread(fixed, 1, sizeof fixed, f);
            fclose(f);
        }
        return load(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), argc > 5 && !strcmp(argv[5], "new"));
    }
    if (argc >= 5 && !strcmp(argv[1], "sessions"))
        return sessions(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: udpload echo PORT | udpload load PORT CLIENTS SECONDS [new [FILE]]"
                    " | udpload sessions PORT N HOLD\n");
    return 2;
}
