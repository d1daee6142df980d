/*
 * Optional C accelerator for the apply hot path: one call per Insert/Update/Delete message that
 * parses it and folds it into the batch (sink/netbatch.py: NetBatch.add), for tables with a key.
 *
 * fold(buf, tables, net, appended, lsn, xid) -> int
 *   buf:    a pgoutput I/U/D message outside a streamed block (no xid prefix)
 *   tables: Sink.tables (relation oid -> TargetTable); net: NetBatch.tables (oid -> (table, rows))
 *   appended: NetBatch._appended (its length numbers the inserts into tables without a key)
 *   lsn, xid: the open source transaction's commit LSN and xid
 * Returns
 *   0  not handled: nothing was changed (except, as NetBatch.add does, an empty entry for the
 *      table in `net`); the caller runs the Python path (decode, Sink.apply) for this message.
 *      Used for everything but the common cases: unknown table, an update or delete of a table
 *      without a key or with FULL identity, a key change, a key column NULL or unchanged, a fold
 *      NetBatch.add refuses, malformed bytes.
 *   1  folded; the table's per-type counter was incremented
 *   2  skipped: committed before the table's initial copy (lsn < table.snapshot_lsn)
 *
 * Must give exactly NetBatch.add's result: tests/sink/test_cfold.py checks both on random streams.
 */
#include "_tupledata.h"

enum { INS = 0, UPD = 1, DEL = 2, DEL_INS = 3, APPEND = 4 }; /* as sink/netbatch.py */

static PyObject *T_Insert, *T_Update, *T_Delete, *O_UNCHANGED;
static PyObject *S_key0, *S_key, *S_snapshot, *S_counts, *O_ONE;

static PyObject *entry(int op, PyObject *row, PyObject *lsn, PyObject *xid) {
    PyObject *e = PyList_New(4);
    if (e == NULL) return NULL;
    PyList_SET_ITEM(e, 0, PyLong_FromLong(op));
    if (PyList_GET_ITEM(e, 0) == NULL) { Py_DECREF(e); return NULL; }
    PyList_SET_ITEM(e, 1, Py_NewRef(row));
    PyList_SET_ITEM(e, 2, Py_NewRef(lsn));
    PyList_SET_ITEM(e, 3, Py_NewRef(xid));
    return e;
}

/* the key tuple of `row` (column key0, or the columns in `keys` when key0 is -1), or NULL with no
 * exception when a key column is NULL or unchanged */
static PyObject *key_of(PyObject *row, long key0, PyObject *keys) {
    Py_ssize_t n = key0 >= 0 ? 1 : PyList_GET_SIZE(keys);
    PyObject *k = PyTuple_New(n);
    if (k == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at = key0 >= 0 ? key0 : PyLong_AsSsize_t(PyList_GET_ITEM(keys, i));
        if (at < 0 || at >= PyTuple_GET_SIZE(row)) { PyErr_Clear(); Py_DECREF(k); return NULL; }
        PyObject *v = PyTuple_GET_ITEM(row, at);
        if (v == Py_None || v == O_UNCHANGED) { Py_DECREF(k); return NULL; }
        PyTuple_SET_ITEM(k, i, Py_NewRef(v));
    }
    return k;
}

static long op_of(PyObject *e) { return PyLong_AsLong(PyList_GET_ITEM(e, 0)); }

/* NetBatch.add's fold for a keyed table: 1 folded, 0 refused, -1 error */
static int fold_row(PyObject *rows, PyObject *key, char tag, PyObject *row, PyObject *lsn, PyObject *xid) {
    PyObject *cur = PyDict_GetItemWithError(rows, key); /* borrowed */
    if (cur == NULL && PyErr_Occurred()) return -1;
    PyObject *e = NULL;
    long op = cur != NULL ? op_of(cur) : -1;
    if (tag == 'I') {
        if (cur == NULL) e = entry(INS, row, lsn, xid);
        else if (op == DEL) e = entry(DEL_INS, row, lsn, xid);
        else return 0;
    } else if (tag == 'U') {
        if (cur == NULL) e = entry(UPD, row, lsn, xid);
        else if (op == DEL) return 0;
        else {
            PyObject *merged = PyList_GET_ITEM(cur, 1);
            Py_ssize_t n = PyTuple_GET_SIZE(row);
            if (PyTuple_CheckExact(merged)) {
                if (PyTuple_GET_SIZE(merged) != n) return 0;
                merged = PySequence_List(merged);
                if (merged == NULL) return -1;
                PyList_SetItem(cur, 1, merged); /* steals */
            } else if (!PyList_CheckExact(merged) || PyList_GET_SIZE(merged) != n) {
                return 0;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *v = PyTuple_GET_ITEM(row, i);
                if (v != O_UNCHANGED) PyList_SetItem(merged, i, Py_NewRef(v));
            }
            PyList_SetItem(cur, 2, Py_NewRef(lsn));
            PyList_SetItem(cur, 3, Py_NewRef(xid));
            return 1;
        }
    } else {
        if (cur == NULL || op == UPD || op == DEL_INS) e = entry(DEL, row, lsn, xid);
        else if (op == INS) return PyDict_DelItem(rows, key) < 0 ? -1 : 1;
        else return 0;
    }
    if (e == NULL) return -1;
    int r = PyDict_SetItem(rows, key, e);
    Py_DECREF(e);
    return r < 0 ? -1 : 1;
}

