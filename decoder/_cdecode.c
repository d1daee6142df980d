/*
 * Optional C accelerator for the pgoutput hot path: Begin, Commit, Insert, Update, Delete.
 *
 * decode(buf: bytes, in_stream: bool) -> Message | None
 *
 * Returns the same frozen msgspec Structs as decoder/pgoutput.py, or None for every other tag and
 * for ANY malformed input (short buffer, unknown tuple kind, bad UTF-8, trailing bytes). On None the
 * caller runs the pure-Python parser, which either decodes the message or raises the precise
 * DecodeError. So this file never has to produce error messages, and cannot change what is
 * accepted: the golden and property tests run against both paths.
 */
#include "_tupledata.h"

static PyObject *T_Insert, *T_Update, *T_Delete, *T_Begin, *T_Commit, *T_Lsn, *O_UNCHANGED;
static PyObject *S_K, *S_O;

static PyObject *make_lsn(uint64_t v) {
    PyObject *i = PyLong_FromUnsignedLongLong(v);
    if (i == NULL) return NULL;
    PyObject *args = PyTuple_Pack(1, i);
    Py_DECREF(i);
    if (args == NULL) return NULL;
    PyObject *r = PyLong_Type.tp_new((PyTypeObject *)T_Lsn, args, NULL);
    Py_DECREF(args);
    return r;
}

static PyObject *build(PyObject *type, PyObject **args, size_t n) {
    PyObject *r = PyObject_Vectorcall(type, args, n, NULL);
    for (size_t i = 0; i < n; i++) Py_DECREF(args[i]);
    return r;
}

/* xid prefix (in a streamed block) and relation oid; *pos ends at the first tuple marker. */
static int change_head(const unsigned char *buf, Py_ssize_t blen, int in_stream, PyObject **xid, PyObject **rel,
                       Py_ssize_t *pos) {
    Py_ssize_t p = 1;
    if (in_stream) {
        if (p + 4 > blen) return 0;
        *xid = PyLong_FromUnsignedLong(rd32(buf + p));
        p += 4;
    } else {
        *xid = Py_NewRef(Py_None);
    }
    if (*xid == NULL) return -1;
    if (p + 5 > blen) { Py_CLEAR(*xid); return 0; }
    *rel = PyLong_FromUnsignedLong(rd32(buf + p));
    if (*rel == NULL) { Py_CLEAR(*xid); return -1; }
    *pos = p + 4;
    return 1;
}

static PyObject *fail(PyObject **objs, size_t n) {
    for (size_t i = 0; i < n; i++) Py_XDECREF(objs[i]);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) Py_RETURN_NONE;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t blen = PyBytes_GET_SIZE(args[0]);
    int in_stream = PyObject_IsTrue(args[1]);
    if (in_stream < 0 || blen == 0) return in_stream < 0 ? NULL : (Py_INCREF(Py_None), Py_None);
    PyObject *o[5] = {NULL, NULL, NULL, NULL, NULL};
    Py_ssize_t pos;
    int h;

    switch (buf[0]) {
    case 'I':
        if ((h = change_head(buf, blen, in_stream, &o[0], &o[1], &pos)) <= 0) return fail(o, 2);
        if (buf[pos] != 'N') return fail(o, 2);
        pos++;
        if ((o[2] = tuple_data(buf, blen, &pos, O_UNCHANGED)) == NULL || pos != blen) return fail(o, 3);
        return build(T_Insert, o, 3);
    case 'U': {
        if ((h = change_head(buf, blen, in_stream, &o[0], &o[1], &pos)) <= 0) return fail(o, 2);
        unsigned char marker = buf[pos++];
        if (marker == 'K' || marker == 'O') {
            o[2] = Py_NewRef(marker == 'K' ? S_K : S_O);
            if ((o[3] = tuple_data(buf, blen, &pos, O_UNCHANGED)) == NULL || pos >= blen) return fail(o, 4);
            marker = buf[pos++];
        } else {
            o[2] = Py_NewRef(Py_None);
            o[3] = Py_NewRef(Py_None);
        }
        if (marker != 'N') return fail(o, 4);
        if ((o[4] = tuple_data(buf, blen, &pos, O_UNCHANGED)) == NULL || pos != blen) return fail(o, 5);
        return build(T_Update, o, 5);
    }
    case 'D': {
        if ((h = change_head(buf, blen, in_stream, &o[0], &o[1], &pos)) <= 0) return fail(o, 2);
        unsigned char marker = buf[pos++];
        if (marker != 'K' && marker != 'O') return fail(o, 2);
        o[2] = Py_NewRef(marker == 'K' ? S_K : S_O);
        if ((o[3] = tuple_data(buf, blen, &pos, O_UNCHANGED)) == NULL || pos != blen) return fail(o, 4);
        return build(T_Delete, o, 4);
    }
    case 'B':
        /* Int64 final LSN, Int64 commit time, Int32 xid */
        if (blen != 21) Py_RETURN_NONE;
        if ((o[0] = make_lsn(rd64(buf + 1))) == NULL) return NULL;
        if ((o[1] = PyLong_FromLongLong((int64_t)rd64(buf + 9))) == NULL) return fail(o, 1);
        if ((o[2] = PyLong_FromUnsignedLong(rd32(buf + 17))) == NULL) return fail(o, 2);
        return build(T_Begin, o, 3);
    case 'C':
        /* Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time */
        if (blen != 26) Py_RETURN_NONE;
        if ((o[0] = PyLong_FromLong(buf[1])) == NULL) return NULL;
        if ((o[1] = make_lsn(rd64(buf + 2))) == NULL) return fail(o, 1);
        if ((o[2] = make_lsn(rd64(buf + 10))) == NULL) return fail(o, 2);
        if ((o[3] = PyLong_FromLongLong((int64_t)rd64(buf + 18))) == NULL) return fail(o, 3);
        return build(T_Commit, o, 4);
    default:
        Py_RETURN_NONE;
    }
}

static PyObject *init(PyObject *self, PyObject *args) {
    PyObject *ins, *upd, *del, *beg, *com, *lsn, *unch;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &ins, &upd, &del, &beg, &com, &lsn, &unch)) return NULL;
    if (!PyType_Check(lsn) || !PyType_IsSubtype((PyTypeObject *)lsn, &PyLong_Type)) {
        PyErr_SetString(PyExc_TypeError, "Lsn must be an int subclass");
        return NULL;
    }
    Py_XSETREF(T_Insert, Py_NewRef(ins));
    Py_XSETREF(T_Update, Py_NewRef(upd));
    Py_XSETREF(T_Delete, Py_NewRef(del));
    Py_XSETREF(T_Begin, Py_NewRef(beg));
    Py_XSETREF(T_Commit, Py_NewRef(com));
    Py_XSETREF(T_Lsn, Py_NewRef(lsn));
    Py_XSETREF(O_UNCHANGED, Py_NewRef(unch));
    if (S_K == NULL) S_K = PyUnicode_InternFromString("K");
    if (S_O == NULL) S_O = PyUnicode_InternFromString("O");
    if (S_K == NULL || S_O == NULL) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(buf, in_stream) -> Begin | Commit | Insert | Update | Delete | None (None: use the Python parser)"},
    {"init", init, METH_VARARGS, "init(Insert, Update, Delete, Begin, Commit, Lsn, UNCHANGED)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "decoder._cdecode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cdecode(void) { return PyModule_Create(&moddef); }
