/* ctrpipe._native: the hot loops that numpy and torch cannot vectorise well on a CPU.
 *
 * Shard build:
 * criteo_block() walks a block of Criteo text once: it checks every line's field count, parses the label
 * and integer columns (plain integers only) into float64 and hashes every categorical field with xxh64
 * (the exact XXH64 of the field's bytes, seeded per field). Anything unusual (a wrong field count, a
 * numeric token that is not a plain integer, an empty label) stops the walk and returns its line, and the
 * caller parses that block with polars instead, which reports the problem or handles the value; so this
 * file only has to be right for the common case, and the result is identical either way.
 *
 * token_counts() / token_hashes() split sequence and multi-hot strings on their separator and hash the kept
 * tokens (parsing plain decimal weights), hash_strings() hashes a string column, both reading polars' string
 * views in place; hash_build() / hash_lookup() are an open-addressing index over fitted (key, value) tables
 * (vocabularies, co-visitation counts). Each gives what the polars / numpy path gives, or declines.
 *
 * Training: sparse_adam() is the whole per-step update of one embedding table on CPU (LazyAdam): it sums
 * the gradient rows of repeated ids and applies Adam to the distinct rows in one pass over the batch's ids,
 * where torch needs a deduplication, an index_add_ and six gathers/scatters of the table and its moments.
 *
 * Optional: when it is not compiled, ctrpipe runs the same pipelines in polars, numpy and torch (slower).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const uint64_t P1 = 0x9E3779B185EBCA87ULL;
static const uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t P3 = 0x165667B19E3779F9ULL;
static const uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
static const uint64_t P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline uint64_t xxh_round(uint64_t acc, uint64_t lane) {
    acc += lane * P2;
    return rotl64(acc, 31) * P1;
}

static inline uint64_t xxh_merge(uint64_t h, uint64_t acc) {
    h ^= xxh_round(0, acc);
    return h * P1 + P4;
}

/* XXH64 of p[0:len) with `seed`, as the reference algorithm (and the `xxhash` package) computes it. */
static uint64_t xxh64(const uint8_t *p, size_t len, uint64_t seed) {
    const uint8_t *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        do {
            v1 = xxh_round(v1, load64(p));
            v2 = xxh_round(v2, load64(p + 8));
            v3 = xxh_round(v3, load64(p + 16));
            v4 = xxh_round(v4, load64(p + 24));
            p += 32;
        } while (p + 32 <= end);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= xxh_round(0, load64(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)load32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        p++;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/* xxh64 of the same bytes with two seeds: for inputs under 32 bytes (tokens) both states advance in the same
 * loop, so they share its loads and branches and the two multiply chains overlap; longer inputs take xxh64
 * twice. Same values as xxh64(p, len, seed_a) and xxh64(p, len, seed_b). */
static inline void xxh64_two(const uint8_t *p, size_t len, uint64_t seed_a, uint64_t seed_b, uint64_t *out_a,
                             uint64_t *out_b) {
    if (len >= 32) {
        *out_a = xxh64(p, len, seed_a);
        *out_b = xxh64(p, len, seed_b);
        return;
    }
    const uint8_t *end = p + len;
    uint64_t a = seed_a + P5 + (uint64_t)len, b = seed_b + P5 + (uint64_t)len;
    while (p + 8 <= end) {
        const uint64_t k = xxh_round(0, load64(p));
        a = rotl64(a ^ k, 27) * P1 + P4;
        b = rotl64(b ^ k, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        const uint64_t k = (uint64_t)load32(p) * P1;
        a = rotl64(a ^ k, 23) * P2 + P3;
        b = rotl64(b ^ k, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        const uint64_t k = (uint64_t)(*p) * P5;
        a = rotl64(a ^ k, 11) * P1;
        b = rotl64(b ^ k, 11) * P1;
        p++;
    }
    a ^= a >> 33;
    b ^= b >> 33;
    a *= P2;
    b *= P2;
    a ^= a >> 29;
    b ^= b >> 29;
    a *= P3;
    b *= P3;
    *out_a = a ^ (a >> 32);
    *out_b = b ^ (b >> 32);
}

/* A plain integer token (optional '-', 1..15 digits) -> its exact double; 0 if the token is anything else.
 * 15 digits keep every value below 2**53, where the double is exact (so polars would parse the same). */
static inline int parse_plain_int(const uint8_t *s, const uint8_t *e, double *out) {
    int neg = 0;
    if (s < e && *s == '-') {
        neg = 1;
        s++;
    }
    if (s == e || e - s > 15) return 0;
    int64_t v = 0;
    for (; s < e; s++) {
        unsigned d = (unsigned)(*s - '0');
        if (d > 9) return 0;
        v = v * 10 + (int64_t)d;
    }
    *out = neg ? -(double)v : (double)v;   /* "-0" -> -0.0, as a float parser gives */
    return 1;
}

static int check_buffer(Py_buffer *b, Py_ssize_t need, const char *what) {
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer holds %zd bytes, needs %zd", what, b->len, need);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(criteo_block_doc,
"criteo_block(data, n_lines, n_fields, n_numeric, n_labels, sep, seeds, numeric_out, hashes_out) -> int\n\n"
"Walk n_lines '\\n'-terminated lines of `data`, each of n_fields `sep`-separated fields: the first\n"
"n_numeric fields (labels first, n_labels of them, then counts) are parsed into numeric_out\n"
"(float64, field-major: field f of line i at [f * n_lines + i], NaN when empty), the others are hashed\n"
"into hashes_out (uint64, field-major, xxh64 with seeds[k]; 0 when empty). Returns -1 when every line\n"
"was handled, else the 0-based line that was not (wrong field count, a numeric token that is not a\n"
"plain integer, an empty label, or data that does not end where n_lines do): parse that block otherwise.");

static PyObject *criteo_block(PyObject *self, PyObject *args) {
    Py_buffer data, seeds, num, hashes;
    Py_ssize_t n_lines, n_fields, n_numeric, n_labels;
    int sep;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnniy*w*w*", &data, &n_lines, &n_fields, &n_numeric, &n_labels, &sep,
                          &seeds, &num, &hashes))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n_cat = n_fields - n_numeric;
    if (n_lines < 0 || n_fields < 1 || n_numeric < 0 || n_cat < 0 || n_labels < 0 || n_labels > n_numeric ||
        sep < 0 || sep > 255 || sep == '\n') {
        PyErr_SetString(PyExc_ValueError, "criteo_block: bad layout arguments");
        goto done;
    }
    if (!check_buffer(&seeds, n_cat * 8, "seeds") || !check_buffer(&num, n_numeric * n_lines * 8, "numeric") ||
        !check_buffer(&hashes, n_cat * n_lines * 8, "hashes"))
        goto done;

    const uint8_t *p = (const uint8_t *)data.buf;
    const uint8_t *end = p + data.len;
    const uint64_t *seed = (const uint64_t *)seeds.buf;
    double *numeric = (double *)num.buf;
    uint64_t *hash = (uint64_t *)hashes.buf;
    const uint8_t sep_byte = (uint8_t)sep;
    Py_ssize_t bad = -1;
    if (data.len == 0 || end[-1] != '\n') {     /* the last '\n' is the sentinel of the scan below */
        bad = 0;
        n_lines = 0;
    }
    uint8_t stop[256] = {0};                     /* bytes that end a field */
    stop['\n'] = 1;
    stop[sep_byte] = 1;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n_lines && bad < 0; i++) {
        for (Py_ssize_t f = 0; f < n_fields; f++) {
            const uint8_t *s = p;
            while (!stop[*p]) p++;
            if (f == n_fields - 1 ? *p != '\n' : *p != sep_byte) {
                bad = i;
                break;
            }
            if (f < n_numeric) {
                double v = NAN;
                if ((p > s || f < n_labels) && !parse_plain_int(s, p, &v)) {
                    bad = i;
                    break;
                }
                numeric[f * n_lines + i] = v;
            } else {
                Py_ssize_t k = f - n_numeric;
                hash[k * n_lines + i] = p > s ? xxh64(s, (size_t)(p - s), seed[k]) : 0;
            }
            p++;
            if (p == end && (i < n_lines - 1 || f < n_fields - 1)) {   /* fewer lines than n_lines */
                bad = i;
                break;
            }
        }
    }
    if (bad < 0 && p != end) bad = n_lines;
    Py_END_ALLOW_THREADS

    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&seeds);
    PyBuffer_Release(&num);
    PyBuffer_Release(&hashes);
    return result;
}

