/*
 * exact_server: a streaming OpenAI-compatible chat-completions server with exact timing.
 *
 * The "truth" for benchmarking a client's latency accuracy (batchgen bench): every streamed
 * request gets its first content token at exactly t0 + ttft and token k at t0 + ttft + k * itl,
 * t0 being the moment the request's last bytes reached this host's socket: the kernel's receive
 * timestamp (SO_TIMESTAMPNS), not the moment this server's thread got round to reading them, so
 * a thread that wakes late (a busy host) shows as the server's lateness, not as the client's. The
 * server measures how late each token actually left (monotonic time just after send() returned,
 * minus its scheduled time) and reports that at GET /stats, the first tokens apart as well (they
 * carry the TTFT), so a benchmark can tell server-side error from client-side error.
 *
 * Usage:
 *   exact_server --port P [--host 127.0.0.1] [--ttft-ms 50] [--itl-ms 10] [--tokens 64]
 *                [--report PATH]
 *
 *   --port 0 picks a free port. On startup one line "listening on PORT" goes to stdout.
 *   SIGTERM / SIGINT: write the stats JSON to --report PATH (if given), exit 0.
 *
 * Endpoints:
 *   GET  /v1/models              one model, "exact"
 *   POST /v1/chat/completions    SSE stream (always streamed), chunked transfer encoding;
 *                                tokens = min(max_completion_tokens or max_tokens, --tokens)
 *   GET  /stats                  {"requests":R,"tokens":T,"lateness_ms":{mean,p50,p99,max,...},
 *                                 "first_token_lateness_ms":{...}, "kernel_timestamps":K}
 *   POST|GET /stats/reset        zero the stats
 *   GET  /health                 200
 *
 * Design: HTTP/1.1 keep-alive, one detached pthread per connection (64 KiB stacks, so thousands
 * of connections are cheap), TCP_NODELAY on every socket, each SSE event is one HTTP chunk written
 * with one send() call, sleeps are clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) to absolute
 * deadlines (errors do not accumulate), and the timer slack is set to 1 ns (Linux's default
 * 50 us slack would otherwise delay every wake-up).
 *
 * Build: gcc -O2 -Wall -Wextra -pthread -o exact_server exact_server.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#define THREAD_STACK (64 * 1024)
#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_BODY_BYTES (64L * 1024 * 1024)
#define BUCKET_NS 10000LL      /* 10 us histogram buckets */
#define NBUCKETS 10000         /* up to 100 ms; one more bucket for everything beyond */

/* ---------------------------------------------------------------- configuration */

static long long g_ttft_ns = 50LL * 1000000;
static long long g_itl_ns = 10LL * 1000000;
static long g_tokens = 64;
static const char *g_report = NULL;

/* ---------------------------------------------------------------- stats */

