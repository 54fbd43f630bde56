/*
 * smtp_load.c: the load client of bench/smtp_load.py, in C, for figures the client itself
 * does not disturb.
 *
 * The Python client takes 0.3-0.6 of a core of the two this machine has; the issue's
 * reference figures came from Postfix's smtp-source, a C client that takes almost none.
 * smtp-source cannot vary the sender per message nor report latencies, so this client replays
 * the messages smtp_load.build_messages() wrote to a file, with the same dialogue as the Python
 * client: one connection per message, EHLO, MAIL, RCPT, DATA, the message, QUIT, no
 * pipelining, no retry; the latency of a message runs from its connect() to the reply to its
 * final dot.
 *
 *   smtp_load_c HOST PORT[,PORT...] SESSIONS FILE TIMEOUT_S EHLO_NAME RCPT
 *
 * With several ports, session k delivers to port k mod n (several intake instances behind one
 * MX), as the Python client's ``also``.
 * FILE holds records: a 4-byte little-endian length and the sender, a 4-byte length and the
 * data (ending with "\r\n.\r\n"). Output, one item a line:
 *   L <nanoseconds>   latency of a message answered 250
 *   C <key> <count>   replies to the final dot ("250", "451"), earlier refusals ("RCPT:550"),
 *                     errors ("error:timeout", "error:ConnectionResetError")
 *   T <sent> <elapsed_ns> <cpu_user_s> <cpu_system_s>
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum stage { CONNECTING, GREETING, EHLO, MAIL, RCPT, DATA, BODY, QUIT };
static const char *STAGE_NAME[] = {"connect", "connect", "EHLO", "MAIL", "RCPT", "DATA", "BODY", "QUIT"};

struct msg {
    const char *sender;
    uint32_t sender_len;
    const char *data;
    uint32_t data_len;
};

struct slot {
    int fd;
    int target; /* index into addrs */
    enum stage stage;
    long msg;
    uint64_t t0;
    char in[8192];
    size_t in_len;
    const char *out; /* bytes still to write */
    size_t out_len;
    char cmd[1100];
};

static struct msg *msgs;
static long n_msgs, next_msg, sent;
static uint64_t *lat;
static long n_lat;
#define MAX_TARGETS 16
static struct sockaddr_in addrs[MAX_TARGETS];
static int n_targets;
static int ep;
static char ehlo_cmd[300], rcpt_cmd[600];
static uint64_t timeout_ns;

#define MAX_KEYS 64
static char keys[MAX_KEYS][48];
static long counts[MAX_KEYS];
static int n_keys;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void count(const char *key) {
    for (int i = 0; i < n_keys; i++)
        if (strcmp(keys[i], key) == 0) {
            counts[i]++;
            return;
        }
    if (n_keys < MAX_KEYS) {
        snprintf(keys[n_keys], sizeof keys[0], "%s", key);
        counts[n_keys++] = 1;
    }
}

static void finish(struct slot *s) {
    if (s->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
    }
    s->fd = -1;
}

static int start(struct slot *s, long idx);

static void next(struct slot *s) {
    finish(s);
    while (next_msg < n_msgs) {
        if (start(s, next_msg++) == 0)
            return;
    }
}

static void fail(struct slot *s, const char *key) {
    count(key);
    next(s);
}

/* Queue bytes and write what the socket takes now; the rest when it is writable. */
static int send_bytes(struct slot *s, const char *p, size_t n) {
    s->out = p;
    s->out_len = n;
    while (s->out_len) {
        ssize_t w = send(s->fd, s->out, s->out_len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = s};
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                return 0;
            }
            return -1;
        }
        s->out += w;
        s->out_len -= (size_t)w;
    }
    return 0;
}

