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
 * Plain content events are recorded here too, when a sink is given. At one token
 * per event the Python sink's decode and bookkeeping (ResponseAccumulator.on_event:
 * a msgspec decode, attribute reads, two appends) was about 1 us of the 2.5 us per
 * event the client spent above the kernel-and-loop floor. An event whose JSON is
 * exactly a content delta -- one choice, a non-empty delta.content (or text), no
 * finish_reason, no usage, no error, no reasoning -- is validated and read by a
 * strict scanner below and recorded on the sink without a Python call: the event
 * counter decremented, the stamp kept for rec.chunk_times, the text's length in
 * code points for texts, rec.first_token_time set once. Anything the scanner is not
 * sure of (another shape, an escaped key, a lone surrogate, invalid JSON or UTF-8,
 * a duplicated field, the event limit about to be hit) goes to on_event as before,
 * so msgspec and the Python code decide it: the C path only ever takes events whose
 * outcome it reproduces exactly (tests/test_lane.py compares the two on generated
 * events).
 *
 * Lane(on_event, on_block, on_raw, max_event_bytes, sink=None)
 *   feed(data: bytes, t: float) -> int: -1 while the message goes on, else
 *       the offset in data just past the end of the HTTP message;
 *   done: a "data: [DONE]" event was seen (later events are not delivered);
 *   take_rest() -> bytes: the buffered start of an unfinished event;
 *   content_events: the plain content events recorded here, not by on_event.
 *   sync(): writes events_left and the recorded events, kept in C, back to the sink.
 * The sink's events_left is counted here in C between the lane's calls out to Python:
 * read once, written back before every callback (on_event, on_block, on_raw, on_end,
 * on_error), before feed returns and on sync() (the connection calls it when the lane's
 * read ends), so no Python code sees a stale count. Reading and writing a Python int
 * attribute per event was ~3 % of the client's perf samples at one event per read
 * (PyObject_GetAttr and PyMember_GetOne alone, 256 streams).
 * The stamps and text lengths of plain content events are kept the same way: in C
 * arrays here, appended to rec.chunk_times (array('d')) and sink.texts (array('q')) in
 * one frombytes call each at those same write-backs. A call to chunk_times.append and
 * a list append per event (their argument parsing, a float and an int object) were 5 %
 * of the client's CPU at 64 streams of one-token events (perf, against the protocol
 * floor: docs/performance.md).
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

static int hexval(char c);

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
    /* plain content events, recorded on the sink (NULL: every event to on_event) */
    PyObject *sink;           /* has events_left (int) */
    PyObject *rec;            /* sink.rec: first_token_time */
    PyObject *times;          /* sink.rec.chunk_times (an array('d')) */
    PyObject *texts;          /* sink.texts (an array('q')) */
    double *pending_times;    /* plain content events recorded since the last write-back */
    long long *pending_chars;
    Py_ssize_t pending;
    Py_ssize_t pending_cap;
    char first_seen;          /* rec.first_token_time is known to be set */
    char left_read;           /* left holds sink.events_left (read since the last write-back) */
    char left_dirty;          /* left changed since it was read: write it back */
    long left;
    Py_ssize_t content_events;
    /* data_received's owner (attach): on_end(end, size, t) once [DONE] was seen or the
       message ended; on_error(exc) when the body cannot be read; clock() stamps a read */
    PyObject *on_end;
    PyObject *on_error;
    PyObject *clock;
} Lane;

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_event);
    Py_VISIT(self->on_block);
    Py_VISIT(self->on_raw);
    Py_VISIT(self->sink);
    Py_VISIT(self->rec);
    Py_VISIT(self->times);
    Py_VISIT(self->texts);
    Py_VISIT(self->on_end);
    Py_VISIT(self->on_error);
    Py_VISIT(self->clock);
    return 0;
}

static int flush_pending(Lane *self);

/* A lane dropped before its write-back (a connection collected, not closed) still leaves
   the events it recorded on the sink. */