struct lateness {
    unsigned long long count;
    long long sum_ns;
    long long max_ns;
    unsigned long long hist[NBUCKETS + 1];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long long g_requests;  /* streams finished ([DONE] sent) */
static unsigned long long g_aborted;   /* streams the client closed before the end */
static unsigned long long g_stamped;   /* requests whose t0 is the kernel's receive timestamp */
static struct lateness g_all;          /* every content token */
static struct lateness g_first;        /* first content tokens only: the TTFT's */

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(long long deadline_ns) {
    struct timespec ts;
    ts.tv_sec = deadline_ns / 1000000000LL;
    ts.tv_nsec = deadline_ns % 1000000000LL;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void add_lateness(struct lateness *l, long long late_ns, long long b) {
    l->count++;
    l->sum_ns += late_ns;
    if (late_ns > l->max_ns) l->max_ns = late_ns;
    l->hist[b]++;
}

static void record_lateness(long long late_ns, int first) {
    if (late_ns < 0) late_ns = 0;
    long long b = late_ns / BUCKET_NS;
    if (b > NBUCKETS) b = NBUCKETS;
    pthread_mutex_lock(&g_lock);
    add_lateness(&g_all, late_ns, b);
    if (first) add_lateness(&g_first, late_ns, b);
    pthread_mutex_unlock(&g_lock);
}

static void count_request(int finished, int stamped) {
    pthread_mutex_lock(&g_lock);
    if (finished) g_requests++;
    else g_aborted++;
    if (stamped) g_stamped++;
    pthread_mutex_unlock(&g_lock);
}

static void reset_stats(void) {
    pthread_mutex_lock(&g_lock);
    g_requests = g_aborted = g_stamped = 0;
    memset(&g_all, 0, sizeof g_all);
    memset(&g_first, 0, sizeof g_first);
    pthread_mutex_unlock(&g_lock);
}

/* The upper edge of the bucket holding the q-quantile (capped at the exact max), in ms. */
static double quantile_ms(const unsigned long long *hist, unsigned long long count, long long max_ns,
                          double q) {
    if (count == 0) return 0.0;
    double exact = q * (double)count;
    unsigned long long rank = (unsigned long long)exact;
    if ((double)rank < exact) rank++; /* ceil: the smallest value with >= q of the counts at or below */
    if (rank < 1) rank = 1;
    if (rank > count) rank = count;
    unsigned long long seen = 0;
    for (int i = 0; i <= NBUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank) {
            long long edge = (i == NBUCKETS) ? max_ns : (long long)(i + 1) * BUCKET_NS;
            if (edge > max_ns) edge = max_ns;
            return (double)edge / 1e6;
        }
    }
    return (double)max_ns / 1e6;
}

/* One lateness object, {"mean":..,"p50":..,..}, into out; returns its length. */
static int lateness_json(char *out, size_t size, const struct lateness *l) {
    double mean = l->count ? (double)l->sum_ns / (double)l->count / 1e6 : 0.0;
    return snprintf(out, size, "{\"mean\":%.4f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.4f}",
                    mean, quantile_ms(l->hist, l->count, l->max_ns, 0.5),
                    quantile_ms(l->hist, l->count, l->max_ns, 0.9), quantile_ms(l->hist, l->count, l->max_ns, 0.99),
                    quantile_ms(l->hist, l->count, l->max_ns, 0.999), (double)l->max_ns / 1e6);
}

/* Writes the stats JSON (no trailing newline) into out; returns its length. */
static int stats_json(char *out, size_t size) {
    static struct lateness all, first; /* copies, taken under the lock: callers serialise */
    static pthread_mutex_t copy_lock = PTHREAD_MUTEX_INITIALIZER;
    char all_json[256], first_json[256];
    pthread_mutex_lock(&copy_lock);
    pthread_mutex_lock(&g_lock);
    unsigned long long requests = g_requests, aborted = g_aborted, stamped = g_stamped;
    all = g_all;
    first = g_first;
    pthread_mutex_unlock(&g_lock);
    lateness_json(all_json, sizeof all_json, &all);
    lateness_json(first_json, sizeof first_json, &first);
    int n = snprintf(out, size,
                     "{\"requests\":%llu,\"aborted\":%llu,\"tokens\":%llu,\"kernel_timestamps\":%llu,"
                     "\"lateness_ms\":%s,\"first_token_lateness_ms\":%s,"
                     "\"config\":{\"ttft_ms\":%.3f,\"itl_ms\":%.3f,\"tokens\":%ld}}",
                     requests, aborted, all.count, stamped, all_json, first_json, (double)g_ttft_ns / 1e6,
                     (double)g_itl_ns / 1e6, g_tokens);
    pthread_mutex_unlock(&copy_lock);
    return n;
}

/* ---------------------------------------------------------------- I/O helpers */

/* Sends all of buf (normally in one send() call); 0 on success, -1 if the peer is gone. */
static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

struct conn {
    int fd;
    char *buf;   /* bytes received and not consumed yet */
    size_t len;
    size_t cap;
    long long arrived_ns; /* CLOCK_MONOTONIC of the last bytes' arrival in the kernel; 0 = unknown */
};

/* A CLOCK_REALTIME kernel timestamp on the CLOCK_MONOTONIC axis (the offset read now: ~1 us). */
static long long realtime_to_monotonic(const struct timespec *ts) {
    struct timespec rt;
    clock_gettime(CLOCK_REALTIME, &rt);
    long long mono = now_ns();
    long long rt_ns = (long long)rt.tv_sec * 1000000000LL + rt.tv_nsec;
    return mono - (rt_ns - ((long long)ts->tv_sec * 1000000000LL + ts->tv_nsec));
}

/* Receives more bytes into c->buf; returns bytes read, 0 on EOF, -1 on error. */
static ssize_t conn_fill(struct conn *c) {
    if (c->len == c->cap) {
        size_t cap = c->cap * 2;
        char *p = realloc(c->buf, cap + 1);
        if (!p) return -1;
        c->buf = p;
        c->cap = cap;
    }
    for (;;) {
        /* recvmsg for the kernel's receive timestamp (SO_TIMESTAMPNS) of what is read */
        struct iovec iov = {c->buf + c->len, c->cap - c->len};
        char control[CMSG_SPACE(sizeof(struct timespec))];
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        ssize_t n = recvmsg(c->fd, &msg, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n > 0) {
            c->len += (size_t)n;
            c->buf[c->len] = '\0';
            c->arrived_ns = 0;
            for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
                if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(cm), sizeof ts);
                    c->arrived_ns = realtime_to_monotonic(&ts);
                }
            }
        }
        return n;
    }
}