static int start(struct slot *s, long idx) {
    s->msg = idx;
    s->in_len = 0;
    s->out_len = 0;
    s->t0 = now_ns();
    sent++;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        count("error:OSError");
        return -1;
    }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* as asyncio's transports */
    s->stage = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    struct sockaddr_in *addr = &addrs[s->target];
    if (connect(s->fd, (struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        count("error:ConnectionRefusedError");
        return -1;
    }
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

/* One complete reply in s->in: its code, or 0 while it is incomplete. Consumes it. */
static int take_reply(struct slot *s) {
    size_t pos = 0;
    while (1) {
        char *eol = memchr(s->in + pos, '\n', s->in_len - pos);
        if (!eol)
            return 0;
        size_t line_len = (size_t)(eol - (s->in + pos)) + 1;
        if (line_len < 4 || s->in[pos + 3] != '-') {
            int code = line_len >= 3 ? atoi((char[]){s->in[pos], s->in[pos + 1], s->in[pos + 2], 0}) : -1;
            pos += line_len;
            memmove(s->in, s->in + pos, s->in_len - pos);
            s->in_len -= pos;
            return code > 0 ? code : -1;
        }
        pos += line_len;
    }
}

static void on_reply(struct slot *s, int code) {
    struct msg *m = &msgs[s->msg];
    char key[48];
    int want = s->stage == DATA ? 354 : s->stage == GREETING ? 220 : s->stage == QUIT ? 221 : 250;
    if (s->stage == QUIT) { /* the message is settled whatever QUIT gets */
        next(s);
        return;
    }
    if (s->stage == BODY) {
        snprintf(key, sizeof key, "%d", code);
        count(key);
        if (code == 250)
            lat[n_lat++] = now_ns() - s->t0;
        s->stage = QUIT;
        if (send_bytes(s, "QUIT\r\n", 6) < 0)
            next(s);
        return;
    }
    if (code != want) {
        snprintf(key, sizeof key, "%s:%d", STAGE_NAME[s->stage], code);
        send(s->fd, "QUIT\r\n", 6, MSG_NOSIGNAL);
        fail(s, key);
        return;
    }
    int r = 0;
    switch (s->stage) {
    case GREETING:
        s->stage = EHLO;
        r = send_bytes(s, ehlo_cmd, strlen(ehlo_cmd));
        break;
    case EHLO: {
        int n = snprintf(s->cmd, sizeof s->cmd, "MAIL FROM:<%.*s>\r\n", (int)m->sender_len, m->sender);
        s->stage = MAIL;
        r = send_bytes(s, s->cmd, (size_t)n);
        break;
    }
    case MAIL:
        s->stage = RCPT;
        r = send_bytes(s, rcpt_cmd, strlen(rcpt_cmd));
        break;
    case RCPT:
        s->stage = DATA;
        r = send_bytes(s, "DATA\r\n", 6);
        break;
    case DATA:
        s->stage = BODY;
        r = send_bytes(s, m->data, m->data_len);
        break;
    default:
        break;
    }
    if (r < 0)
        fail(s, "error:ConnectionResetError");
}

static void on_event(struct slot *s, uint32_t events) {
    if (s->stage == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fail(s, "error:ConnectionRefusedError");
            return;
        }
        s->stage = GREETING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        return;
    }
    if ((events & EPOLLOUT) && s->out_len) {
        if (send_bytes(s, s->out, s->out_len) < 0) {
            fail(s, "error:ConnectionResetError");
            return;
        }
        if (!s->out_len) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
            epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        }
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        return;
    ssize_t r = recv(s->fd, s->in + s->in_len, sizeof s->in - s->in_len, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (s->stage == QUIT)
            next(s);
        else
            fail(s, "error:ConnectionResetError");
        return;
    }
    s->in_len += (size_t)r;
    int code;
    while (s->fd >= 0 && (code = take_reply(s)) != 0) {
        if (code < 0) {
            fail(s, "error:ValueError");
            return;
        }
        on_reply(s, code);
    }
    if (s->fd >= 0 && s->in_len == sizeof s->in)
        fail(s, "error:ValueError"); /* a reply line longer than the buffer */
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT[,PORT...] SESSIONS FILE TIMEOUT_S EHLO_NAME RCPT\n", argv[0]);
        return 2;
    }
    for (char *port = strtok(argv[2], ","); port && n_targets < MAX_TARGETS; port = strtok(NULL, ",")) {
        struct sockaddr_in *a = &addrs[n_targets++];
        memset(a, 0, sizeof *a);
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)atoi(port));
        if (inet_pton(AF_INET, argv[1], &a->sin_addr) != 1) {
            fprintf(stderr, "not an IPv4 address: %s\n", argv[1]);
            return 2;
        }
    }
    if (n_targets == 0) {
        fprintf(stderr, "no port given\n");
        return 2;
    }
    int sessions = atoi(argv[3]);
    if (sessions < 1)
        sessions = 1;
    timeout_ns = (uint64_t)(atof(argv[5]) * 1e9);
    snprintf(ehlo_cmd, sizeof ehlo_cmd, "EHLO %s\r\n", argv[6]);
    snprintf(rcpt_cmd, sizeof rcpt_cmd, "RCPT TO:<%s>\r\n", argv[7]);

    int fd = open(argv[4], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[4]);
        return 2;
    }
    char *buf = malloc((size_t)st.st_size + 1);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
        if (r <= 0) {
            perror("read");
            return 2;
        }
        got += (size_t)r;
    }
    close(fd);
    long cap = 1024;
    msgs = malloc(sizeof *msgs * (size_t)cap);
    for (size_t p = 0; p + 8 <= got;) {
        if (n_msgs == cap) {
            cap *= 2;
            msgs = realloc(msgs, sizeof *msgs * (size_t)cap);
        }
        struct msg *m = &msgs[n_msgs++];
        memcpy(&m->sender_len, buf + p, 4);
        m->sender = buf + p + 4;
        p += 4 + m->sender_len;
        memcpy(&m->data_len, buf + p, 4);
        m->data = buf + p + 4;
        p += 4 + m->data_len;
        if (p > got || m->sender_len > 1000) {
            fprintf(stderr, "%s: truncated record %ld\n", argv[4], n_msgs);
            return 2;
        }
    }
    lat = malloc(sizeof *lat * (size_t)(n_msgs + 1));

    ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc((size_t)sessions, sizeof *slots);
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t0 = now_ns();
    for (int i = 0; i < sessions; i++) {
        slots[i].fd = -1;
        slots[i].target = i % n_targets;
        next(&slots[i]);
    }
    struct epoll_event evs[256];
    while (1) {
        int active = 0;
        uint64_t now = now_ns();
        for (int i = 0; i < sessions; i++) {
            if (slots[i].fd < 0)
                continue;
            if (now - slots[i].t0 > timeout_ns && slots[i].stage != QUIT)
                fail(&slots[i], "error:timeout");
            else if (now - slots[i].t0 > 2 * timeout_ns)
                next(&slots[i]);
            active += slots[i].fd >= 0;
        }
        if (!active)
            break;
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++)
            on_event((struct slot *)evs[i].data.ptr, evs[i].events);
    }
    uint64_t elapsed = now_ns() - t0;
    getrusage(RUSAGE_SELF, &ru1);
    double user = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double sys = (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    for (long i = 0; i < n_lat; i++)
        printf("L %llu\n", (unsigned long long)lat[i]);
    for (int i = 0; i < n_keys; i++)
        printf("C %s %ld\n", keys[i], counts[i]);
    printf("T %ld %llu %.6f %.6f\n", sent, (unsigned long long)elapsed, user, sys);
    return 0;
}