PyDoc_STRVAR(xxh64_doc, "xxh64(data, seed) -> int: XXH64 of a bytes-like object (used to test the kernel).");

static PyObject *py_xxh64(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned long long seed;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*K", &data, &seed)) return NULL;
    uint64_t h = xxh64((const uint8_t *)data.buf, (size_t)data.len, (uint64_t)seed);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLongLong(h);
}

PyDoc_STRVAR(sparse_adam_doc,
"sparse_adam(param, exp_avg, exp_avg_sq, ids, grads, scratch, dim, step_size, beta1, beta2, eps, bc2) -> int\n\n"
"One lazy Adam step of a float32 (rows, dim) table from an uncoalesced sparse gradient: ids (int64, n)\n"
"and grads (float32, n x dim, row i belongs to ids[i]). Gradient rows of one id are summed in the order\n"
"they come; then each distinct row gets m = lerp(m, g, 1 - beta1), v = beta2 v + (1 - beta2) g g,\n"
"param += step_size * m / (sqrt(v / bc2) + eps) (step_size = -lr / bc1): the formulas of LazyAdam's torch\n"
"path. scratch is int32 (rows), all -1 on entry and on return. Returns the number of distinct rows.");

#define PREFETCH_AHEAD 16

static PyObject *sparse_adam(PyObject *self, PyObject *args) {
    Py_buffer param, m_buf, v_buf, ids_buf, grads_buf, scratch_buf;
    Py_ssize_t dim;
    double step_size, beta1, beta2, eps, bc2;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*w*w*y*y*w*nddddd", &param, &m_buf, &v_buf, &ids_buf, &grads_buf,
                          &scratch_buf, &dim, &step_size, &beta1, &beta2, &eps, &bc2))
        return NULL;
    PyObject *result = NULL;
    float *sums = NULL;
    int64_t *uniq = NULL;
    if (dim < 1 || param.len % (dim * 4) != 0) {
        PyErr_SetString(PyExc_ValueError, "sparse_adam: table size is not rows x dim float32");
        goto done;
    }
    Py_ssize_t rows = param.len / (dim * 4), n = ids_buf.len / 8;
    if (m_buf.len != param.len || v_buf.len != param.len || grads_buf.len != n * dim * 4 ||
        !check_buffer(&scratch_buf, rows * 4, "scratch")) {
        PyErr_SetString(PyExc_ValueError, "sparse_adam: moments, gradients or scratch do not match the table");
        goto done;
    }
    sums = (float *)malloc((size_t)(n > 0 ? n : 1) * (size_t)dim * sizeof(float));
    uniq = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    if (sums == NULL || uniq == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *p = (float *)param.buf, *m = (float *)m_buf.buf, *v = (float *)v_buf.buf;
    const int64_t *ids = (const int64_t *)ids_buf.buf;
    const float *g = (const float *)grads_buf.buf;
    int32_t *slot = (int32_t *)scratch_buf.buf;
    const float w1 = (float)(1.0 - beta1), b2 = (float)beta2, w2 = (float)(1.0 - beta2);
    const float fe = (float)eps, fbc2 = (float)bc2, fstep = (float)step_size;
    Py_ssize_t k = 0, bad = -1;

    Py_BEGIN_ALLOW_THREADS
    /* the table, its moments and the slots are far bigger than the caches and a batch touches their rows at
     * random: prefetching a few rows ahead hides much of the memory latency */
    for (Py_ssize_t i = 0; i < n; i++) {            /* pass 1: distinct rows, first-seen order; sum grads */
        if (i + PREFETCH_AHEAD < n) {
            int64_t ahead = ids[i + PREFETCH_AHEAD];
            if (ahead >= 0 && ahead < rows) __builtin_prefetch(slot + ahead, 1);
        }
        int64_t r = ids[i];
        if (r < 0 || r >= rows) {
            bad = i;
            break;
        }
        const float *gi = g + i * dim;
        int32_t s = slot[r];
        if (s < 0) {
            slot[r] = (int32_t)k;
            uniq[k] = r;
            memcpy(sums + k * dim, gi, (size_t)dim * sizeof(float));
            k++;
        } else {
            float *acc = sums + (Py_ssize_t)s * dim;
            for (Py_ssize_t j = 0; j < dim; j++) acc[j] += gi[j];
        }
    }
    for (Py_ssize_t s = 0; s < k; s++) {            /* pass 2: Adam on each distinct row; reset scratch */
        int64_t r = uniq[s];
        slot[r] = -1;
        if (bad >= 0) continue;
        if (s + PREFETCH_AHEAD < k) {
            int64_t ahead = uniq[s + PREFETCH_AHEAD] * dim;
            for (Py_ssize_t j = 0; j < dim; j += 16) {   /* 16 floats: one 64-byte cache line */
                __builtin_prefetch(p + ahead + j, 1);
                __builtin_prefetch(m + ahead + j, 1);
                __builtin_prefetch(v + ahead + j, 1);
            }
        }
        float *pr = p + r * dim, *mr = m + r * dim, *vr = v + r * dim;
        const float *gr = sums + s * dim;
        for (Py_ssize_t j = 0; j < dim; j++) {
            float gj = gr[j];
            float mj = mr[j] + w1 * (gj - mr[j]);
            float vj = vr[j] * b2 + w2 * gj * gj;
            mr[j] = mj;
            vr[j] = vj;
            pr[j] = pr[j] + fstep * (mj / (sqrtf(vj / fbc2) + fe));
        }
    }
    Py_END_ALLOW_THREADS

    if (bad >= 0)
        PyErr_Format(PyExc_IndexError, "sparse_adam: id %lld at position %zd is outside the table's %zd rows",
                     (long long)ids[bad], bad, rows);
    else
        result = PyLong_FromSsize_t(k);
done:
    free(sums);
    free(uniq);
    PyBuffer_Release(&param);
    PyBuffer_Release(&m_buf);
    PyBuffer_Release(&v_buf);
    PyBuffer_Release(&ids_buf);
    PyBuffer_Release(&grads_buf);
    PyBuffer_Release(&scratch_buf);
    return result;
}