static void conn_consume(struct conn *c, size_t n) {
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    c->buf[c->len] = '\0';
}

static int send_response(int fd, int status, const char *reason, const char *ctype, const char *body,
                         int keep_alive) {
    char head[512];
    size_t blen = strlen(body);
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n", status, reason,
                     ctype, blen, keep_alive ? "" : "Connection: close\r\n");
    size_t total = (size_t)h + blen;
    char stackbuf[2048];
    char *out = total <= sizeof stackbuf ? stackbuf : malloc(total);
    if (!out) return -1;
    memcpy(out, head, (size_t)h);
    memcpy(out + h, body, blen);
    int rc = send_all(fd, out, total);
    if (out != stackbuf) free(out);
    return rc;
}

static int send_error(int fd, int status, const char *reason, const char *message, int keep_alive) {
    char body[512];
    snprintf(body, sizeof body, "{\"error\":{\"message\":\"%s\",\"type\":\"invalid_request_error\",\"code\":%d}}",
             message, status);
    return send_response(fd, status, reason, "application/json", body, keep_alive);
}

/* Frames data (an SSE event) as one HTTP chunk in out; returns the framed length. */
static int chunk(char *out, size_t size, const char *event, int elen) {
    int h = snprintf(out, size, "%x\r\n", (unsigned)elen);
    if ((size_t)(h + elen + 2) >= size) return -1;
    memcpy(out + h, event, (size_t)elen);
    memcpy(out + h + elen, "\r\n", 2);
    return h + elen + 2;
}

/* ---------------------------------------------------------------- request parsing */

/* The integer after "key" followed by optional whitespace, ':' and whitespace; -1 if absent.
 * Occurrences preceded by a backslash (inside a JSON string) are skipped. */
