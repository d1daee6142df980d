/* The libpq functions pgferry's C code calls, bound at run time to the libpq psycopg2 is linked
 * with (replicator/sync/libpq.py finds it and passes the addresses, in FUNCTIONS' order, to bind()).
 * No libpq headers or library at build time, and the PGconn pointers psycopg2 hands out are only
 * ever used by the library that made them. */
#ifndef PGFERRY_LIBPQ_H
#define PGFERRY_LIBPQ_H

#include <Python.h>
#include <stdint.h>

typedef void PGconn;
typedef void PGresult;

enum { PGRES_COMMAND_OK = 1, PGRES_COPY_OUT = 3, PGRES_COPY_IN = 4 }; /* libpq's ExecStatusType */

static struct {
    PGresult *(*exec)(PGconn *, const char *);
    int (*result_status)(const PGresult *);
    char *(*result_error)(const PGresult *);
    void (*clear)(PGresult *);
    PGresult *(*get_result)(PGconn *);
    int (*get_copy_data)(PGconn *, char **, int);
    int (*put_copy_data)(PGconn *, const char *, int);
    int (*put_copy_end)(PGconn *, const char *);
    void (*freemem)(void *);
    char *(*error_message)(const PGconn *);
    char *(*cmd_tuples)(PGresult *);
    int (*consume_input)(PGconn *);
    int (*socket)(const PGconn *);
} pq;

#define PQ_FUNCTIONS 13

static int pq_bound = 0;

/* bind(*addresses): the functions above, in this order (replicator/sync/libpq.py: FUNCTIONS) */
static PyObject *pq_bind(PyObject *self, PyObject *args)
{
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != PQ_FUNCTIONS) {
        PyErr_Format(PyExc_TypeError, "bind() takes %d libpq function addresses", PQ_FUNCTIONS);
        return NULL;
    }
    void *a[PQ_FUNCTIONS];
    for (int i = 0; i < PQ_FUNCTIONS; i++) {
        a[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args, i));
        if (a[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a libpq function address is 0");
            return NULL;
        }
    }
    pq.exec = a[0];
    pq.result_status = a[1];
    pq.result_error = a[2];
    pq.clear = a[3];
    pq.get_result = a[4];
    pq.get_copy_data = a[5];
    pq.put_copy_data = a[6];
    pq.put_copy_end = a[7];
    pq.freemem = a[8];
    pq.error_message = a[9];
    pq.cmd_tuples = a[10];
    pq.consume_input = a[11];
    pq.socket = a[12];
    pq_bound = 1;
    Py_RETURN_NONE;
}

static int pq_check_bound(void)
{
    if (!pq_bound)
        PyErr_SetString(PyExc_RuntimeError, "bind() was not called with libpq's functions");
    return pq_bound;
}

#endif
