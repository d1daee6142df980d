/* The initial copy's data path: source `COPY ... TO STDOUT` straight into target `COPY ... FROM STDIN`,
 * between two libpq connections that psycopg2 opened, in C and without the GIL.
 *
 * No libpq at build time: see _libpq.h.
 *
 * pump(srcs, dst, copy_out_sqls, copy_in_sql, binary, chunk=0, trim=b"") -> (rows, error)
 *   srcs: PGconn pointers, each to run its copy_out_sqls[i] (e.g. one block range of a table
 *         each): their rows are merged into the ONE target COPY (see merge: one after the other
 *         while the target is the slower side, side by side where the sources are), so a big table
 *         is written by one transaction (which may use FREEZE)
 *   binary: the COPYs are binary (one header and one trailer are kept in the merged stream)
 *   chunk: rows are gathered into target CopyData messages of up to this many bytes (0: one each)
 *   trim: one flag byte per column, or empty: the flagged columns' values lose their trailing
 *         spaces on the way (char(n) columns, which the target's input pads back: see trim_row)
 *   rows: what the target's COPY reported; error: None, or ("source" | "target", message).
 * Every connection must be in a transaction and idle. After an error the caller closes them all
 * (a connection may be left mid-COPY; closing it aborts its transaction).
 */
#define PY_SSIZE_T_CLEAN
#include "_libpq.h"
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MSG 1024

/* Read results until the connection is idle; the first non-OK one's message goes to err. */
static int finish(PGconn *c, char *err)
{
    int ok = 1;
    PGresult *r;
    while ((r = pq.get_result(c)) != NULL) {
        if (pq.result_status(r) != PGRES_COMMAND_OK && ok) {
            snprintf(err, MSG, "%s", pq.result_error(r));
            ok = 0;
        }
        pq.clear(r);
    }
    return ok;
}

/* Start a COPY on c; 1 if it is in the wanted copy state. */
static int start(PGconn *c, const char *sql, int want, char *err)
{
    PGresult *r = pq.exec(c, sql);
    int status = r ? pq.result_status(r) : -1;
    if (status != want) {
        snprintf(err, MSG, "%s", r ? pq.result_error(r) : pq.error_message(c));
        if (r)
            pq.clear(r);
        return 0;
    }
    pq.clear(r);
    return 1;
}

#define MAX_SOURCES 16

static const char BINARY_SIGNATURE[11] = "PGCOPY\n\377\r\n";  /* and a NUL: 11 bytes */
#define BINARY_HEADER 19 /* signature, flags (int32), header extension length (int32, 0) */

typedef struct {
    PGconn *c;
    int active, first;
} Source;

/* A later source's COPY is started when the running ones are all done, or when, at least this long
 * after the last start, they have left the pump without a row for a quarter of that time while a
 * quarter of this machine's CPU time was idle (spare_cpu). (A copy the target holds back waits a few
 * percent of its time, but may wait most of its first 60 ms while the copy's other work, e.g. the
 * small tables, has the CPU.) */
#define LAZY_NS (250LL * 1000 * 1000)
#define CPU_CHECK_NS (50LL * 1000 * 1000) /* /proc/stat is read at most this often */

/* This machine's CPU time so far, all CPUs, in clock ticks: total and idle (idle + iowait). */
typedef struct {
    long long total, idle;
} CpuTime;

static int cpu_time(CpuTime *t)
{
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    int n = f ? fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                       &v[6], &v[7]) : 0;
    if (f)
        fclose(f);
    if (n < 5)
        return 0;
    t->idle = (long long)(v[3] + v[4]);
    t->total = 0;
    for (int i = 0; i < 8; i++)
        t->total += (long long)v[i];
    return 1;
}

/* Whether a quarter of this machine's CPU time since `since` was idle (or that cannot be read). When
 * the source, the target and the pump share a saturated machine, the pump waits for the source
 * because the source backend waits for a CPU: a second source backend only adds work. (On
 * pgbench_accounts, PG15 -> PG18 on 2 cores, the pump waited for the source 40-65% of the copy
 * with 4-6% of the CPU time idle, and a second range made the copy slower: replicator/sync/copy.py,
 * PUMP_SPLIT_BYTES.) */