static long json_int(const char *body, size_t len, const char *key) {
    size_t klen = strlen(key);
    const char *end = body + len;
    for (const char *p = body; p && p + klen <= end; p++) {
        p = memmem(p, (size_t)(end - p), key, klen);
        if (!p) return -1;
        if (p > body && p[-1] == '\\') continue;
        const char *q = p + klen;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
        if (q >= end || *q != ':') continue;
        q++;
        while (q < end && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\n')) q++;
        if (q >= end || *q < '0' || *q > '9') continue;
        long v = 0;
        while (q < end && *q >= '0' && *q <= '9') {
            if (v < LONG_MAX / 10) v = v * 10 + (*q - '0');
            q++;
        }
        return v;
    }
    return -1;
}

/* The value of header name (case-insensitive) in the header block; copies at most size-1 bytes. */
static int header_value(const char *headers, const char *name, char *out, size_t size) {
    size_t nlen = strlen(name);
    const char *p = headers;
    while ((p = strstr(p, "\r\n")) != NULL) {
        p += 2;
        if (p[0] == '\r' && p[1] == '\n') break;
        if (strncasecmp(p, name, nlen) == 0 && p[nlen] == ':') {
            const char *v = p + nlen + 1;
            while (*v == ' ' || *v == '\t') v++;
            const char *e = strstr(v, "\r\n");
            size_t n = e ? (size_t)(e - v) : strlen(v);
            while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
            if (n >= size) n = size - 1;
            memcpy(out, v, n);
            out[n] = '\0';
            return 1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- the stream */

#define EVENT_PREFIX "data: {\"id\":\"chatcmpl-x\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"exact\","

/* Streams one completion; returns 0 if it went to the end, -1 if the client went away. */
static int stream_completion(int fd, long long t0, long ntokens, const char *finish) {
    char event[768];
    char out[1024];
    int n, m;

    /* headers and the role chunk: one send, right away */
    n = snprintf(event, sizeof event,
                 EVENT_PREFIX "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                              "\"finish_reason\":null}]}\n\n");
    int h = snprintf(out, sizeof out,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n");
    m = chunk(out + h, sizeof out - (size_t)h, event, n);
    if (send_all(fd, out, (size_t)(h + m)) < 0) return -1;

    for (long k = 0; k < ntokens; k++) {
        n = snprintf(event, sizeof event,
                     EVENT_PREFIX "\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok\"},\"finish_reason\":null}],"
                                  "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":%ld,\"total_tokens\":%ld}}\n\n",
                     k + 1, 11 + k);
        m = chunk(out, sizeof out, event, n);
        long long due = t0 + g_ttft_ns + k * g_itl_ns;
        sleep_until(due);
        if (send_all(fd, out, (size_t)m) < 0) return -1;
        record_lateness(now_ns() - due, k == 0);
    }

    n = snprintf(event, sizeof event,
                 EVENT_PREFIX "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"%s\"}],"
                              "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":%ld,\"total_tokens\":%ld}}\n\n",
                 finish, ntokens, 10 + ntokens);
    m = chunk(out, sizeof out, event, n);
    if (send_all(fd, out, (size_t)m) < 0) return -1;

    n = snprintf(event, sizeof event,
                 EVENT_PREFIX "\"choices\":[],"
                              "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":%ld,\"total_tokens\":%ld}}\n\n",
                 ntokens, 10 + ntokens);
    m = chunk(out, sizeof out, event, n);
    if (send_all(fd, out, (size_t)m) < 0) return -1;

    static const char done[] = "data: [DONE]\n\n";
    m = chunk(out, sizeof out, done, (int)(sizeof done - 1));
    if (send_all(fd, out, (size_t)m) < 0) return -1;
    if (send_all(fd, "0\r\n\r\n", 5) < 0) return -1;
    return 0;
}

/* ---------------------------------------------------------------- a connection */

static void *serve_connection(void *arg) {
    struct conn c;
    c.fd = (int)(intptr_t)arg;
    c.cap = 8192;
    c.len = 0;
    c.arrived_ns = 0;
    c.buf = malloc(c.cap + 1);
    if (!c.buf) {
        close(c.fd);
        return NULL;
    }
    c.buf[0] = '\0';

    for (;;) {
        /* the header block */
        char *hend;
        while ((hend = strstr(c.buf, "\r\n\r\n")) == NULL) {
            if (c.len > MAX_HEADER_BYTES) {
                send_error(c.fd, 431, "Request Header Fields Too Large", "headers too large", 0);
                goto out;
            }
            if (conn_fill(&c) <= 0) goto out;
        }
        size_t hlen = (size_t)(hend - c.buf) + 4;

        char method[16], target[1024], version[16];
        if (sscanf(c.buf, "%15s %1023s %15s", method, target, version) != 3) {
            send_error(c.fd, 400, "Bad Request", "bad request line", 0);
            goto out;
        }
        char *qs = strchr(target, '?');
        if (qs) *qs = '\0';

        /* the headers are NUL-terminated in place for header_value() */
        char saved = c.buf[hlen - 2];
        c.buf[hlen - 2] = '\0';
        char value[256];
        int keep_alive = strcmp(version, "HTTP/1.0") != 0;
        if (header_value(c.buf, "Connection", value, sizeof value)) {
            if (strcasestr(value, "close")) keep_alive = 0;
            else if (strcasestr(value, "keep-alive")) keep_alive = 1;
        }
        int chunked_req = header_value(c.buf, "Transfer-Encoding", value, sizeof value) &&
                          strcasestr(value, "chunked") != NULL;
        long clen = 0;
        if (header_value(c.buf, "Content-Length", value, sizeof value)) clen = strtol(value, NULL, 10);
        int expect_continue = header_value(c.buf, "Expect", value, sizeof value) &&
                              strcasecmp(value, "100-continue") == 0;
        c.buf[hlen - 2] = saved;

        if (chunked_req) {
            send_error(c.fd, 411, "Length Required", "chunked request bodies are not supported", 0);
            goto out;
        }
        if (clen < 0 || clen > MAX_BODY_BYTES) {
            send_error(c.fd, 413, "Payload Too Large", "body too large", 0);
            goto out;
        }
        if (expect_continue && clen > 0 && c.len < hlen + (size_t)clen) {
            if (send_all(c.fd, "HTTP/1.1 100 Continue\r\n\r\n", 25) < 0) goto out;
        }

        /* the body, fully */
        conn_consume(&c, hlen);
        while (c.len < (size_t)clen) {
            if (c.cap < (size_t)clen) {
                char *p = realloc(c.buf, (size_t)clen + 1);
                if (!p) goto out;
                c.buf = p;
                c.cap = (size_t)clen;
            }
            if (conn_fill(&c) <= 0) goto out;
        }
        /* the kernel's arrival time of the request's last bytes; a sane one only (never ahead of
           now, nor seconds old, e.g. bytes that came with the previous request) */
        long long t0 = now_ns();
        int stamped = c.arrived_ns > 0 && c.arrived_ns <= t0 && t0 - c.arrived_ns < 1000000000LL;
        if (stamped) t0 = c.arrived_ns;
        const char *body = c.buf;
        size_t blen = (size_t)clen;

        int rc = 0;
        if (strcmp(target, "/v1/chat/completions") == 0 && strcmp(method, "POST") == 0) {
            long want = json_int(body, blen, "\"max_completion_tokens\"");
            if (want < 0) want = json_int(body, blen, "\"max_tokens\"");
            long ntokens = g_tokens;
            const char *finish = "stop";
            if (want >= 0 && want < g_tokens) {
                ntokens = want;
                finish = "length";
            }
            conn_consume(&c, blen);
            rc = stream_completion(c.fd, t0, ntokens, finish);
            count_request(rc == 0, stamped);
        } else {
            conn_consume(&c, blen);
            if (strcmp(target, "/v1/models") == 0 && strcmp(method, "GET") == 0) {
                rc = send_response(c.fd, 200, "OK", "application/json",
                                   "{\"object\":\"list\",\"data\":[{\"id\":\"exact\",\"object\":\"model\","
                                   "\"created\":0,\"owned_by\":\"exact\",\"max_model_len\":8192}]}",
                                   keep_alive);
            } else if (strcmp(target, "/stats") == 0 && strcmp(method, "GET") == 0) {
                char json[1024];
                stats_json(json, sizeof json);
                rc = send_response(c.fd, 200, "OK", "application/json", json, keep_alive);
            } else if (strcmp(target, "/stats/reset") == 0 &&
                       (strcmp(method, "POST") == 0 || strcmp(method, "GET") == 0)) {
                reset_stats();
                rc = send_response(c.fd, 200, "OK", "application/json", "{\"reset\":true}", keep_alive);
            } else if (strcmp(target, "/health") == 0) {
                rc = send_response(c.fd, 200, "OK", "application/json", "{}", keep_alive);
            } else {
                rc = send_error(c.fd, 404, "Not Found", "not found", keep_alive);
            }
        }
        if (rc < 0 || !keep_alive) goto out;
    }
out:
    free(c.buf);
    close(c.fd);
    return NULL;
}

/* ---------------------------------------------------------------- main */

static void *accept_loop(void *arg) {
    int lfd = (int)(intptr_t)arg;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, THREAD_STACK);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                perror("exact_server: accept");
                usleep(10000);
                continue;
            }
            perror("exact_server: accept");
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
        pthread_t tid;
        int err = pthread_create(&tid, &attr, serve_connection, (void *)(intptr_t)fd);
        if (err != 0) {
            fprintf(stderr, "exact_server: pthread_create: %s\n", strerror(err));
            close(fd);
        }
    }
    return NULL;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s --port P [--host 127.0.0.1] [--ttft-ms 50] [--itl-ms 10] [--tokens 64] [--report PATH]\n",
            argv0);
    exit(2);
}

static double parse_number(const char *s, const char *flag) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end != '\0' || v < 0) {
        fprintf(stderr, "exact_server: bad value for %s: %s\n", flag, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    long port = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) usage(argv[0]);
        if (i + 1 >= argc) usage(argv[0]);
        const char *v = argv[++i];
        if (strcmp(a, "--port") == 0) port = (long)parse_number(v, a);
        else if (strcmp(a, "--host") == 0) host = v;
        else if (strcmp(a, "--ttft-ms") == 0) g_ttft_ns = (long long)(parse_number(v, a) * 1e6 + 0.5);
        else if (strcmp(a, "--itl-ms") == 0) g_itl_ns = (long long)(parse_number(v, a) * 1e6 + 0.5);
        else if (strcmp(a, "--tokens") == 0) g_tokens = (long)parse_number(v, a);
        else if (strcmp(a, "--report") == 0) g_report = v;
        else usage(argv[0]);
    }
    if (port < 0 || port > 65535) usage(argv[0]);

    signal(SIGPIPE, SIG_IGN);