/* ------------------------------------------------------------------------------------------ token columns
 * Sequence and multi-hot columns hold separated tokens ('12,7,301'). The shard build needs the xxh64 of the
 * kept tokens of every row; polars + numpy split, explode, filter and hash them in about ten passes over the
 * tokens, these kernels walk each row's bytes twice (count, then hash). Strings come as polars holds them, in
 * Arrow's string-view layout (no copy): 16 bytes per row (uint32 length; up to 12 bytes inline, else a 4-byte
 * prefix, the data buffer's index and the offset in it) plus the data buffers. Null rows must have a zero view.
 */

typedef struct {
    const uint8_t *views;
    Py_ssize_t n, nbuf;
    Py_buffer *bufs;
} Strings;

/* Take the views and data buffers, checking that every view points inside its buffer; 0 (an exception set)
 * when one does not. */
static int strings_open(Strings *st, Py_buffer *views, PyObject *buffers) {
    st->views = (const uint8_t *)views->buf;
    st->n = views->len / 16;
    st->nbuf = 0;
    st->bufs = NULL;
    PyObject *seq = PySequence_Fast(buffers, "strings: data buffers must be a sequence");
    if (seq == NULL) return 0;
    Py_ssize_t nbuf = PySequence_Fast_GET_SIZE(seq);
    st->bufs = (Py_buffer *)calloc((size_t)(nbuf > 0 ? nbuf : 1), sizeof(Py_buffer));
    if (st->bufs == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return 0;
    }
    for (Py_ssize_t b = 0; b < nbuf; b++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, b), &st->bufs[b], PyBUF_SIMPLE) < 0) {
            Py_DECREF(seq);
            return 0;
        }
        st->nbuf = b + 1;
    }
    Py_DECREF(seq);
    for (Py_ssize_t i = 0; i < st->n; i++) {
        const uint8_t *v = st->views + 16 * i;
        uint32_t len, b, off;
        memcpy(&len, v, 4);
        if (len <= 12) continue;
        memcpy(&b, v + 8, 4);
        memcpy(&off, v + 12, 4);
        if ((Py_ssize_t)b >= st->nbuf || (Py_ssize_t)off + (Py_ssize_t)len > st->bufs[b].len) {
            PyErr_Format(PyExc_ValueError, "strings: view %zd points outside its data buffer", i);
            return 0;
        }
    }
    return 1;
}

static void strings_close(Strings *st) {
    for (Py_ssize_t b = 0; b < st->nbuf; b++) PyBuffer_Release(&st->bufs[b]);
    free(st->bufs);
}

static inline const uint8_t *string_at(const Strings *st, Py_ssize_t i, Py_ssize_t *len) {
    const uint8_t *v = st->views + 16 * i;
    uint32_t n, b, off;
    memcpy(&n, v, 4);
    *len = (Py_ssize_t)n;
    if (n <= 12) return v + 4;
    memcpy(&b, v + 8, 4);
    memcpy(&off, v + 12, 4);
    return (const uint8_t *)st->bufs[b].buf + off;
}

/* The first byte c in [q, e), or e: eight bytes per step while a word remains (a zero-byte test on the word
 * XOR c, whose lowest flagged byte is always a true match), so such a token shorter than a word costs one
 * predictable branch instead of one per byte; a row's last few bytes go byte by byte. */