static int spare_cpu(const CpuTime *since)
{
    CpuTime now;
    if (since->total == 0 || !cpu_time(&now) || now.total <= since->total)
        return 1;
    return (now.idle - since->idle) * 4 >= now.total - since->total;
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* What goes to the target, gathered into CopyData messages of up to `cap` bytes instead of one per
 * source row: COPY FROM reads its input as a byte stream, whatever the message boundaries, and each
 * message costs the target backend (message header, a buffer copy, interrupt checks) and the pump (a
 * libpq call) the same whatever its size. cap 0 forwards each row as it came. */
typedef struct {
    PGconn *dst;
    char *buf;
    int len, cap;
    const char *trim; /* the rows' trim flags, one per column (ntrim 0: none) */
    int ntrim;
} Out;

static int out_flush(Out *o)
{
    if (o->len > 0 && pq.put_copy_data(o->dst, o->buf, o->len) != 1)
        return 0;
    o->len = 0;
    return 1;
}

static int out_write(Out *o, const char *p, int len)
{
    if (o->cap == 0 || len >= o->cap)
        return out_flush(o) && pq.put_copy_data(o->dst, p, len) == 1;
    if (o->len + len > o->cap && !out_flush(o))
        return 0;
    memcpy(o->buf + o->len, p, len);
    o->len += len;
    return 1;
}

static uint32_t get32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static void put32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24), p[1] = (char)(v >> 16), p[2] = (char)(v >> 8), p[3] = (char)v;
}

/* One source row (a server sends each in one CopyData message), in place: the fields flagged in
 * `trim` lose their trailing spaces. For char(n) columns: the target's input pads a value back to
 * n, so it stores the same bytes, without counting the padding character by character, which was
 * the target COPY's biggest single cost (replicator/sync/copy.py, padded_columns). A space byte is a
 * space in every server encoding. Returns the row's new length, or -1 if the row does not have
 * `ntrim` well-formed fields. */
static int trim_row(char *p, int len, int binary, const char *trim, int ntrim)
{
    int r = 0, w = 0;
    if (binary) { /* int16 field count, then per field an int32 length (-1: NULL) and its bytes */
        if (len < 2 || (((unsigned char)p[0] << 8) | (unsigned char)p[1]) != ntrim)
            return -1;
        r = w = 2;
        for (int i = 0; i < ntrim; i++) {
            if (len - r < 4)
                return -1;
            int32_t n = (int32_t)get32(p + r);
            r += 4;
            if (n < -1 || n > len - r)
                return -1;
            int keep = n;
            while (trim[i] && keep > 0 && p[r + keep - 1] == ' ')
                keep--;
            put32(p + w, (uint32_t)(n < 0 ? n : keep)); /* w + 4 <= r: the field's bytes are untouched */
            w += 4;
            if (keep > 0 && w != r)
                memmove(p + w, p + r, keep);
            w += keep > 0 ? keep : 0;
            r += n > 0 ? n : 0;
        }
    } else { /* text: fields end with a tab, the last with a newline (tabs and newlines in values are escaped) */
        for (int i = 0; i < ntrim; i++) {
            int from = r;
            while (r < len && p[r] != '\t' && p[r] != '\n')
                r++;
            if (r == len || (p[r] == '\n') != (i == ntrim - 1))
                return -1;
            int end = r;
            while (trim[i] && end > from && p[end - 1] == ' ')
                end--;
            if (w != from)
                memmove(p + w, p + from, end - from);
            w += end - from;
            p[w++] = p[r++];
        }
    }
    return r == len ? w : -1;
}

/* `c`'s last error into err, and whose it is into *side ("source" | "target"). Returns 0. */
static int conn_error(PGconn *c, const char *who, char *err, const char **side)
{
    snprintf(err, MSG, "%s", pq.error_message(c));
    *side = who;
    return 0;
}

/* Write one source message to the target. A binary COPY stream has one header and one trailer: the
 * first source's header is kept, every other header and every trailer dropped (the caller writes
 * the trailer once at the end). 1 ok, 0 error (err set, *side says whose). */