static PyObject *fold(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyBytes_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) || !PyDict_CheckExact(args[2])
        || !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "fold(buf: bytes, tables: dict, net: dict, appended: list, lsn, xid)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t blen = PyBytes_GET_SIZE(args[0]);
    PyObject *tables = args[1], *net = args[2], *appended = args[3], *lsn = args[4], *xid = args[5];
    if (blen < 7) return PyLong_FromLong(0);
    char tag = (char)buf[0];
    if (tag != 'I' && tag != 'U' && tag != 'D') return PyLong_FromLong(0);
    if (buf[5] != 'N' && !(tag == 'D' && buf[5] == 'K')) return PyLong_FromLong(0); /* old row / key change */
    if ((tag == 'I' || tag == 'U') != (buf[5] == 'N')) return PyLong_FromLong(0);

    PyObject *oid = PyLong_FromUnsignedLong(rd32(buf + 1));
    if (oid == NULL) return NULL;
    PyObject *result = NULL, *table = NULL, *key0o = NULL, *keys = NULL, *snap = NULL, *counts = NULL, *row = NULL;
    PyObject *key = NULL;
    table = PyDict_GetItemWithError(tables, oid);
    if (table == NULL) { if (!PyErr_Occurred()) result = PyLong_FromLong(0); goto done; }
    Py_INCREF(table); /* held across the calls below */
    if ((key0o = PyObject_GetAttr(table, S_key0)) == NULL) goto done;
    long key0 = PyLong_AsLong(key0o);
    if (key0 == -1 && PyErr_Occurred()) goto done;
    /* no key, or FULL identity: inserts are appended, the rest is found by whole rows (Python) */
    /* -3: something fires on it (relations.py): never folded */
    if (key0 < -2 || (key0 < -1 && tag != 'I')) { result = PyLong_FromLong(0); goto done; }
    if (key0 == -1) { /* a key of several columns: their indexes */
        if ((keys = PyObject_GetAttr(table, S_key)) == NULL) goto done;
        if (!PyList_CheckExact(keys)) { result = PyLong_FromLong(0); goto done; }
    }
    if (lsn != Py_None) {
        if ((snap = PyObject_GetAttr(table, S_snapshot)) == NULL) goto done;
        int before = PyObject_RichCompareBool(lsn, snap, Py_LT);
        if (before < 0) goto done;
        if (before) { result = PyLong_FromLong(2); goto done; }
    }
    Py_ssize_t pos = 6;
    row = tuple_data(buf, blen, &pos, O_UNCHANGED);
    if (row == NULL) { if (!PyErr_Occurred()) result = PyLong_FromLong(0); goto done; }
    if (pos != blen) { result = PyLong_FromLong(0); goto done; }
    if (key0 < -1) { /* NetBatch.add's APPEND: keyed by its position among the batch's appends */
        key = Py_BuildValue("(n)", PyList_GET_SIZE(appended));
    } else {
        key = key_of(row, key0, keys);
    }
    if (key == NULL) { if (!PyErr_Occurred()) result = PyLong_FromLong(0); goto done; }
    /* NetBatch.add: the table's pending rows (a new mapping of it may not fold with older rows) */
    PyObject *ent = PyDict_GetItemWithError(net, oid); /* borrowed */
    PyObject *rows;
    if (ent == NULL) {
        if (PyErr_Occurred()) goto done;
        rows = PyDict_New();
        if (rows == NULL) goto done;
        PyObject *pair = PyTuple_Pack(2, table, rows);
        Py_DECREF(rows);
        if (pair == NULL) goto done;
        int r = PyDict_SetItem(net, oid, pair);
        Py_DECREF(pair);
        if (r < 0) goto done;
    } else {
        if (!PyTuple_CheckExact(ent) || PyTuple_GET_SIZE(ent) != 2 || PyTuple_GET_ITEM(ent, 0) != table) {
            result = PyLong_FromLong(0);
            goto done;
        }
        rows = PyTuple_GET_ITEM(ent, 1);
    }
    int folded;
    if (key0 < -1) {
        PyObject *e = entry(APPEND, row, lsn, xid);
        if (e == NULL) goto done;
        folded = PyDict_SetItem(rows, key, e) < 0 || PyList_Append(appended, Py_None) < 0 ? -1 : 1;
        Py_DECREF(e);
    } else {
        folded = fold_row(rows, key, tag, row, lsn, xid);
    }
    if (folded < 0) goto done;
    if (folded == 0) { result = PyLong_FromLong(0); goto done; }
    /* Sink.apply's count of source changes per table and message type */
    if ((counts = PyObject_GetAttr(table, S_counts)) == NULL) goto done;
    PyObject *type = tag == 'I' ? T_Insert : tag == 'U' ? T_Update : T_Delete;
    PyObject *n = PyDict_GetItemWithError(counts, type);
    if (n == NULL && PyErr_Occurred()) goto done;
    PyObject *next = n == NULL ? PyLong_FromLong(1) : PyNumber_Add(n, O_ONE);
    if (next == NULL) goto done;
    int r = PyDict_SetItem(counts, type, next);
    Py_DECREF(next);
    if (r < 0) goto done;
    result = PyLong_FromLong(1);