static inline const uint8_t *find_byte(const uint8_t *q, const uint8_t *e, uint8_t c) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL, pattern = ones * c;
    while (e - q >= 8) {
        uint64_t w = load64(q) ^ pattern;                  /* load64: little-endian, so byte 0 is the low byte */
        uint64_t m = (w - ones) & ~w & highs;
        if (m) return q + (__builtin_ctzll(m) >> 3);
        q += 8;
    }
    while (q < e && *q != c) q++;
    return q;
}

typedef struct {
    const uint8_t *p, *e, *sep;
    Py_ssize_t k;
    int done;
} TokenIter;

static inline TokenIter tokens_of(const Strings *st, Py_ssize_t i, const uint8_t *sep, Py_ssize_t k) {
    Py_ssize_t len;
    const uint8_t *p = string_at(st, i, &len);
    TokenIter it = {p, p + len, sep, k, 0};
    return it;
}

/* The next non-empty token [*ts, *te) of the row; 0 when there is none left. Separator matches are found
 * left to right without overlap, as polars' str.split finds them; empty tokens ('a||b', a trailing separator)
 * are skipped, as the polars path drops them. */
static inline int next_token(TokenIter *it, const uint8_t **ts, const uint8_t **te) {
    while (!it->done) {
        const uint8_t *s = it->p, *q = it->p, *hit = NULL;
        if (it->k == 1) {                 /* tokens are short: a word scan beats a memchr call per token */
            q = find_byte(q, it->e, it->sep[0]);
            if (q < it->e) hit = q;
            q = it->e;
        }
        while (it->e - q >= it->k) {
            const uint8_t *c = (const uint8_t *)memchr(q, it->sep[0], (size_t)(it->e - q - it->k + 1));
            if (c == NULL) break;
            if (it->k == 1 || memcmp(c, it->sep, (size_t)it->k) == 0) {
                hit = c;
                break;
            }
            q = c + 1;
        }
        if (hit == NULL) {
            it->done = 1;
            hit = it->e;
        } else {
            it->p = hit + it->k;
        }
        if (hit > s) {
            *ts = s;
            *te = hit;
            return 1;
        }
    }
    return 0;
}

static const double POW10[16] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14,
                                 1e15};

/* A weighted token 'name:weight' whose name (before the LAST ':') is non-empty and holds no newline, and
 * whose weight is a plain decimal (optional '-', digits, optional '.' and digits, at most 15 digits): sets the
 * name's end and the weight, returns 1. Anything else returns 0 and the caller takes the polars path, which
 * parses or reports it. The weight is exact: an integer below 2**53 divided by an exact power of ten is
 * the correctly rounded decimal (Clinger's fast path), as polars' float parser gives. */
static inline int split_weight(const uint8_t *ts, const uint8_t *te, const uint8_t **name_end, double *w) {
    const uint8_t *c = te;
    while (c > ts && c[-1] != ':') c--;
    if (c == ts) return 0;                                  /* no ':' at all */
    const uint8_t *colon = c - 1;
    if (colon == ts || memchr(ts, '\n', (size_t)(colon - ts)) != NULL) return 0;
    const uint8_t *p = colon + 1;
    int neg = 0, digits = 0, frac = 0, dot = 0;
    uint64_t m = 0;
    if (p < te && *p == '-') {
        neg = 1;
        p++;
    }
    if (p == te || *p < '0' || *p > '9') return 0;
    for (; p < te; p++) {
        if (*p >= '0' && *p <= '9') {
            if (++digits > 15) return 0;
            m = m * 10 + (uint64_t)(*p - '0');
            frac += dot;
        } else if (*p == '.' && !dot && p + 1 < te) {
            dot = 1;
        } else {
            return 0;
        }
    }
    double v = (double)m / POW10[frac];
    *w = neg ? -v : v;
    *name_end = colon;
    return 1;
}

PyDoc_STRVAR(token_counts_doc,
"token_counts(views, buffers, sep, weighted, counts_out) -> int\n\n"
"Count the non-empty `sep`-separated tokens of each string (string views + data buffers) into counts_out\n"
"(int64, n). With weighted, every token must also be 'name:weight' as split_weight accepts it. Returns -1\n"
"when every row was handled, else the first row holding a token that was not.");

static PyObject *token_counts(PyObject *self, PyObject *args) {
    Py_buffer views, sep, counts;
    PyObject *buffers;
    int weighted;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Oy*pw*", &views, &buffers, &sep, &weighted, &counts)) return NULL;
    PyObject *result = NULL;
    Strings st = {NULL, 0, 0, NULL};
    if (sep.len < 1) {
        PyErr_SetString(PyExc_ValueError, "token_counts: empty separator");
        goto done;
    }
    if (!strings_open(&st, &views, buffers) || !check_buffer(&counts, st.n * 8, "counts")) goto done;
    int64_t *out = (int64_t *)counts.buf;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < st.n && bad < 0; i++) {
        TokenIter it = tokens_of(&st, i, (const uint8_t *)sep.buf, sep.len);
        const uint8_t *ts, *te, *name_end;
        double w;
        int64_t c = 0;
        while (next_token(&it, &ts, &te)) {
            if (weighted && !split_weight(ts, te, &name_end, &w)) {
                bad = i;
                break;
            }
            c++;
        }
        out[i] = c;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    strings_close(&st);
    PyBuffer_Release(&views);
    PyBuffer_Release(&sep);
    PyBuffer_Release(&counts);
    return result;
}

PyDoc_STRVAR(token_hashes_doc,
"token_hashes(views, buffers, sep, seed, weighted, keep_last, max_len, lengths_out, hashes_out, weights_out\n"
"[, seed2, hashes2_out]) -> int\n\n"
"xxh64 (with seed) of the kept non-empty tokens of every string, flattened in row order: the first max_len\n"
"of each row, or the last ones with keep_last; lengths_out (int64, n) gets how many. weighted: every token,\n"
"kept or not (as the polars path checks them all), must be 'name:weight' as split_weight accepts it; the\n"
"name is hashed and the weight goes to weights_out (float32). With seed2, hashes2_out gets the same tokens'\n"
"xxh64 with seed2 (one split for two id spaces). Returns the number of tokens written, or -1 - i for the\n"
"first row i holding a token that was not accepted (the outputs are then incomplete).");