static int forward(Source *s, char *p, int len, Out *out, int binary, int *header_written, char *err,
                   const char **side)
{
    if (binary && s->first) {
        s->first = 0;
        if (len < BINARY_HEADER || memcmp(p, BINARY_SIGNATURE, 11) != 0 || p[15] || p[16] || p[17] || p[18]) {
            snprintf(err, MSG, "unexpected binary COPY header from the source");
            *side = "source";
            return 0;
        }
        if (!*header_written && !out_write(out, p, BINARY_HEADER))
            goto target;
        *header_written = 1;
        p += BINARY_HEADER;
        len -= BINARY_HEADER;
    }
    if (binary && len == 2 && (unsigned char)p[0] == 0xff && (unsigned char)p[1] == 0xff)
        return 1; /* this source's trailer */
    if (out->ntrim > 0 && len > 0 && (len = trim_row(p, len, binary, out->trim, out->ntrim)) < 0) {
        snprintf(err, MSG, "a row of the source's COPY does not have the %d columns asked for", out->ntrim);
        *side = "source";
        return 0;
    }
    if (len > 0 && !out_write(out, p, len))
        goto target;
    return 1;
target:
    return conn_error(out->dst, "target", err, side);
}

/* Forward the rows source i has buffered. 1 some forwarded, 0 none buffered, -1 its COPY is over (the
 * source is finished), -2 error (err set). */
static int drain(Source *src, int i, int async, Out *out, int binary, int *header_written, char *err,
                 const char **side)
{
    char *buf;
    int n, took = 0;
    while ((n = pq.get_copy_data(src[i].c, &buf, async)) > 0) {
        int ok = forward(&src[i], buf, n, out, binary, header_written, err, side);
        pq.freemem(buf);
        if (!ok)
            return -2;
        took = 1;
    }
    if (n == -1) {
        if (!finish(src[i].c, err)) {
            *side = "source";
            return -2;
        }
        src[i].active = 0;
        return -1;
    }
    if (n == -2) {
        conn_error(src[i].c, "source", err, side);
        return -2;
    }
    return took;
}

/* Every source's rows into the target, the sources started one at a time: the next one when the
 * running ones are done, or when they leave the target waiting while the machine has spare CPU
 * (LAZY_NS, spare_cpu). So when the target is the slower side, as it usually is (COPY FROM costs
 * the target about twice what COPY TO costs the source), the ranges are read one after the other,
 * in the table's order (the target's heap keeps the source's order: an index build on it sorts
 * presorted input), by one source backend at a time (measured on pgbench_accounts, PG15 -> PG18,
 * 2 cores: the whole initial sync 1.66 s with one source against 1.73 s with two read side by
 * side); when the sources are slower, more of them run side by side. Among the running ones, the
 * first is served whenever it has rows (buffered, or waiting in its socket), a later one only
 * while the earlier ones have none. 1 ok, 0 error. */
static int merge(Source *src, int ns, const char **sqls, Out *out, int binary, char *err, const char **side)
{
    int running = 0, next = 0, header_written = 0;
    long long starved = 0, since = 0, checked = 0;
    CpuTime cpu = {0, 0};
    while (running > 0 || next < ns) {
        long long elapsed = next < ns ? now_ns() - since : 0; /* since the last start, while one is left */
        int lazy = next < ns && elapsed >= LAZY_NS && starved * 4 >= elapsed && elapsed - checked >= CPU_CHECK_NS;
        if (lazy)
            checked = elapsed;
        if (running == 0 || (lazy && spare_cpu(&cpu))) {
            if (!start(src[next].c, sqls[next], PGRES_COPY_OUT, err)) {
                *side = "source";
                return 0;
            }
            src[next++].active = 1;
            running++;
            starved = checked = 0;
            since = now_ns();
            if (next < ns && !cpu_time(&cpu))
                cpu.total = 0;
        }
        int progressed = 0;
        for (int i = 0; i < next && !progressed; i++) {
            if (!src[i].active)
                continue;
            int r = drain(src, i, ns > 1, out, binary, &header_written, err, side);
            if (r == 0 && ns > 1) { /* nothing buffered: whatever its socket holds now, without waiting */
                if (!pq.consume_input(src[i].c))
                    return conn_error(src[i].c, "source", err, side);
                r = drain(src, i, 1, out, binary, &header_written, err, side);
            }
            if (r == -2)
                return 0;
            if (r == -1)
                running--;
            progressed = r != 0;
        }
        if (!progressed && running > 0) { /* no source has a whole row: wait for any */
            if (!out_flush(out)) /* what is gathered goes to the target while the sources are slow */
                return conn_error(out->dst, "target", err, side);
            struct pollfd fds[MAX_SOURCES];
            int k = 0;
            for (int i = 0; i < next; i++)
                if (src[i].active)
                    fds[k++] = (struct pollfd){.fd = pq.socket(src[i].c), .events = POLLIN};
            long long t = now_ns();
            poll(fds, k, 1000);
            starved += now_ns() - t;
            for (int i = 0; i < next; i++) {
                if (src[i].active && !pq.consume_input(src[i].c))
                    return conn_error(src[i].c, "source", err, side);
            }
        }
    }
    if ((binary && header_written && !out_write(out, "\377\377", 2)) || !out_flush(out))
        return conn_error(out->dst, "target", err, side);
    return 1;
}