static void
flush_before_clear(Lane *self)
{
    if (self->pending == 0 || self->times == NULL || self->texts == NULL)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (flush_pending(self) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    PyErr_Restore(type, value, tb);
}

static int
lane_clear(Lane *self)
{
    flush_before_clear(self);
    Py_CLEAR(self->on_event);
    Py_CLEAR(self->on_block);
    Py_CLEAR(self->on_raw);
    Py_CLEAR(self->sink);
    Py_CLEAR(self->rec);
    Py_CLEAR(self->times);
    Py_CLEAR(self->texts);
    Py_CLEAR(self->on_end);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->clock);
    return 0;
}

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    PyMem_Free(self->buf);
    PyMem_Free(self->pending_times);
    PyMem_Free(self->pending_chars);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *array_type; /* array.array */

/* obj (a new reference), an array.array of this typecode with 8-byte items (the pending
   stamps and lengths are appended as their bytes, by its frombytes); NULL with TypeError
   if it is not one. The array is held, not its bound frombytes: a bound method is one more
   object a request for the collector to walk while the request is in flight. */
static PyObject *
array_of(PyObject *obj, const char *typecode, const char *what)
{
    int is_array = PyObject_IsInstance(obj, array_type);
    if (is_array < 0)
        return NULL;
    PyObject *code = is_array ? PyObject_GetAttrString(obj, "typecode") : NULL;
    if (code == NULL) {
        PyErr_Clear();
    }
    else {
        int same = PyUnicode_Check(code) && PyUnicode_CompareWithASCIIString(code, typecode) == 0;
        Py_DECREF(code);
        PyObject *size = same ? PyObject_GetAttrString(obj, "itemsize") : NULL;
        long itemsize = size ? PyLong_AsLong(size) : -1;
        Py_XDECREF(size);
        PyErr_Clear();
        if (itemsize == 8)
            return Py_NewRef(obj);
    }
    PyErr_Format(PyExc_TypeError, "Lane(sink=...): %s must be an array.array('%s')", what, typecode);
    return NULL;
}

static int
lane_init(Lane *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"on_event", "on_block", "on_raw", "max_event_bytes", "sink", NULL};
    PyObject *on_event, *on_block, *on_raw, *sink = Py_None;
    Py_ssize_t max_event;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOn|O", kwlist, &on_event, &on_block, &on_raw, &max_event, &sink))
        return -1;
    flush_before_clear(self);
    Py_CLEAR(self->sink);
    Py_CLEAR(self->rec);
    Py_CLEAR(self->times);
    Py_CLEAR(self->texts);
    self->pending = 0;
    self->first_seen = 0;
    self->left_read = 0;
    self->left_dirty = 0;
    self->content_events = 0;
    if (sink != Py_None) {
        PyObject *rec = PyObject_GetAttrString(sink, "rec");
        if (rec == NULL)
            return -1;
        PyObject *got = PyObject_GetAttrString(rec, "chunk_times");
        PyObject *times = got ? array_of(got, "d", "sink.rec.chunk_times") : NULL;
        Py_XDECREF(got);
        got = times ? PyObject_GetAttrString(sink, "texts") : NULL;
        PyObject *texts = got ? array_of(got, "q", "sink.texts") : NULL;
        Py_XDECREF(got);
        if (texts == NULL) {
            Py_DECREF(rec);
            Py_XDECREF(times);
            return -1;
        }
        Py_INCREF(sink);
        self->sink = sink;
        self->rec = rec;
        self->times = times;
        self->texts = texts;
    }
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

static PyObject *str_events_left, *str_first_token_time;
static PyObject *array_frombytes_method; /* array.array.frombytes, the unbound method */
static PyCFunction array_frombytes_c;     /* its C function, where it takes one argument */

/* array.frombytes(memory) through array.array's own method: no bound method is made (one
   more object a request for the collector) and no lookup by name. Its C function is called
   straight where it is a METH_O one (CPython 3.11's), as a bound method's call would: the
   method's own call checks its argument's type again, ~15 ns a read more. 0 or -1. */