typedef struct {
    const uint8_t *s, *e;   /* a kept token's bytes (its name, when weighted) */
    float w;
} Kept;

static PyObject *token_hashes(PyObject *self, PyObject *args) {
    Py_buffer views, sep, lengths_b, hashes_b, weights_b, hashes2_b = {0};
    PyObject *buffers;
    unsigned long long seed, seed2 = 0;
    int weighted, keep_last;
    Py_ssize_t max_len;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Oy*Kppnw*w*w*|Kw*", &views, &buffers, &sep, &seed, &weighted, &keep_last,
                          &max_len, &lengths_b, &hashes_b, &weights_b, &seed2, &hashes2_b))
        return NULL;
    PyObject *result = NULL;
    Strings st = {NULL, 0, 0, NULL};
    Kept *ring = NULL;
    const int two = hashes2_b.obj != NULL;
    if (sep.len < 1 || max_len < 1) {
        PyErr_SetString(PyExc_ValueError, "token_hashes: empty separator or max_len < 1");
        goto done;
    }
    if (!strings_open(&st, &views, buffers) || !check_buffer(&lengths_b, st.n * 8, "lengths")) goto done;
    ring = (Kept *)malloc((size_t)max_len * sizeof(Kept));
    if (ring == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *lengths = (int64_t *)lengths_b.buf;
    uint64_t *hashes = (uint64_t *)hashes_b.buf, *hashes2 = two ? (uint64_t *)hashes2_b.buf : NULL;
    float *weights = (float *)weights_b.buf;
    Py_ssize_t cap = hashes_b.len / 8, k = 0, bad = -1;
    if (weighted && weights_b.len / 4 < cap) cap = weights_b.len / 4;
    if (two && hashes2_b.len / 8 < cap) cap = hashes2_b.len / 8;
    int full = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < st.n && bad < 0 && !full; i++) {
        TokenIter it = tokens_of(&st, i, (const uint8_t *)sep.buf, sep.len);
        const uint8_t *ts, *te, *name_end;
        double w = 1.0;
        /* the kept tokens' bytes are noted in a ring (the last max_len with keep_last, else the first ones)
         * and hashed once the row is split: dropped tokens are never hashed */
        int64_t j = 0, at = 0;                /* at = j % max_len, kept without a division per token */
        while (next_token(&it, &ts, &te)) {
            if (weighted) {
                if (!split_weight(ts, te, &name_end, &w)) {
                    bad = i;
                    break;
                }
                te = name_end;
            }
            if (keep_last || j < max_len) {
                ring[at].s = ts;
                ring[at].e = te;
                ring[at].w = (float)w;
                if (++at == max_len) at = 0;
            } else if (!weighted) {
                break;                        /* the rest is dropped, and only weights need checking */
            }
            j++;
        }
        if (bad >= 0) break;
        int64_t take = j < max_len ? j : max_len;
        if (k + take > cap) {
            full = 1;
            break;
        }
        int64_t from = keep_last ? (j - take) % max_len : 0;
        for (int64_t t = 0; t < take; t++) {
            const Kept *kt = &ring[from];
            if (two)
                xxh64_two(kt->s, (size_t)(kt->e - kt->s), (uint64_t)seed, (uint64_t)seed2, &hashes[k + t],
                          &hashes2[k + t]);
            else
                hashes[k + t] = xxh64(kt->s, (size_t)(kt->e - kt->s), (uint64_t)seed);
            if (weighted) weights[k + t] = kt->w;
            if (++from == max_len) from = 0;
        }
        lengths[i] = take;
        k += take;
    }
    Py_END_ALLOW_THREADS
    if (full)
        PyErr_SetString(PyExc_ValueError, "token_hashes: more kept tokens than the output holds");
    else
        result = PyLong_FromSsize_t(bad >= 0 ? -1 - bad : k);
done:
    free(ring);
    strings_close(&st);
    PyBuffer_Release(&views);
    PyBuffer_Release(&sep);
    PyBuffer_Release(&lengths_b);
    PyBuffer_Release(&hashes_b);
    PyBuffer_Release(&weights_b);
    if (hashes2_b.obj != NULL) PyBuffer_Release(&hashes2_b);
    return result;
}

PyDoc_STRVAR(pad_rows_doc,
"pad_rows(flat, lengths, max_len, out) -> None\n\n"
"Left-align rows of 4-byte items: row i of out (n x max_len, zero on entry) gets the next lengths[i]\n"
"(<= max_len) items of flat, in order (token ids or weights: what tokens_to_ids lays out).");

static PyObject *pad_rows(PyObject *self, PyObject *args) {
    Py_buffer flat_b, len_b, out_b;
    Py_ssize_t max_len;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &flat_b, &len_b, &max_len, &out_b)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = len_b.len / 8, m = flat_b.len / 4, total = 0;
    const int64_t *lengths = (const int64_t *)len_b.buf;
    int bad = max_len < 1 || !check_buffer(&out_b, n * max_len * 4, "out");
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        bad = lengths[i] < 0 || lengths[i] > max_len;
        total += lengths[i];
    }
    if (bad || total != m) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "pad_rows: lengths do not fit max_len or flat");
        goto done;
    }
    const uint8_t *src = (const uint8_t *)flat_b.buf;
    uint8_t *dst = (uint8_t *)out_b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(dst + (size_t)i * (size_t)max_len * 4, src, (size_t)lengths[i] * 4);
        src += lengths[i] * 4;
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&flat_b);
    PyBuffer_Release(&len_b);
    PyBuffer_Release(&out_b);
    return result;
}

PyDoc_STRVAR(hash_strings_doc,
"hash_strings(views, buffers, seed, out) -> None\n\n"
"out[i] = xxh64 (with seed) of string i (string views + data buffers); nulls are the caller's.");

