/* ctrpipe._native: the two hot loops that numpy and torch cannot vectorise well on a CPU.
 *
 * Shard build:
 * criteo_block() walks a block of Criteo text once: it checks every line's field count, parses the label
 * and integer columns (plain integers only) into float64 and hashes every categorical field with xxh64
 * (the exact XXH64 of the field's bytes, seeded per field). Anything unusual (a wrong field count, a
 * numeric token that is not a plain integer, an empty label) stops the walk and returns its line, and the
 * caller parses that block with polars instead, which reports the problem or handles the value; so this
 * file only has to be right for the common case, and the result is identical either way.
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

static PyMethodDef methods[] = {
    {"criteo_block", criteo_block, METH_VARARGS, criteo_block_doc},
    {"xxh64", py_xxh64, METH_VARARGS, xxh64_doc},
    {"sparse_adam", sparse_adam, METH_VARARGS, sparse_adam_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "ctrpipe's compiled kernels (shard build, embedding optimiser).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