static int
array_frombytes(PyObject *array, void *p, Py_ssize_t size)
{
    PyObject *view = PyMemoryView_FromMemory((char *)p, size, PyBUF_READ);
    if (view == NULL)
        return -1;
    PyObject *argv[2] = {array, view};
    PyObject *r = array_frombytes_c != NULL ? array_frombytes_c(array, view)
                                             : PyObject_Vectorcall(array_frombytes_method, argv, 2, NULL);
    Py_DECREF(view);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Appends the pending stamps and lengths to rec.chunk_times and sink.texts. 0 or -1. */
static int
flush_pending(Lane *self)
{
    Py_ssize_t n = self->pending;
    if (n == 0)
        return 0;
    self->pending = 0;
    if (array_frombytes(self->times, self->pending_times, n * (Py_ssize_t)sizeof(double)) < 0)
        return -1;
    return array_frombytes(self->texts, self->pending_chars, n * (Py_ssize_t)sizeof(long long));
}

/* Writes what was counted and recorded in C back to the sink: the pending stamps and
   lengths, and events_left (before any Python code runs that may read or change them);
   the next content event reads events_left afresh. 0 or -1. */
static int
sync_sink(Lane *self)
{
    if (flush_pending(self) < 0)
        return -1;
    self->left_read = 0;
    if (!self->left_dirty)
        return 0;
    self->left_dirty = 0;
    PyObject *nv = PyLong_FromLong(self->left);
    if (nv == NULL)
        return -1;
    int r = PyObject_SetAttr(self->sink, str_events_left, nv);
    Py_DECREF(nv);
    return r;
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
    if (sync_sink(self) < 0)
        return -1;
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


/* -- plain content events ---------------------------------------------------------
 * A strict JSON scanner for one event's data. It answers 1 (a plain content event;
 * *chars is its text's length in code points, as Python's len() of the decoded str)
 * or 0 (anything else, or anything it is not sure of: on_event decides). It never
 * rejects: invalid JSON is simply "not sure" and goes to msgspec, whose error
 * message the record keeps. */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    int depth;
} Scan;

#define SCAN_MAX_DEPTH 64

static void
scan_ws(Scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int
hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval((char)p[k]);
        if (h < 0)
            return 0;
        v = (v << 4) | (unsigned)h;
    }
    *out = v;
    return 1;
}

/* A string at s->p (its opening quote): strict UTF-8, escapes checked. 1 and the
 * code points in *chars (if chars) and whether it had an escape in *escaped, else 0.
 * Lone or reversed surrogate escapes are "not sure". */
/* printable ASCII but '"' and '\\': a string's bytes that need no second look (set at import) */
static unsigned char plain_ascii[256];

static int
scan_string(Scan *s, Py_ssize_t *chars, int *escaped)
{
    const unsigned char *p = s->p + 1, *end = s->end;
    Py_ssize_t n = 0;
    int esc = 0;
    while (p < end) {
        const unsigned char *run = p;
        while (p < end && plain_ascii[*p])
            p++;
        n += p - run;
        if (p >= end)
            break;
        unsigned char c = *p;
        if (c == '"') {
            s->p = p + 1;
            if (chars)
                *chars = n;
            if (escaped)
                *escaped = esc;
            return 1;
        }
        if (c < 0x20)
            return 0;
        if (c < 0x80) {
            if (c == '\\') {
                esc = 1;
                if (p + 1 >= end)
                    return 0;
                unsigned char e = p[1];
                if (e == 'u') {
                    unsigned u;
                    if (p + 6 > end || !hex4(p + 2, &u))
                        return 0;
                    p += 6;
                    if (u >= 0xD800 && u <= 0xDBFF) { /* a pair: \uD8xx\uDCxx, one code point */
                        unsigned lo;
                        if (p + 6 > end || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                            return 0;
                        p += 6;
                    }
                    else if (u >= 0xDC00 && u <= 0xDFFF) {
                        return 0;
                    }
                }
                else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' || e == 't') {
                    p += 2;
                }
                else {
                    return 0;
                }
            }
            else {
                p++;
            }
            n++;
            continue;
        }
        /* UTF-8, strictly (RFC 3629: no overlong forms, no surrogates, <= U+10FFFF) */
        int more;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            more = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            more = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        }
        else if (c >= 0xF0 && c <= 0xF4) {
            more = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        }
        else
            return 0;
        if (p + 1 + more > end || p[1] < lo || p[1] > hi)
            return 0;
        for (int k = 2; k <= more; k++)
            if ((p[k] & 0xC0) != 0x80)
                return 0;
        p += 1 + more;
        n++;
    }
    return 0;
}