static PyObject *hash_strings(PyObject *self, PyObject *args) {
    Py_buffer views, out_b;
    PyObject *buffers;
    unsigned long long seed;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*OKw*", &views, &buffers, &seed, &out_b)) return NULL;
    PyObject *result = NULL;
    Strings st = {NULL, 0, 0, NULL};
    if (!strings_open(&st, &views, buffers) || !check_buffer(&out_b, st.n * 8, "out")) goto done;
    uint64_t *out = (uint64_t *)out_b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < st.n; i++) {
        Py_ssize_t len;
        const uint8_t *p = string_at(&st, i, &len);
        out[i] = xxh64(p, (size_t)len, (uint64_t)seed);
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    strings_close(&st);
    PyBuffer_Release(&views);
    PyBuffer_Release(&out_b);
    return result;
}

PyDoc_STRVAR(pair_keys_doc,
"pair_keys(target, lengths, context, salt, out) -> None\n\n"
"Co-visitation pair keys: out[j] = mix64(target[i] ^ mix64(context[j] ^ salt)) for the lengths[i]\n"
"context tokens j of row i (flattened in row order); mix64 is splitmix64's finaliser as splits.mix64.");

static inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static PyObject *pair_keys(PyObject *self, PyObject *args) {
    Py_buffer t_b, len_b, c_b, out_b;
    unsigned long long salt;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*Kw*", &t_b, &len_b, &c_b, &salt, &out_b)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = t_b.len / 8, m = c_b.len / 8;
    const uint64_t *t = (const uint64_t *)t_b.buf, *c = (const uint64_t *)c_b.buf;
    const int64_t *lengths = (const int64_t *)len_b.buf;
    uint64_t *out = (uint64_t *)out_b.buf;
    if (!check_buffer(&len_b, n * 8, "lengths") || !check_buffer(&out_b, m * 8, "out")) goto done;
    Py_ssize_t j = 0;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !bad; i++) {
        if (lengths[i] < 0 || j + lengths[i] > m) {
            bad = 1;
            break;
        }
        for (int64_t k = 0; k < lengths[i]; k++, j++) out[j] = mix64(t[i] ^ mix64(c[j] ^ (uint64_t)salt));
    }
    if (j != m) bad = 1;
    Py_END_ALLOW_THREADS
    if (bad)
        PyErr_SetString(PyExc_ValueError, "pair_keys: lengths do not sum to the number of context tokens");
    else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    PyBuffer_Release(&t_b);
    PyBuffer_Release(&len_b);
    PyBuffer_Release(&c_b);
    PyBuffer_Release(&out_b);
    return result;
}

static inline int64_t table_get(const uint64_t *table, uint64_t mask, uint64_t key, int64_t zero) {
    if (key == 0) return zero;
    uint64_t s = key & mask;
    while (table[2 * s] != 0) {
        if (table[2 * s] == key) return (int64_t)table[2 * s + 1];
        s = (s + 1) & mask;
    }
    return 0;
}

/* numpy's float64 sum of n values as np.add.reduce / reduceat computes it (pairwise, blocks of 128 with 8
 * accumulators), so a row's mean here is bit-identical to covisit.covisit_features' numpy path */
