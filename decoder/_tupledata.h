/*
 * Shared by the C accelerators (decoder/_cdecode.c, sink/_cfold.c): big-endian readers and the
 * pgoutput TupleData parser. Static functions: each extension gets its own copy at build time.
 */
#ifndef PGFERRY_TUPLEDATA_H
#define PGFERRY_TUPLEDATA_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static inline uint16_t rd16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t rd32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
static inline uint64_t rd64(const unsigned char *p) { return ((uint64_t)rd32(p) << 32) | rd32(p + 4); }

/* A NULL return with no exception set means "malformed: let Python report it". */
#define MALFORMED NULL

/* TupleData at *pos. On success returns a new tuple and advances *pos. On malformed input returns
 * NULL with no exception; on a real failure (memory) NULL with an exception. */
static PyObject *tuple_data(const unsigned char *buf, Py_ssize_t blen, Py_ssize_t *pos, PyObject *unchanged) {
    Py_ssize_t p = *pos;
    if (p + 2 > blen) return MALFORMED;
    Py_ssize_t n = rd16(buf + p);
    p += 2;
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p + 1 > blen) goto malformed;
        unsigned char kind = buf[p];
        PyObject *v;
        if (kind == 't' || kind == 'b') {
            if (p + 5 > blen) goto malformed;
            Py_ssize_t ln = (Py_ssize_t)rd32(buf + p + 1);
            p += 5;
            if (ln > blen - p) goto malformed;
            if (kind == 't') {
                v = PyUnicode_DecodeUTF8((const char *)buf + p, ln, NULL);
                if (v == NULL) {
                    if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                        PyErr_Clear();
                        goto malformed;
                    }
                    Py_DECREF(t);
                    return NULL;
                }
            } else {
                v = PyBytes_FromStringAndSize((const char *)buf + p, ln);
                if (v == NULL) { Py_DECREF(t); return NULL; }
            }
            p += ln;
        } else if (kind == 'n') {
            v = Py_NewRef(Py_None);
            p += 1;
        } else if (kind == 'u') {
            v = Py_NewRef(unchanged);
            p += 1;
        } else {
            goto malformed;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    *pos = p;
    return t;
malformed:
    Py_DECREF(t);
    return MALFORMED;
}

#endif
