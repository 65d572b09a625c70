/* sha256 of two independent byte streams at once, on one core, with the x86 SHA extensions.
 *
 * One sha256 stream is latency bound: each SHA256RNDS2 (two rounds) needs the previous one's result, and the
 * unit could start a new one before that result is ready. Interleaving the rounds of two streams fills those
 * gaps: on this project's hosts (AMD EPYC, Zen 2, 2.0 GHz) one stream hashes 1.2 GB/s per core (the same as
 * OpenSSL's), two interleaved streams 2.0 GB/s together. Three or four streams measured slower there (each
 * stream keeps 8 values in xmm registers, of which there are 16).
 *
 * Python API (sha256_lanes.py wraps it and falls back to hashlib):
 *   accelerated() -> bool           whether this CPU has the SHA extensions (and SSSE3/SSE4.1);
 *   Sha256()                        a sha256 object: update(buffer), digest(), hexdigest(), like hashlib's;
 *   update_pair(a, data_a, b, data_b)   a.update(data_a); b.update(data_b), the common part in two lanes.
 * The GIL is released while hashing. One object must not be updated from two threads at once (it raises).
 * Elsewhere (no x86, no SHA extensions) the module imports and accelerated() is False.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_SHA_LANES 1
#include <cpuid.h>
#include <immintrin.h>
#endif

static const uint32_t INITIAL_STATE[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                          0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#ifdef HAVE_SHA_LANES

/* FIPS 180-4 round constants, four per 128-bit add. */
static const uint32_t ROUND_CONSTANTS[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* SHA256RNDS2 keeps the eight working variables as two registers, (a, b, e, f) and (c, d, g, h). */
typedef struct {
    __m128i abef, cdgh;
} lane_state;

SHA_TARGET static inline lane_state lane_load(const uint32_t h[8]) {
    __m128i dcba = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h), 0xB1);       /* c d a b */
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h + 4)), 0x1B); /* h g f e */
    lane_state s = {_mm_alignr_epi8(dcba, efgh, 8), _mm_blend_epi16(efgh, dcba, 0xF0)};
    return s;
}

SHA_TARGET static inline void lane_store(lane_state s, uint32_t h[8]) {
    __m128i feba = _mm_shuffle_epi32(s.abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(s.cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(feba, dchg, 0xF0));
    _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(dchg, feba, 8));
}

/* Message words t..t+3 (t >= 16) from w[t-16..t-13], w[t-12..t-9], w[t-8..t-5], w[t-4..t-1]. */
SHA_TARGET static inline __m128i next_words(__m128i w16, __m128i w12, __m128i w8, __m128i w4) {
    __m128i t = _mm_add_epi32(_mm_sha256msg1_epu32(w16, w12), _mm_alignr_epi8(w4, w8, 4));
    return _mm_sha256msg2_epu32(t, w4);
}

/* Four rounds with message words + constants `wk`. */
SHA_TARGET static inline void four_rounds(lane_state *s, __m128i wk) {
    s->cdgh = _mm_sha256rnds2_epu32(s->cdgh, s->abef, wk);
    s->abef = _mm_sha256rnds2_epu32(s->abef, s->cdgh, _mm_shuffle_epi32(wk, 0x0E));
}

SHA_TARGET static inline __m128i load_words(const uint8_t *p) {
    const __m128i big_endian = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    return _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p), big_endian);
}

/* Compress `blocks` 64-byte blocks of `data` into `h`. */
SHA_TARGET static void compress_one(uint32_t h[8], const uint8_t *data, size_t blocks) {
    lane_state s = lane_load(h);
    for (; blocks; blocks--, data += 64) {
        lane_state start = s;
        __m128i w[4];
        for (int i = 0; i < 4; i++) w[i] = load_words(data + 16 * i);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i >= 4) w[i & 3] = next_words(w[i & 3], w[(i + 1) & 3], w[(i + 2) & 3], w[(i + 3) & 3]);
            four_rounds(&s, _mm_add_epi32(w[i & 3], _mm_load_si128((const __m128i *)(ROUND_CONSTANTS + 4 * i))));
        }
        s.abef = _mm_add_epi32(s.abef, start.abef);
        s.cdgh = _mm_add_epi32(s.cdgh, start.cdgh);
    }
    lane_store(s, h);
}