static double numpy_pairwise_sum(const double *a, Py_ssize_t n) {
    if (n < 8) {
        double res = 0.;
        for (Py_ssize_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= 128) {
        double r[8];
        Py_ssize_t i;
        for (int k = 0; k < 8; k++) r[k] = a[k];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++) r[k] += a[i + k];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return numpy_pairwise_sum(a, n2) + numpy_pairwise_sum(a + n2, n - n2);
}

PyDoc_STRVAR(covisit_rows_doc,
"covisit_rows(pairs, pairs_zero, ctx, ctx_zero, target, lengths, context, salt, loo, smoothing, out) -> None\n\n"
"out[i] (float32, 2 per row) = [max, mean] over the lengths[i] context tokens j of row i of\n"
"max(n(t, c) - l, 0) / (max(n(c) - l, 0) + smoothing), [0, 0] for a row without tokens: n(t, c) is the pair\n"
"count of pair_keys(target[i], context[j]) in the hash_build table `pairs`, n(c) the count of context[j] in\n"
"`ctx` (0 when absent; *_zero: the count of key 0), l = 1 where loo[i] (uint8) is set. The float64\n"
"arithmetic of covisit.covisit_features (its per-token scores and their reduceat), in one pass and without\n"
"the per-token score array.");

/* Occurrences of each of a row's context tokens in that row: each one was counted in pass 1, so leave-one-out
 * removes them all. Counted in a small open-addressing table (a power of two at least twice the row's length,
 * so it stays in L1) and read back per token: O(len) a row, where comparing every token with every other one
 * cost O(len^2), most of the features' time on long histories. Only the slots a row used are cleared after it.
 * Tokens are xxh64 hashes, so their low bits spread them; equal hashes get one slot, so counts are exact. */
typedef struct {
    uint64_t *keys;
    int32_t *counts;        /* 0 marks an empty slot */
    int64_t *slot_of;       /* the slot of each token of the row */
} RowCounts;

static void row_occurrences(RowCounts *rc, const uint64_t *row, int64_t len, double *occ) {
    uint64_t cap = 2;
    while (cap < 2 * (uint64_t)len) cap *= 2;
    const uint64_t mask = cap - 1;
    for (int64_t k = 0; k < len; k++) {
        uint64_t s = row[k] & mask;
        while (rc->counts[s] != 0 && rc->keys[s] != row[k]) s = (s + 1) & mask;
        rc->keys[s] = row[k];
        rc->counts[s]++;
        rc->slot_of[k] = (int64_t)s;
    }
    for (int64_t k = 0; k < len; k++) occ[k] = (double)rc->counts[rc->slot_of[k]];
    for (int64_t k = 0; k < len; k++) rc->counts[rc->slot_of[k]] = 0;
}

static PyObject *covisit_rows(PyObject *self, PyObject *args) {
    Py_buffer pairs_b, ctx_b, t_b, len_b, c_b, loo_b, out_b;
    long long pairs_zero, ctx_zero;
    unsigned long long salt;
    double smoothing;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*Ly*Ly*y*y*Ky*dw*", &pairs_b, &pairs_zero, &ctx_b, &ctx_zero, &t_b, &len_b,
                          &c_b, &salt, &loo_b, &smoothing, &out_b))
        return NULL;
    PyObject *result = NULL;
    double *scores = NULL, *occ = NULL;
    RowCounts rc = {NULL, NULL, NULL};
    Py_ssize_t n = t_b.len / 8, m = c_b.len / 8, pcap = pairs_b.len / 16, ccap = ctx_b.len / 16;
    if (pcap < 1 || (pcap & (pcap - 1)) != 0 || ccap < 1 || (ccap & (ccap - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "covisit_rows: table sizes are not powers of two");
        goto done;
    }
    if (!check_buffer(&len_b, n * 8, "lengths") || !check_buffer(&loo_b, n, "loo") ||
        !check_buffer(&out_b, n * 8, "out"))
        goto done;
    const uint64_t *pairs = (const uint64_t *)pairs_b.buf, *ctx = (const uint64_t *)ctx_b.buf;
    const uint64_t *t = (const uint64_t *)t_b.buf, *c = (const uint64_t *)c_b.buf;
    const int64_t *lengths = (const int64_t *)len_b.buf;
    const uint8_t *loo = (const uint8_t *)loo_b.buf;
    float *out = (float *)out_b.buf;
    uint64_t pmask = (uint64_t)pcap - 1, cmask = (uint64_t)ccap - 1;
    Py_ssize_t total = 0;
    int64_t longest = 0;
    int negative = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        negative |= lengths[i] < 0;
        total += lengths[i];
        if (lengths[i] > longest) longest = lengths[i];
    }
    if (negative || total != m) {
        PyErr_SetString(PyExc_ValueError, "covisit_rows: lengths do not sum to the number of context tokens");
        goto done;
    }
    size_t row_cap = 2;
    while (row_cap < 2 * (size_t)longest) row_cap *= 2;
    const size_t most = (size_t)(longest > 0 ? longest : 1);
    scores = (double *)malloc(most * sizeof(double));          /* one row's scores */
    occ = (double *)malloc(most * sizeof(double));             /* its tokens' occurrences in it */
    rc.keys = (uint64_t *)malloc(row_cap * sizeof(uint64_t));
    rc.counts = (int32_t *)calloc(row_cap, sizeof(int32_t));
    rc.slot_of = (int64_t *)malloc(most * sizeof(int64_t));
    if (scores == NULL || occ == NULL || rc.keys == NULL || rc.counts == NULL || rc.slot_of == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    /* pair keys are computed PREFETCH_AHEAD tokens ahead (row ai, its token ak) and their slots prefetched,
     * so the pair table's cache misses overlap instead of queueing */
    uint64_t ring[PREFETCH_AHEAD];
    Py_ssize_t ai = 0, aj = 0, j = 0;
    int64_t ak = 0;
    for (; aj < m && aj < PREFETCH_AHEAD; aj++, ak++) {
        while (ak >= lengths[ai]) ai++, ak = 0;
        ring[aj % PREFETCH_AHEAD] = mix64(t[ai] ^ mix64(c[aj] ^ (uint64_t)salt));
        __builtin_prefetch(pairs + 2 * (ring[aj % PREFETCH_AHEAD] & pmask));
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t len = lengths[i];
        const uint64_t *row = c + j;
        if (loo[i]) row_occurrences(&rc, row, len, occ);
        for (int64_t k = 0; k < len; k++, j++) {
            const double l = loo[i] ? occ[k] : 0.0;
            uint64_t key = ring[j % PREFETCH_AHEAD];
            if (aj < m) {
                while (ak >= lengths[ai]) ai++, ak = 0;
                uint64_t ahead = mix64(t[ai] ^ mix64(c[aj] ^ (uint64_t)salt));
                ring[aj % PREFETCH_AHEAD] = ahead;
                __builtin_prefetch(pairs + 2 * (ahead & pmask));
                __builtin_prefetch(ctx + 2 * (c[aj] & cmask));
                aj++, ak++;
            }
            double n_tc = (double)table_get(pairs, pmask, key, pairs_zero) - l;
            double n_c = (double)table_get(ctx, cmask, c[j], ctx_zero) - l;
            scores[k] = (n_tc > 0.0 ? n_tc : 0.0) / ((n_c > 0.0 ? n_c : 0.0) + smoothing);
        }
        if (len == 0) {
            out[2 * i] = 0.0f;
            out[2 * i + 1] = 0.0f;
            continue;
        }
        /* as reduceat: the first value, then the rest reduced onto it */
        double mx = scores[0];
        for (int64_t k = 1; k < len; k++) mx = scores[k] > mx ? scores[k] : mx;
        out[2 * i] = (float)mx;
        out[2 * i + 1] = (float)((scores[0] + numpy_pairwise_sum(scores + 1, len - 1)) / (double)len);
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(scores);
    free(occ);
    free(rc.keys);
    free(rc.counts);
    free(rc.slot_of);
    PyBuffer_Release(&pairs_b);
    PyBuffer_Release(&ctx_b);
    PyBuffer_Release(&t_b);
    PyBuffer_Release(&len_b);
    PyBuffer_Release(&c_b);
    PyBuffer_Release(&loo_b);
    PyBuffer_Release(&out_b);
    return result;
}

/* ------------------------------------------------------------------------------------ uint64 hash index
 * Fitted tables (vocabularies, co-visitation counts) are sorted (key, value) arrays; the write pass looks up
 * millions of keys per chunk in them, and a binary search of a table larger than the cache misses it on most
 * of its ~20 steps. An open-addressing table (linear probing, key 0 = empty slot, the caller handles key 0)
 * answers with about one miss per query, and the next queries' slots are prefetched.
 */

PyDoc_STRVAR(hash_build_doc,
"hash_build(keys, values, table) -> int\n\n"
"Insert distinct non-zero uint64 keys with int64 values into `table` (uint64, cap x 2: key, value; all 0 on\n"
"entry; cap a power of two larger than the key count), probing linearly from key & (cap - 1). Returns the\n"
"longest probe sequence.");

static PyObject *hash_build(PyObject *self, PyObject *args) {
    Py_buffer keys_b, vals_b, table_b;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*w*", &keys_b, &vals_b, &table_b)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = keys_b.len / 8, cap = table_b.len / 16;
    if (vals_b.len != keys_b.len || cap <= n || (cap & (cap - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "hash_build: values differ from keys, or cap is not a power of two > n");
        goto done;
    }
    const uint64_t *keys = (const uint64_t *)keys_b.buf, *vals = (const uint64_t *)vals_b.buf;
    uint64_t *table = (uint64_t *)table_b.buf, mask = (uint64_t)cap - 1;
    Py_ssize_t longest = 0;
    int zero = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) __builtin_prefetch(table + 2 * (keys[i + PREFETCH_AHEAD] & mask), 1);
        uint64_t key = keys[i], s = key & mask;
        if (key == 0) {
            zero = 1;
            break;
        }
        Py_ssize_t probe = 0;
        while (table[2 * s] != 0) {
            s = (s + 1) & mask;
            probe++;
        }
        table[2 * s] = key;
        table[2 * s + 1] = vals[i];
        if (probe > longest) longest = probe;
    }
    Py_END_ALLOW_THREADS
    if (zero)
        PyErr_SetString(PyExc_ValueError, "hash_build: key 0 marks an empty slot and cannot be inserted");
    else
        result = PyLong_FromSsize_t(longest);
done:
    PyBuffer_Release(&keys_b);
    PyBuffer_Release(&vals_b);
    PyBuffer_Release(&table_b);
    return result;
}