static int
scan_number(Scan *s)
{
    const unsigned char *p = s->p, *end = s->end;
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return 0;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    else
        return 0;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return 0;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return 0;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    s->p = p;
    return 1;
}

static int
scan_literal(Scan *s, const char *word, Py_ssize_t n)
{
    if (s->end - s->p < n || memcmp(s->p, word, n) != 0)
        return 0;
    s->p += n;
    return 1;
}

/* After a member's or an element's value: ',' (1: another follows), the container's
 * ``closer`` (2: it ends), else 0. */
static int
scan_next(Scan *s, char closer)
{
    scan_ws(s);
    if (s->p >= s->end)
        return 0;
    if (*s->p == ',') {
        s->p++;
        return 1;
    }
    if (*s->p == closer) {
        s->p++;
        return 2;
    }
    return 0;
}

static int scan_value(Scan *s);

/* Members of an object whose '{' was just read: keys and values checked, nothing kept. */
static int
scan_members(Scan *s)
{
    scan_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 1;
    }
    for (;;) {
        scan_ws(s);
        if (s->p >= s->end || *s->p != '"' || !scan_string(s, NULL, NULL))
            return 0;
        scan_ws(s);
        if (s->p >= s->end || *s->p++ != ':')
            return 0;
        scan_ws(s);
        if (!scan_value(s))
            return 0;
        int next = scan_next(s, '}');
        if (next != 1)
            return next == 2;
    }
}

static int
scan_value(Scan *s)
{
    if (s->p >= s->end)
        return 0;
    switch (*s->p) {
    case '"':
        return scan_string(s, NULL, NULL);
    case '{': {
        if (++s->depth > SCAN_MAX_DEPTH)
            return 0;
        s->p++;
        int ok = scan_members(s);
        s->depth--;
        return ok;
    }
    case '[': {
        if (++s->depth > SCAN_MAX_DEPTH)
            return 0;
        s->p++;
        scan_ws(s);
        if (s->p < s->end && *s->p == ']') {
            s->p++;
            s->depth--;
            return 1;
        }
        for (;;) {
            scan_ws(s);
            if (!scan_value(s))
                return 0;
            int next = scan_next(s, ']');
            if (next != 1) {
                s->depth--;
                return next == 2;
            }
        }
    }
    case 't':
        return scan_literal(s, "true", 4);
    case 'f':
        return scan_literal(s, "false", 5);
    case 'n':
        return scan_literal(s, "null", 4);
    default:
        return scan_number(s);
    }
}

/* A key at s->p, then its ':'. 1 with the key's bytes (unescaped keys only: an escaped
 * key could spell a field msgspec reads, so it is "not sure"), else 0. */
static int
scan_key(Scan *s, const unsigned char **key, Py_ssize_t *len)
{
    scan_ws(s);
    if (s->p >= s->end || *s->p != '"')
        return 0;
    const unsigned char *start = s->p + 1;
    int escaped;
    if (!scan_string(s, NULL, &escaped) || escaped)
        return 0;
    *key = start;
    *len = s->p - 1 - start;
    scan_ws(s);
    if (s->p >= s->end || *s->p++ != ':')
        return 0;
    scan_ws(s);
    return 1;
}