static PyObject *pump(PyObject *self, PyObject *args)
{
    PyObject *srcs, *outs;
    unsigned long long dst_ptr;
    const char *in_sql;
    int binary, chunk = 0;
    const char *trim = "";
    Py_ssize_t ntrim = 0;
    if (!PyArg_ParseTuple(args, "O!KO!yp|iy#", &PyTuple_Type, &srcs, &dst_ptr, &PyTuple_Type, &outs, &in_sql, &binary,
                          &chunk, &trim, &ntrim))
        return NULL;
    if (ntrim > 0x7fff) {
        PyErr_SetString(PyExc_ValueError, "pump: at most 32767 trim flags (a row's columns)");
        return NULL;
    }
    if (chunk < 0 || chunk > (64 << 20)) {
        PyErr_SetString(PyExc_ValueError, "pump: chunk is 0 (a message per row) to 64 MB");
        return NULL;
    }
    if (!pq_check_bound())
        return NULL;
    Py_ssize_t ns = PyTuple_GET_SIZE(srcs);
    if (ns < 1 || ns > MAX_SOURCES || PyTuple_GET_SIZE(outs) != ns) {
        PyErr_Format(PyExc_ValueError, "pump: 1 to %d sources, each with its COPY ... TO STDOUT", MAX_SOURCES);
        return NULL;
    }
    Source src[MAX_SOURCES];
    const char *out_sql[MAX_SOURCES];
    for (Py_ssize_t i = 0; i < ns; i++) {
        void *c = PyLong_AsVoidPtr(PyTuple_GET_ITEM(srcs, i));
        if (c == NULL || !PyBytes_Check(PyTuple_GET_ITEM(outs, i))) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "pump: sources are PGconn pointers, their statements bytes");
            return NULL;
        }
        src[i] = (Source){.c = c, .active = 0, .first = 1};
        out_sql[i] = PyBytes_AS_STRING(PyTuple_GET_ITEM(outs, i));
    }
    PGconn *dst = (PGconn *)(uintptr_t)dst_ptr;
    Out out = {.dst = dst, .cap = chunk, .buf = chunk ? malloc(chunk) : NULL, .trim = trim, .ntrim = (int)ntrim};
    if (chunk && out.buf == NULL)
        return PyErr_NoMemory();
    char err[MSG] = "";
    const char *side = NULL;
    long long rows = 0;

    Py_BEGIN_ALLOW_THREADS
    if (!start(dst, in_sql, PGRES_COPY_IN, err))
        side = "target";
    else
        merge(src, (int)ns, out_sql, &out, binary, err, &side);
    if (side != NULL) {
        /* the target's COPY must not commit; the caller closes every connection */
        if (side[0] == 's')
            pq.put_copy_end(dst, "the source COPY failed");
    } else {
        PGresult *r;
        if (pq.put_copy_end(dst, NULL) != 1)
            conn_error(dst, "target", err, &side);
        while ((r = pq.get_result(dst)) != NULL) {
            if (pq.result_status(r) == PGRES_COMMAND_OK) {
                rows = atoll(pq.cmd_tuples(r));
            } else if (side == NULL) {
                side = "target";
                snprintf(err, MSG, "%s", pq.result_error(r));
            }
            pq.clear(r);
        }
    }
    Py_END_ALLOW_THREADS
    free(out.buf);

    if (side == NULL)
        return Py_BuildValue("(LO)", rows, Py_None);
    return Py_BuildValue("(L(sy))", rows, side, err);
}

static PyMethodDef methods[] = {
    {"pump", pump, METH_VARARGS,
     "pump(src_pgconns, dst_pgconn, copy_out_sqls, copy_in_sql, binary, chunk=0, trim=b'') -> (rows, error)"},
    {"bind", pq_bind, METH_VARARGS, "bind(*libpq_function_addresses): see replicator/sync/libpq.py for the order"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpump", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpump(void) { return PyModule_Create(&module); }
