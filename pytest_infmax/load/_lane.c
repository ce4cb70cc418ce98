/*
 * The load generator's fast lane: HTTP/1.1 chunked framing and SSE event
 * splitting of a streaming response body, in C.
 *
 * Why: at hundreds of streams of one-token events the client spends most of
 * its own time per event, and the Python path (httptools' on_body callback,
 * the SSE splitter, their method calls) cost about 0.9 us of the 1.2 us per
 * event measured in-process, more in a live run (docs/load-generator.md has
 * the table). Here the body bytes of a 200 text/event-stream response with
 * Transfer-Encoding: chunked are de-chunked and split into events without a
 * Python call per piece; each plain event (one "data: " line) goes straight to
 * the Python sink with the arrival stamp of the bytes that completed it.
 *
 * Everything unusual is handed back to Python, which already implements the
 * SSE spec (streamclient.SSEDecoder): an event block that is not one "data: "
 * line goes to on_block; once a CR is seen in the body, every de-chunked byte
 * goes to on_raw (the decoder's feed, which normalises CRLF/CR). Both answer
 * whether the stream is done (they may have seen [DONE]). The status
 * line and headers are parsed by httptools before the lane takes over.
 *
 * Lane(on_event, on_block, on_raw, max_event_bytes)
 *   feed(data: bytes, t: float) -> int: -1 while the message goes on, else
 *       the offset in data just past the end of the HTTP message;
 *   done: a "data: [DONE]" event was seen (later events are not delivered);
 *   take_rest() -> bytes: the buffered start of an unfinished event.
 * Malformed framing or an event over max_event_bytes raises LaneError; an
 * exception from a callback propagates unchanged.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

enum {
    S_SIZE,        /* reading the hex chunk size */
    S_EXT,         /* skipping a chunk extension up to CR */
    S_SIZE_LF,     /* the LF after the size line */
    S_DATA,        /* chunk data */
    S_DATA_CR,     /* the CR after chunk data */
    S_DATA_LF,     /* the LF after chunk data */
    S_TRAILER,     /* at the start of a trailer line (or the final CRLF) */
    S_TRAILER_LINE,/* inside a trailer line */
    S_END_LF,      /* the LF of the final CRLF */
    S_COMPLETE     /* the message ended */
};

#define MAX_SIZE_LINE 4096
#define MAX_TRAILERS (64 * 1024)

static PyObject *LaneError;

typedef struct {
    PyObject_HEAD
    PyObject *on_event;
    PyObject *on_block;
    PyObject *on_raw;
    Py_ssize_t max_event;
    int state;
    int digits;
    Py_ssize_t chunk_left;
    Py_ssize_t line_len;      /* bytes of the current size line or of the trailers */
    char raw;                 /* a CR was seen: de-chunked bytes go to on_raw */
    char done;                /* [DONE] was seen */
    char *buf;                /* the start of an unfinished event */
    Py_ssize_t buf_len;
    Py_ssize_t buf_cap;
} Lane;

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_event);
    Py_VISIT(self->on_block);
    Py_VISIT(self->on_raw);
    return 0;
}

static int
lane_clear(Lane *self)
{
    Py_CLEAR(self->on_event);
    Py_CLEAR(self->on_block);
    Py_CLEAR(self->on_raw);
    return 0;
}

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    PyMem_Free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"on_event", "on_block", "on_raw", "max_event_bytes", NULL};
    PyObject *on_event, *on_block, *on_raw;
    Py_ssize_t max_event;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOn", kwlist, &on_event, &on_block, &on_raw, &max_event))
        return -1;
    Py_INCREF(on_event);
    Py_INCREF(on_block);
    Py_INCREF(on_raw);
    Py_XSETREF(self->on_event, on_event);
    Py_XSETREF(self->on_block, on_block);
    Py_XSETREF(self->on_raw, on_raw);
    self->max_event = max_event;
    self->state = S_SIZE;
    self->digits = 0;
    self->chunk_left = 0;
    self->line_len = 0;
    self->raw = 0;
    self->done = 0;
    self->buf_len = 0;
    return 0;
}

static int
buf_append(Lane *self, const char *p, Py_ssize_t n)
{
    if (self->buf_len + n > self->buf_cap) {
        Py_ssize_t cap = self->buf_cap ? self->buf_cap : 256;
        while (cap < self->buf_len + n)
            cap *= 2;
        char *nb = PyMem_Realloc(self->buf, cap);
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->buf = nb;
        self->buf_cap = cap;
    }
    memcpy(self->buf + self->buf_len, p, n);
    self->buf_len += n;
    return 0;
}