static int
scan_null(Scan *s)
{
    return scan_literal(s, "null", 4);
}

/* A string or null, for a field msgspec types as str | None: 1 (a string, its code
 * points in *chars), 2 (null), 0 (anything else). */
static int
scan_str_or_null(Scan *s, Py_ssize_t *chars)
{
    if (s->p < s->end && *s->p == '"')
        return scan_string(s, chars, NULL);
    return scan_null(s) ? 2 : 0;
}

/* The keys of an object the scanner reads (the others are validated and skipped): each
 * key's value is scanned by its function, which fills the scan's context. */
typedef int (*field_fn)(Scan *s, void *ctx);
typedef struct {
    const char *name;
    Py_ssize_t len;
    field_fn scan;
} Field;
#define FIELD(name, fn) {name, sizeof(name) - 1, fn}

/* An object's members, its '{' just read: a known key at most once (msgspec keeps the
 * last of a repeated key: "not sure"), each value scanned. 1, or 0 when not sure. */
static int
scan_object(Scan *s, const Field *fields, int nfields, void *ctx)
{
    unsigned seen = 0;
    if (++s->depth > SCAN_MAX_DEPTH)
        return 0;
    scan_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        s->depth--;
        return 1;
    }
    for (;;) {
        const unsigned char *k;
        Py_ssize_t n;
        int i;
        if (!scan_key(s, &k, &n))
            return 0;
        for (i = 0; i < nfields; i++)
            if (n == fields[i].len && memcmp(k, fields[i].name, n) == 0)
                break;
        if (i < nfields) {
            if (seen & (1u << i))
                return 0;
            seen |= 1u << i;
            if (!fields[i].scan(s, ctx))
                return 0;
        }
        else if (!scan_value(s))
            return 0;
        int next = scan_next(s, '}');
        if (next != 1) {
            s->depth--;
            return next == 2;
        }
    }
}

static int
field_null(Scan *s, void *ctx)
{
    (void)ctx;
    return scan_null(s);
}

/* choices[0].delta: content a string or null; the reasoning fields null (or absent) */
typedef struct {
    Py_ssize_t content; /* code points, or -1: none */
} Delta;

static int
delta_content(Scan *s, void *ctx)
{
    Py_ssize_t chars;
    int r = scan_str_or_null(s, &chars);
    ((Delta *)ctx)->content = r == 1 ? chars : -1;
    return r != 0;
}

static const Field DELTA_FIELDS[] = {
    FIELD("content", delta_content),
    FIELD("reasoning_content", field_null),
    FIELD("reasoning", field_null),
};

/* choices[0]: text (completions) or delta (chat), finish_reason null (or absent) */
typedef struct {
    int text_kind;  /* 1 a string, 2 null or absent */
    Py_ssize_t text;
    int has_delta;  /* an object, not null or absent */
    Py_ssize_t content;
} Choice;

static int
choice_text(Scan *s, void *ctx)
{
    Choice *c = ctx;
    c->text_kind = scan_str_or_null(s, &c->text);
    return c->text_kind != 0;
}

static int
choice_delta(Scan *s, void *ctx)
{
    Choice *c = ctx;
    if (s->p < s->end && *s->p == '{') {
        Delta d = {-1};
        s->p++;
        if (!scan_object(s, DELTA_FIELDS, 3, &d))
            return 0;
        c->has_delta = 1;
        c->content = d.content;
        return 1;
    }
    return scan_null(s);
}

static const Field CHOICE_FIELDS[] = {
    FIELD("text", choice_text),
    FIELD("delta", choice_delta),
    FIELD("finish_reason", field_null),
};

/* The event: choices exactly one choice with content; usage and error null (or absent) */
typedef struct {
    Py_ssize_t chars; /* the content's code points, or -1: none */
} Event;