/* compress_one(ha, a, blocks) and compress_one(hb, b, blocks), their instructions interleaved. */
SHA_TARGET static void compress_two(uint32_t ha[8], const uint8_t *a, uint32_t hb[8], const uint8_t *b, size_t blocks) {
    lane_state sa = lane_load(ha), sb = lane_load(hb);
    for (; blocks; blocks--, a += 64, b += 64) {
        lane_state start_a = sa, start_b = sb;
        __m128i wa[4], wb[4];
        for (int i = 0; i < 4; i++) {
            wa[i] = load_words(a + 16 * i);
            wb[i] = load_words(b + 16 * i);
        }
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i >= 4) {
                wa[i & 3] = next_words(wa[i & 3], wa[(i + 1) & 3], wa[(i + 2) & 3], wa[(i + 3) & 3]);
                wb[i & 3] = next_words(wb[i & 3], wb[(i + 1) & 3], wb[(i + 2) & 3], wb[(i + 3) & 3]);
            }
            __m128i k = _mm_load_si128((const __m128i *)(ROUND_CONSTANTS + 4 * i));
            __m128i wka = _mm_add_epi32(wa[i & 3], k), wkb = _mm_add_epi32(wb[i & 3], k);
            sa.cdgh = _mm_sha256rnds2_epu32(sa.cdgh, sa.abef, wka);
            sb.cdgh = _mm_sha256rnds2_epu32(sb.cdgh, sb.abef, wkb);
            sa.abef = _mm_sha256rnds2_epu32(sa.abef, sa.cdgh, _mm_shuffle_epi32(wka, 0x0E));
            sb.abef = _mm_sha256rnds2_epu32(sb.abef, sb.cdgh, _mm_shuffle_epi32(wkb, 0x0E));
        }
        sa.abef = _mm_add_epi32(sa.abef, start_a.abef);
        sa.cdgh = _mm_add_epi32(sa.cdgh, start_a.cdgh);
        sb.abef = _mm_add_epi32(sb.abef, start_b.abef);
        sb.cdgh = _mm_add_epi32(sb.cdgh, start_b.cdgh);
    }
    lane_store(sa, ha);
    lane_store(sb, hb);
}

static int cpu_has_sha_lanes(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
    int sse = (ecx & bit_SSSE3) && (ecx & bit_SSE4_1);
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
    return sse && (ebx & bit_SHA);
}

#else /* no x86 SHA extensions: the module imports, accelerated() is False and Sha256() refuses */

static void compress_one(uint32_t h[8], const uint8_t *data, size_t blocks) { (void)h, (void)data, (void)blocks; }
static void compress_two(uint32_t ha[8], const uint8_t *a, uint32_t hb[8], const uint8_t *b, size_t blocks) {
    (void)ha, (void)a, (void)hb, (void)b, (void)blocks;
}
static int cpu_has_sha_lanes(void) { return 0; }

#endif

static int ACCELERATED = 0;

/* ---- one stream: state, the bytes of an unfinished block, total length ---- */

typedef struct {
    PyObject_HEAD
    uint32_t h[8];
    uint8_t pending[64];
    size_t pending_len;
    uint64_t total_len;
    int busy; /* set (under the GIL) while a thread hashes into it with the GIL released */
} Sha256Object;

static PyTypeObject Sha256Type;

/* Top up the unfinished block from *data; compress it once full. */
static void fill_pending(Sha256Object *s, const uint8_t **data, size_t *len) {
    if (s->pending_len == 0) return;
    size_t take = 64 - s->pending_len < *len ? 64 - s->pending_len : *len;
    memcpy(s->pending + s->pending_len, *data, take);
    s->pending_len += take, s->total_len += take, *data += take, *len -= take;
    if (s->pending_len == 64) {
        compress_one(s->h, s->pending, 1);
        s->pending_len = 0;
    }
}

/* Whole blocks are compressed (in one lane), the rest kept for later. */
static void absorb(Sha256Object *s, const uint8_t *data, size_t len) {
    fill_pending(s, &data, &len);
    size_t blocks = len / 64;
    if (blocks) {
        compress_one(s->h, data, blocks);
        s->total_len += blocks * 64, data += blocks * 64, len -= blocks * 64;
    }
    if (len) {
        memcpy(s->pending + s->pending_len, data, len);
        s->pending_len += len, s->total_len += len;
    }
}

static void absorb_pair(Sha256Object *a, const uint8_t *da, size_t la, Sha256Object *b, const uint8_t *db, size_t lb) {
    fill_pending(a, &da, &la);
    fill_pending(b, &db, &lb);
    if (a->pending_len == 0 && b->pending_len == 0) { /* both block aligned: hash the common blocks side by side */
        size_t blocks = (la < lb ? la : lb) / 64;
        if (blocks) {
            compress_two(a->h, da, b->h, db, blocks);
            a->total_len += blocks * 64, b->total_len += blocks * 64;
            da += blocks * 64, db += blocks * 64, la -= blocks * 64, lb -= blocks * 64;
        }
    }
    absorb(a, da, la);
    absorb(b, db, lb);
}

static void finish(const Sha256Object *s, uint8_t out[32]) {
    uint32_t h[8];
    uint8_t tail[128] = {0};
    memcpy(h, s->h, sizeof h);
    memcpy(tail, s->pending, s->pending_len);
    tail[s->pending_len] = 0x80;
    size_t tail_len = s->pending_len + 9 <= 64 ? 64 : 128; /* room for 0x80 and the 64-bit bit length */
    uint64_t bits = s->total_len * 8;
    for (int i = 0; i < 8; i++) tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    compress_one(h, tail, tail_len / 64);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24), out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8), out[4 * i + 3] = (uint8_t)h[i];
    }
}

static PyObject *Sha256_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, ":Sha256", keywords)) return NULL;
    if (!ACCELERATED) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no SHA extensions: use hashlib.sha256 (sha256_lanes.py does)");
        return NULL;
    }
    Sha256Object *s = (Sha256Object *)type->tp_alloc(type, 0);
    if (s == NULL) return NULL;
    memcpy(s->h, INITIAL_STATE, sizeof s->h);
    return (PyObject *)s;
}