PyDoc_STRVAR(hash_count_doc,
"hash_count(table, keys, used, max_used) -> (consumed, used, zeros)\n\n"
"Count uint64 keys into a hash_build table (values are counts): +1 for a key already there, else a new slot\n"
"with count 1. Stops before a new key would make more than max_used slots used; returns how many keys were\n"
"consumed (the caller grows the table and passes the rest), the slots used, and how many consumed keys were\n"
"0 (not stored: 0 marks an empty slot).");

static PyObject *hash_count(PyObject *self, PyObject *args) {
    Py_buffer table_b, keys_b;
    Py_ssize_t used, max_used;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*nn", &table_b, &keys_b, &used, &max_used)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = keys_b.len / 8, cap = table_b.len / 16, i = 0, zeros = 0;
    if (cap < 1 || (cap & (cap - 1)) != 0 || max_used >= cap) {
        PyErr_SetString(PyExc_ValueError, "hash_count: cap is not a power of two above max_used");
        goto done;
    }
    uint64_t *table = (uint64_t *)table_b.buf, mask = (uint64_t)cap - 1;
    const uint64_t *keys = (const uint64_t *)keys_b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) __builtin_prefetch(table + 2 * (keys[i + PREFETCH_AHEAD] & mask), 1);
        uint64_t key = keys[i], s = key & mask;
        if (key == 0) {
            zeros++;
            continue;
        }
        while (table[2 * s] != 0 && table[2 * s] != key) s = (s + 1) & mask;
        if (table[2 * s] == key) {
            table[2 * s + 1]++;
        } else {
            if (used >= max_used) break;
            table[2 * s] = key;
            table[2 * s + 1] = 1;
            used++;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nnn", i, used, zeros);
done:
    PyBuffer_Release(&table_b);
    PyBuffer_Release(&keys_b);
    return result;
}

PyDoc_STRVAR(hash_lookup_doc,
"hash_lookup(table, queries, default, out) -> None\n\n"
"out[i] (int64) = the value of queries[i] (uint64) in a hash_build table, or default where it is absent\n"
"(a query 0 is never found).");

static PyObject *hash_lookup(PyObject *self, PyObject *args) {
    Py_buffer table_b, q_b, out_b;
    long long dflt;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*Lw*", &table_b, &q_b, &dflt, &out_b)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = q_b.len / 8, cap = table_b.len / 16;
    if (cap < 1 || (cap & (cap - 1)) != 0 || !check_buffer(&out_b, n * 8, "out")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "hash_lookup: cap is not a power of two");
        goto done;
    }
    const uint64_t *table = (const uint64_t *)table_b.buf, *q = (const uint64_t *)q_b.buf, mask = (uint64_t)cap - 1;
    int64_t *out = (int64_t *)out_b.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) __builtin_prefetch(table + 2 * (q[i + PREFETCH_AHEAD] & mask));
        uint64_t key = q[i], s = key & mask;
        int64_t v = dflt;
        if (key != 0) {
            while (table[2 * s] != 0) {
                if (table[2 * s] == key) {
                    v = (int64_t)table[2 * s + 1];
                    break;
                }
                s = (s + 1) & mask;
            }
        }
        out[i] = v;
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&table_b);
    PyBuffer_Release(&q_b);
    PyBuffer_Release(&out_b);
    return result;
}

static PyMethodDef methods[] = {
    {"criteo_block", criteo_block, METH_VARARGS, criteo_block_doc},
    {"xxh64", py_xxh64, METH_VARARGS, xxh64_doc},
    {"sparse_adam", sparse_adam, METH_VARARGS, sparse_adam_doc},
    {"token_counts", token_counts, METH_VARARGS, token_counts_doc},
    {"token_hashes", token_hashes, METH_VARARGS, token_hashes_doc},
    {"hash_strings", hash_strings, METH_VARARGS, hash_strings_doc},
    {"pad_rows", pad_rows, METH_VARARGS, pad_rows_doc},
    {"pair_keys", pair_keys, METH_VARARGS, pair_keys_doc},
    {"covisit_rows", covisit_rows, METH_VARARGS, covisit_rows_doc},
    {"hash_build", hash_build, METH_VARARGS, hash_build_doc},
    {"hash_lookup", hash_lookup, METH_VARARGS, hash_lookup_doc},
    {"hash_count", hash_count, METH_VARARGS, hash_count_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "ctrpipe's compiled kernels (shard build, embedding optimiser).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