static int
event_choices(Scan *s, void *ctx)
{
    /* exactly one choice: every element is typed by msgspec, so more are "not sure" */
    Choice c = {2, -1, 0, -1};
    if (s->p >= s->end || *s->p++ != '[')
        return 0;
    scan_ws(s);
    if (s->p >= s->end || *s->p++ != '{' || !scan_object(s, CHOICE_FIELDS, 3, &c))
        return 0;
    scan_ws(s);
    if (s->p >= s->end || *s->p++ != ']')
        return 0;
    /* completions: the text, when it is a string (an empty one is no content); chat: the delta's content */
    ((Event *)ctx)->chars = c.text_kind == 1 ? c.text : c.has_delta ? c.content : -1;
    return 1;
}

static const Field EVENT_FIELDS[] = {
    FIELD("choices", event_choices),
    FIELD("usage", field_null),
    FIELD("error", field_null),
};

static int
plain_content(const char *data, Py_ssize_t size, Py_ssize_t *chars)
{
    Scan s = {(const unsigned char *)data, (const unsigned char *)data + size, 0};
    Event e = {-1};
    scan_ws(&s);
    if (s.p >= s.end || *s.p++ != '{' || !scan_object(&s, EVENT_FIELDS, 3, &e))
        return 0;
    scan_ws(&s);
    *chars = e.chars;
    return s.p == s.end && e.chars > 0;
}

/* Records a plain content event on the sink, as ResponseAccumulator.on_event would:
 * 1 (recorded), 0 (not taken: the event limit is one away, on_event raises it), -1 (error). */