#ifdef __linux__
    /* 1 ns timer slack (inherited by every thread created after this): wake-ups on time */
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
#endif
    /* SIGTERM / SIGINT are taken by sigwait() in the main thread only */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    struct addrinfo hints, *res;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%ld", port);
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "exact_server: %s: %s\n", host, gai_strerror(gai));
        return 1;
    }
    int lfd = socket(res->ai_family, SOCK_STREAM, 0);
    if (lfd < 0) {
        perror("exact_server: socket");
        return 1;
    }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, res->ai_addr, res->ai_addrlen) < 0) {
        perror("exact_server: bind");
        return 1;
    }
    freeaddrinfo(res);
    if (listen(lfd, 4096) < 0) {
        perror("exact_server: listen");
        return 1;
    }
    struct sockaddr_storage sa;
    socklen_t salen = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &salen);
    int bound = sa.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&sa)->sin6_port)
                                         : ntohs(((struct sockaddr_in *)&sa)->sin_port);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, THREAD_STACK);
    pthread_t tid;
    if (pthread_create(&tid, &attr, accept_loop, (void *)(intptr_t)lfd) != 0) {
        fprintf(stderr, "exact_server: cannot start the accept thread\n");
        return 1;
    }
    printf("listening on %d\n", bound);
    fflush(stdout);

    int sig = 0;
    sigwait(&stop, &sig);
    if (g_report) {
        char json[1024];
        int n = stats_json(json, sizeof json);
        FILE *f = fopen(g_report, "w");
        if (!f) {
            perror("exact_server: --report");
            _exit(1);
        }
        fwrite(json, 1, (size_t)n, f);
        fputc('\n', f);
        fclose(f);
    }
    _exit(0);
}