/* Call fn(bytes(p, n), t); returns the result (new ref) or NULL. */
static PyObject *
call_bytes(PyObject *fn, const char *p, Py_ssize_t n, PyObject *t)
{
    PyObject *b = PyBytes_FromStringAndSize(p, n);
    if (b == NULL)
        return NULL;
    PyObject *argv[2] = {b, t};
    PyObject *r = PyObject_Vectorcall(fn, argv, 2, NULL);
    Py_DECREF(b);
    return r;
}

/* Call fn(bytes(p, n), t), which answers whether the stream is done; 0 or -1. */
static int
call_done(Lane *self, PyObject *fn, const char *p, Py_ssize_t n, PyObject *t)
{
    PyObject *r = call_bytes(fn, p, n, t);
    if (r == NULL)
        return -1;
    int truth = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (truth < 0)
        return -1;
    if (truth)
        self->done = 1;
    return 0;
}

/* One event block (the text between blank lines). */
static int
block(Lane *self, const char *p, Py_ssize_t n, PyObject *t)
{
    PyObject *r;
    if (n == 0)
        return 0;
    if (n >= 6 && memcmp(p, "data: ", 6) == 0 && memchr(p + 6, '\n', n - 6) == NULL) {
        if (n - 6 == 6 && memcmp(p + 6, "[DONE]", 6) == 0)
            self->done = 1;
        r = call_bytes(self->on_event, p + 6, n - 6, t);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    /* comments, other fields, multi-line data: the Python decoder; it answers
       whether the stream is done */
    return call_done(self, self->on_block, p, n, t);
}

static int
too_big(Lane *self)
{
    PyErr_Format(LaneError,
                 "an SSE event exceeded %zd bytes without ending; the server's stream is malformed",
                 self->max_event);
    return -1;
}

/* Complete blocks in p[0:n]; returns the offset of the unfinished rest, or -1. */
static Py_ssize_t
split(Lane *self, const char *p, Py_ssize_t n, Py_ssize_t from, PyObject *t)
{
    Py_ssize_t start = 0, i = from;
    while (i + 1 < n) {
        const char *nl = memchr(p + i, '\n', n - i - 1);
        if (nl == NULL)
            break;
        i = nl - p;
        if (p[i + 1] == '\n') {
            if (block(self, p + start, i - start, t) < 0)
                return -1;
            start = i + 2;
            i = start;
            if (self->done)
                return n;
        }
        else {
            i += 1;
        }
    }
    return start;
}

/* De-chunked body bytes. */
static int
body(Lane *self, const char *p, Py_ssize_t n, PyObject *t)
{
    if (self->done || n == 0)
        return 0;
    if (!self->raw && memchr(p, '\r', n) != NULL) {
        /* CR line ends: the Python decoder takes the rest of the stream, with
           the unfinished event we hold */
        self->raw = 1;
        if (self->buf_len) {
            if (buf_append(self, p, n) < 0)
                return -1;
            Py_ssize_t len = self->buf_len;
            self->buf_len = 0;  /* handed over (call_done copies it first) */
            return call_done(self, self->on_raw, self->buf, len, t);
        }
    }
    if (self->raw)
        return call_done(self, self->on_raw, p, n, t);
    if (self->buf_len == 0) {
        Py_ssize_t rest = split(self, p, n, 0, t);
        if (rest < 0)
            return -1;
        if (rest < n && !self->done) {
            if (n - rest > self->max_event)
                return too_big(self);
            return buf_append(self, p + rest, n - rest);
        }
        return 0;
    }
    Py_ssize_t from = self->buf_len - 1;  /* a blank line may straddle the old end */
    if (buf_append(self, p, n) < 0)
        return -1;
    Py_ssize_t rest = split(self, self->buf, self->buf_len, from, t);
    if (rest < 0)
        return -1;
    if (self->done) {
        self->buf_len = 0;
        return 0;
    }
    if (rest > 0) {
        memmove(self->buf, self->buf + rest, self->buf_len - rest);
        self->buf_len -= rest;
    }
    if (self->buf_len > self->max_event) {
        self->buf_len = 0;
        return too_big(self);
    }
    return 0;
}

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static PyObject *
malformed(const char *what)
{
    PyErr_Format(LaneError, "malformed HTTP response: %s", what);
    return NULL;
}

static PyObject *
lane_feed(Lane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "feed(data: bytes, t: float)");
        return NULL;
    }
    PyObject *t = args[1];
    const char *p = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t i = 0;
    while (i < n) {
        char c;
        switch (self->state) {
        case S_DATA: {
            Py_ssize_t take = n - i < self->chunk_left ? n - i : self->chunk_left;
            if (body(self, p + i, take, t) < 0)
                return NULL;
            i += take;
            self->chunk_left -= take;
            if (self->chunk_left == 0)
                self->state = S_DATA_CR;
            break;
        }
        case S_SIZE: {
            int v;
            c = p[i];
            if ((v = hexval(c)) >= 0) {
                if (self->chunk_left > (PY_SSIZE_T_MAX >> 4))
                    return malformed("Chunk size overflow");
                self->chunk_left = (self->chunk_left << 4) | v;
                self->digits++;
            }
            else if (self->digits == 0) {
                return malformed("Invalid character in chunk size");
            }
            else if (c == '\r') {
                self->state = S_SIZE_LF;
            }
            else if (c == ';' || c == ' ' || c == '\t') {
                self->state = S_EXT;
            }
            else {
                return malformed("Invalid character in chunk size");
            }
            if (++self->line_len > MAX_SIZE_LINE)
                return malformed("Chunk size line too long");
            i++;
            break;
        }
        case S_EXT: {
            const char *cr = memchr(p + i, '\r', n - i);
            Py_ssize_t upto = cr ? (cr - p) : n;
            self->line_len += upto - i;
            if (self->line_len > MAX_SIZE_LINE)
                return malformed("Chunk size line too long");
            i = upto;
            if (cr) {
                self->state = S_SIZE_LF;
                i++;
            }
            break;
        }
        case S_SIZE_LF:
            if (p[i++] != '\n')
                return malformed("Invalid character in chunk size");
            self->line_len = 0;
            self->digits = 0;
            self->state = self->chunk_left ? S_DATA : S_TRAILER;
            break;
        case S_DATA_CR:
            if (p[i++] != '\r')
                return malformed("Expected CRLF after chunk data");
            self->state = S_DATA_LF;
            break;
        case S_DATA_LF:
            if (p[i++] != '\n')
                return malformed("Expected CRLF after chunk data");
            self->state = S_SIZE;
            break;
        case S_TRAILER:
            if (p[i] == '\r') {
                self->state = S_END_LF;
                i++;
            }
            else {
                self->state = S_TRAILER_LINE;
            }
            break;
        case S_TRAILER_LINE: {
            const char *lf = memchr(p + i, '\n', n - i);
            Py_ssize_t upto = lf ? (lf - p) + 1 : n;
            self->line_len += upto - i;
            if (self->line_len > MAX_TRAILERS)
                return malformed("Trailers too long");
            i = upto;
            if (lf)
                self->state = S_TRAILER;
            break;
        }
        case S_END_LF:
            if (p[i++] != '\n')
                return malformed("Expected LF at the end of the chunked body");
            self->state = S_COMPLETE;
            return PyLong_FromSsize_t(i);
        default: /* S_COMPLETE: nothing may follow on this exchange */
            return PyLong_FromSsize_t(i);
        }
    }
    if (self->state == S_COMPLETE)
        return PyLong_FromSsize_t(i);
    return PyLong_FromLong(-1);
}