static int claim(Sha256Object *s) {
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Sha256 object is being updated by another thread");
        return 0;
    }
    s->busy = 1;
    return 1;
}

static int get_bytes(PyObject *obj, Py_buffer *view) {
    if (PyUnicode_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "Strings must be encoded before hashing");
        return 0;
    }
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) == 0;
}

static PyObject *Sha256_update(Sha256Object *self, PyObject *data) {
    Py_buffer view;
    if (!get_bytes(data, &view)) return NULL;
    if (!claim(self)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    absorb(self, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* A digest reads the state: not while another thread hashes into it. */
static int idle(Sha256Object *s) {
    if (!claim(s)) return 0;
    s->busy = 0;
    return 1;
}

static PyObject *Sha256_digest(Sha256Object *self, PyObject *unused) {
    uint8_t out[32];
    if (!idle(self)) return NULL;
    finish(self, out);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *Sha256_hexdigest(Sha256Object *self, PyObject *unused) {
    static const char hex[] = "0123456789abcdef";
    uint8_t out[32];
    char text[64];
    if (!idle(self)) return NULL;
    finish(self, out);
    for (int i = 0; i < 32; i++) text[2 * i] = hex[out[i] >> 4], text[2 * i + 1] = hex[out[i] & 15];
    return PyUnicode_FromStringAndSize(text, 64);
}

static PyObject *Sha256_get_name(Sha256Object *self, void *closure) { return PyUnicode_FromString("sha256"); }
static PyObject *Sha256_get_digest_size(Sha256Object *self, void *closure) { return PyLong_FromLong(32); }
static PyObject *Sha256_get_block_size(Sha256Object *self, void *closure) { return PyLong_FromLong(64); }

static PyMethodDef Sha256_methods[] = {
    {"update", (PyCFunction)Sha256_update, METH_O, "Hash the bytes of a buffer (the GIL is released meanwhile)."},
    {"digest", (PyCFunction)Sha256_digest, METH_NOARGS, "The 32-byte digest of everything hashed so far."},
    {"hexdigest", (PyCFunction)Sha256_hexdigest, METH_NOARGS, "The digest as 64 lowercase hex digits."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Sha256_getset[] = {
    {"name", (getter)Sha256_get_name, NULL, "Always 'sha256'.", NULL},
    {"digest_size", (getter)Sha256_get_digest_size, NULL, "32 bytes.", NULL},
    {"block_size", (getter)Sha256_get_block_size, NULL, "64 bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject Sha256Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dynamo_mega.convert._sha256_lanes.Sha256",
    .tp_basicsize = sizeof(Sha256Object),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "sha256 of a byte stream, hashed with the x86 SHA extensions (two streams at once with update_pair).",
    .tp_new = Sha256_new,
    .tp_methods = Sha256_methods,
    .tp_getset = Sha256_getset,
};

static PyObject *update_pair(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "update_pair(a, data_a, b, data_b) takes 4 arguments");
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], &Sha256Type) || !PyObject_TypeCheck(args[2], &Sha256Type)) {
        PyErr_SetString(PyExc_TypeError, "update_pair: a and b must be Sha256 objects");
        return NULL;
    }
    if (args[0] == args[2]) {
        PyErr_SetString(PyExc_ValueError, "update_pair: a and b must be two different Sha256 objects");
        return NULL;
    }
    Sha256Object *a = (Sha256Object *)args[0], *b = (Sha256Object *)args[2];
    Py_buffer va, vb;
    if (!get_bytes(args[1], &va)) return NULL;
    if (!get_bytes(args[3], &vb)) {
        PyBuffer_Release(&va);
        return NULL;
    }
    PyObject *result = NULL;
    if (claim(a)) {
        if (claim(b)) {
            Py_BEGIN_ALLOW_THREADS
            absorb_pair(a, va.buf, (size_t)va.len, b, vb.buf, (size_t)vb.len);
            Py_END_ALLOW_THREADS
            b->busy = 0;
            result = Py_None;
        }
        a->busy = 0;
    }
    PyBuffer_Release(&va);
    PyBuffer_Release(&vb);
    return Py_XNewRef(result);
}

static PyObject *accelerated(PyObject *module, PyObject *unused) { return PyBool_FromLong(ACCELERATED); }

static PyMethodDef module_methods[] = {
    {"update_pair", (PyCFunction)(void (*)(void))update_pair, METH_FASTCALL,
     "update_pair(a, data_a, b, data_b): a.update(data_a) and b.update(data_b), their common whole blocks in two lanes."},
    {"accelerated", accelerated, METH_NOARGS, "Whether this CPU has the SHA extensions this module needs."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sha256_lanes",
    .m_doc = "Two-lane sha256 on the x86 SHA extensions.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__sha256_lanes(void) {
    ACCELERATED = cpu_has_sha_lanes();
    if (PyType_Ready(&Sha256Type) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Sha256", (PyObject *)&Sha256Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