static int
record_content(Lane *self, Py_ssize_t chars, PyObject *t)
{
    if (!self->left_read) {
        PyObject *left = PyObject_GetAttr(self->sink, str_events_left);
        if (left == NULL)
            return -1;
        long v = PyLong_AsLong(left);
        Py_DECREF(left);
        if (v == -1 && PyErr_Occurred())
            return -1;
        self->left = v;
        self->left_read = 1;
    }
    if (self->left == 1)
        return 0;
    self->left--;
    self->left_dirty = 1;
    if (!self->first_seen) {
        PyObject *first = PyObject_GetAttr(self->rec, str_first_token_time);
        if (first == NULL)
            return -1;
        int unset = first == Py_None;
        Py_DECREF(first);
        if (unset && PyObject_SetAttr(self->rec, str_first_token_time, t) < 0)
            return -1;
        self->first_seen = 1;
    }
    double stamp = PyFloat_AsDouble(t);
    if (stamp == -1.0 && PyErr_Occurred())
        return -1;
    if (self->pending == self->pending_cap) {
        Py_ssize_t cap = self->pending_cap ? self->pending_cap * 2 : 64;
        double *nt = PyMem_Realloc(self->pending_times, cap * sizeof(double));
        if (nt == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->pending_times = nt;
        long long *nc = PyMem_Realloc(self->pending_chars, cap * sizeof(long long));
        if (nc == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->pending_chars = nc;
        self->pending_cap = cap;
    }
    self->pending_times[self->pending] = stamp;
    self->pending_chars[self->pending] = (long long)chars;
    self->pending++;
    self->content_events++;
    return 1;
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
        else if (self->sink != NULL) {
            Py_ssize_t chars;
            if (plain_content(p + 6, n - 6, &chars)) {
                int taken = record_content(self, chars, t);
                if (taken < 0)
                    return -1;
                if (taken)
                    return 0;
            }
        }
        if (sync_sink(self) < 0)
            return -1;
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
feed_body(Lane *self, PyObject *const *args, Py_ssize_t nargs)
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

/* feed() from Python: the body's bytes, and events_left written back before it returns. */
static PyObject *
lane_feed(Lane *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = feed_body(self, args, nargs);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);  /* the write-back runs with no exception set */
    if (sync_sink(self) < 0) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        Py_XDECREF(result);
        return NULL;
    }
    PyErr_Restore(type, value, tb);
    return result;
}

static PyObject *
lane_sync(Lane *self, PyObject *Py_UNUSED(ignored))
{
    if (sync_sink(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* What the connection's data_received did per read, as the transport's callback itself
   (the lane is set as the protocol's data_received while it reads a body): no Python frame
   per read. The read is stamped by the owner's clock (time.perf_counter: a C call). */
static PyObject *
lane_data_received(Lane *self, PyObject *data)
{
    if (self->on_end == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Lane.data_received before attach()");
        return NULL;
    }
    PyObject *t = PyObject_CallNoArgs(self->clock);
    if (t == NULL)
        return NULL;
    PyObject *args[3] = {data, t, NULL};
    /* events_left is written back before on_end and on_error, not after every read:
       between reads only on_event reads it, and the lane calls on_event after a write-back */
    PyObject *end = feed_body(self, args, 2);
    PyObject *result = NULL;
    if (end == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) { /* never into the event loop's callback */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL)
                PyException_SetTraceback(value, tb);
            result = sync_sink(self) < 0 ? NULL : PyObject_CallOneArg(self->on_error, value);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
    }
    else {
        Py_ssize_t offset = PyLong_AsSsize_t(end);
        if (self->done || offset >= 0) {
            PyObject *size = sync_sink(self) < 0 ? NULL : PyLong_FromSsize_t(PyBytes_GET_SIZE(data));
            if (size != NULL) {
                PyObject *call[3] = {end, size, t};
                result = PyObject_Vectorcall(self->on_end, call, 3, NULL);
                Py_DECREF(size);
            }
        }
        else {
            result = Py_NewRef(Py_None);
        }
        Py_DECREF(end);
    }
    Py_DECREF(t);
    return result;
}

static PyObject *
lane_attach(Lane *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyCallable_Check(args[0]) || !PyCallable_Check(args[1]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "attach(on_end, on_error, clock)");
        return NULL;
    }
    Py_XSETREF(self->on_end, Py_NewRef(args[0]));
    Py_XSETREF(self->on_error, Py_NewRef(args[1]));
    Py_XSETREF(self->clock, Py_NewRef(args[2]));
    Py_RETURN_NONE;
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
    {"data_received", (PyCFunction)lane_data_received, METH_O,
     "the transport's read callback while the lane reads a body (after attach)"},
    {"attach", (PyCFunction)(void (*)(void))lane_attach, METH_FASTCALL,
     "attach(on_end, on_error, clock): data_received's owner and its clock"},
    {"take_rest", (PyCFunction)lane_take_rest, METH_NOARGS,
     "the buffered start of an unfinished event (the buffer is emptied)"},
    {"sync", (PyCFunction)lane_sync, METH_NOARGS,
     "write the events_left counted in C back to the sink (data_received leaves it between reads)"},
    {NULL}
};

static PyMemberDef lane_members[] = {
    {"done", T_BOOL, offsetof(Lane, done), READONLY, "a data: [DONE] event was seen"},
    {"content_events", T_PYSSIZET, offsetof(Lane, content_events), READONLY,
     "plain content events recorded on the sink here, without on_event"},
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
    for (int c = 0x20; c < 0x80; c++)
        plain_ascii[c] = c != '"' && c != '\\';
    str_events_left = PyUnicode_InternFromString("events_left");
    str_first_token_time = PyUnicode_InternFromString("first_token_time");
    if (str_events_left == NULL || str_first_token_time == NULL)
        return NULL;
    PyObject *array_module = PyImport_ImportModule("array");
    array_type = array_module ? PyObject_GetAttrString(array_module, "array") : NULL;
    Py_XDECREF(array_module);
    array_frombytes_method = array_type ? PyObject_GetAttrString(array_type, "frombytes") : NULL;
    if (array_frombytes_method == NULL)
        return NULL;
    if (Py_IS_TYPE(array_frombytes_method, &PyMethodDescr_Type)) {
        PyMethodDef *def = ((PyMethodDescrObject *)array_frombytes_method)->d_method;
        if ((def->ml_flags & ~METH_COEXIST) == METH_O)
            array_frombytes_c = def->ml_meth;
    }
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
