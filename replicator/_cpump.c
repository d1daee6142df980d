/* The initial copy's data path: source `COPY ... TO STDOUT` straight into target `COPY ... FROM STDIN`,
 * between two libpq connections that psycopg2 opened, in C and without the GIL.
 *
 * No libpq at build time: see _libpq.h.
 *
 * pump(src, dst, copy_out_sql, copy_in_sql) -> (rows, error)
 *   rows: what the target's COPY reported; error: None, or ("source" | "target", message).
 * Both connections must be in a transaction and idle. After an error the caller closes both (a
 * connection may be left mid-COPY; closing it aborts its transaction).
 */
#define PY_SSIZE_T_CLEAN
#include "_libpq.h"
#include <stdlib.h>
#include <string.h>

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

static PyObject *pump(PyObject *self, PyObject *args)
{
    unsigned long long src_ptr, dst_ptr;
    const char *out_sql, *in_sql;
    if (!PyArg_ParseTuple(args, "KKyy", &src_ptr, &dst_ptr, &out_sql, &in_sql))
        return NULL;
    if (!pq_check_bound())
        return NULL;
    PGconn *src = (PGconn *)(uintptr_t)src_ptr, *dst = (PGconn *)(uintptr_t)dst_ptr;
    char err[MSG] = "";
    const char *side = NULL;
    long long rows = 0;

    Py_BEGIN_ALLOW_THREADS
    if (!start(dst, in_sql, PGRES_COPY_IN, err)) {
        side = "target";
    } else if (!start(src, out_sql, PGRES_COPY_OUT, err)) {
        side = "source";
        pq.put_copy_end(dst, "the source COPY failed");
        char ignored[MSG];
        finish(dst, ignored);
    } else {
        char *buf;
        int n;
        while ((n = pq.get_copy_data(src, &buf, 0)) > 0) {
            int put = pq.put_copy_data(dst, buf, n);
            pq.freemem(buf);
            if (put != 1) {
                side = "target";
                snprintf(err, MSG, "%s", pq.error_message(dst));
                break;
            }
        }
        if (side == NULL && n == -2) {
            side = "source";
            snprintf(err, MSG, "%s", pq.error_message(src));
        }
        if (side == NULL && !finish(src, err))
            side = "source";
        if (side != NULL) {
            if (side[0] == 's')
                pq.put_copy_end(dst, "the source COPY failed"); /* the target's COPY must not commit */
        } else {
            PGresult *r;
            if (pq.put_copy_end(dst, NULL) != 1) {
                side = "target";
                snprintf(err, MSG, "%s", pq.error_message(dst));
            }
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
    }
    Py_END_ALLOW_THREADS

    if (side == NULL)
        return Py_BuildValue("(LO)", rows, Py_None);
    return Py_BuildValue("(L(sy))", rows, side, err);
}

static PyMethodDef methods[] = {
    {"pump", pump, METH_VARARGS, "pump(src_pgconn, dst_pgconn, copy_out_sql, copy_in_sql) -> (rows, error)"},
    {"bind", pq_bind, METH_VARARGS, "bind(*libpq_function_addresses): see replicator/libpq.py for the order"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpump", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpump(void) { return PyModule_Create(&module); }