done:
    Py_DECREF(oid);
    Py_XDECREF(table);
    Py_XDECREF(key0o);
    Py_XDECREF(keys);
    Py_XDECREF(snap);
    Py_XDECREF(counts);
    Py_XDECREF(row);
    Py_XDECREF(key);
    return result;
}

static PyObject *init(PyObject *self, PyObject *args) {
    PyObject *ins, *upd, *del, *unch;
    if (!PyArg_ParseTuple(args, "OOOO", &ins, &upd, &del, &unch)) return NULL;
    Py_XSETREF(T_Insert, Py_NewRef(ins));
    Py_XSETREF(T_Update, Py_NewRef(upd));
    Py_XSETREF(T_Delete, Py_NewRef(del));
    Py_XSETREF(O_UNCHANGED, Py_NewRef(unch));
    if (S_key0 == NULL) S_key0 = PyUnicode_InternFromString("key0");
    if (S_key == NULL) S_key = PyUnicode_InternFromString("key");
    if (S_snapshot == NULL) S_snapshot = PyUnicode_InternFromString("snapshot_lsn");
    if (S_counts == NULL) S_counts = PyUnicode_InternFromString("counts");
    if (O_ONE == NULL) O_ONE = PyLong_FromLong(1);
    if (S_key0 == NULL || S_key == NULL || S_snapshot == NULL || S_counts == NULL || O_ONE == NULL) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fold", (PyCFunction)(void (*)(void))fold, METH_FASTCALL,
     "fold(buf, tables, net, appended, lsn, xid) -> 0 (not handled) | 1 (folded) | 2 (before the table's copy)"},
    {"init", init, METH_VARARGS, "init(Insert, Update, Delete, UNCHANGED)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "sink._cfold", NULL, -1, methods};

/* What this file relies on from the Python side, for tests/sink/test_cfold.py to check against
   sink/netbatch.py's FOLD_CONTRACT: the op codes of a batch entry, an entry's length
   ([op, row, lsn, xid]), the TargetTable attributes read, and TargetTable.key0's special values. */
PyMODINIT_FUNC PyInit__cfold(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    PyObject *contract = Py_BuildValue("{s:{s:i,s:i,s:i,s:i,s:i},s:i,s:(ssss),s:{s:i,s:i,s:i}}",
        "ops", "INS", INS, "UPD", UPD, "DEL", DEL, "DEL_INS", DEL_INS, "APPEND", APPEND,
        "entry_len", 4,
        "table_attrs", "key0", "key", "snapshot_lsn", "counts",
        "key0", "several_columns", -1, "whole_row", -2, "fires", -3);
    if (contract == NULL || PyModule_AddObject(m, "CONTRACT", contract) < 0) {
        Py_XDECREF(contract);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