static PyObject *
lane_take_rest(Lane *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *b = PyBytes_FromStringAndSize(self->buf ? self->buf : "", self->buf_len);
    self->buf_len = 0;
    return b;
}

static PyMethodDef lane_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))lane_feed, METH_FASTCALL,
     "feed(data, t) -> -1 while the message goes on, else the offset just past its end"},
    {"take_rest", (PyCFunction)lane_take_rest, METH_NOARGS,
     "the buffered start of an unfinished event (the buffer is emptied)"},
    {NULL}
};

static PyMemberDef lane_members[] = {
    {"done", T_BOOL, offsetof(Lane, done), READONLY, "a data: [DONE] event was seen"},
    {NULL}
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pytest_infmax._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Chunked framing and SSE splitting of one streaming response body",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_members = lane_members,
};

static struct PyModuleDef lanemodule = {
    PyModuleDef_HEAD_INIT, "_lane", "The load generator's fast lane (see _lane.c)", -1, NULL,
};

PyMODINIT_FUNC
PyInit__lane(void)
{
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&lanemodule);
    if (m == NULL)
        return NULL;
    LaneError = PyErr_NewException("pytest_infmax._lane.LaneError", PyExc_ValueError, NULL);
    if (LaneError == NULL || PyModule_AddObjectRef(m, "LaneError", LaneError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
