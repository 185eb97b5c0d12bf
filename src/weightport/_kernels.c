/* weightport._kernels: the copies weightport does at memory speed, releasing the GIL.
 *
 * transpose(dst, src, rows, cols, src_col_stride, dst_row_stride, itemsize)
 *   dst[i * dst_row_stride + j] = src[i + j * src_col_stride]   for i < rows, j < cols
 * Addresses are integers, strides count elements, itemsize is 2, 4 or 8 bytes.
 *
 * This is the copy of a Keras kernel (in, gates*hidden), or one gate's block of its columns,
 * into PyTorch's row-major (gates*hidden, in) weight. Neither NumPy nor torch has a blocked,
 * thread-friendly kernel for a strided block: element-wise loops miss the cache and the TLB on
 * every read. Here the matrix goes in TILE x TILE tiles (whose rows stay in the TLB and L2), each
 * in 8 x 8 blocks transposed in registers (AVX2 for 4-byte items where the CPU has it).
 *
 * stream_copy(dst, src, nbytes)
 *   memcpy with non-temporal stores (SSE2 on x86-64): a big copy's destination is written without
 *   first being read into the cache, a third less memory traffic than torch's copy_ or a memcpy
 *   below the C library's own (machine-dependent, often hundreds of MiB) streaming threshold.
 *   Elsewhere it is memcpy.
 *
 * all_finite(src, count, itemsize, bfloat)
 *   Whether none of ``count`` IEEE floats (2, 4 or 8 bytes; 2 with ``bfloat``: bfloat16) is a NaN
 *   or an infinity: the largest magnitude bit pattern is compared with the infinity's, in one
 *   read-only pass (AVX2 where the CPU has it), faster than a sum and without its overflow.
 *
 * copy_finite(dst, src, count, itemsize, bfloat)
 *   stream_copy and all_finite fused: each 64 KiB chunk is scanned (which brings it into the
 *   cache) and then streamed out, so the source is read from memory once for both. Returns
 *   whether every item was finite; the copy is made either way.
 *
 * advise_huge_pages(addr, nbytes)
 *   madvise(MADV_HUGEPAGE) on the 2 MiB-aligned part of a fresh, untouched allocation (Linux),
 *   so the first touch faults it in 2 MiB pages instead of 4 KiB ones. A hint: ignored where the
 *   system does not offer it.
 *
 * The caller (weightport.copying) checks shapes, strides and non-overlap; this file trusts them.
 * Built at install as an optional extension: where it is missing, copying falls back to torch.
 */
#define Py_LIMITED_API 0x030A0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define TILE 256
#define BLOCK 8

/* One 8 x 8 block, through a small buffer: src rows are destination columns. */
#define DEFINE_BLOCK(NAME, T)                                                                      \
    static inline void NAME(T *d, const T *s, Py_ssize_t sc, Py_ssize_t dr) {                      \
        T buf[BLOCK][BLOCK];                                                                       \
        for (int b = 0; b < BLOCK; b++)                                                            \
            for (int a = 0; a < BLOCK; a++) buf[a][b] = s[a + b * sc];                             \
        for (int a = 0; a < BLOCK; a++)                                                            \
            for (int b = 0; b < BLOCK; b++) d[a * dr + b] = buf[a][b];                             \
    }

/* The whole copy: TILE x TILE tiles of BLOCK_FN blocks, then the ragged edges item by item. */
#define DEFINE_TRANSPOSE(NAME, T, BLOCK_FN, ATTRIBUTES)                                            \
    ATTRIBUTES static void NAME(T *dst, const T *src, Py_ssize_t rows, Py_ssize_t cols,            \
                                Py_ssize_t sc, Py_ssize_t dr) {                                    \
        for (Py_ssize_t j0 = 0; j0 < cols; j0 += TILE) {                                           \
            Py_ssize_t j1 = j0 + TILE < cols ? j0 + TILE : cols;                                   \
            for (Py_ssize_t i0 = 0; i0 < rows; i0 += TILE) {                                       \
                Py_ssize_t i1 = i0 + TILE < rows ? i0 + TILE : rows;                               \
                Py_ssize_t ie = i0 + (i1 - i0) / BLOCK * BLOCK;                                    \
                Py_ssize_t je = j0 + (j1 - j0) / BLOCK * BLOCK;                                    \
                for (Py_ssize_t i = i0; i < ie; i += BLOCK)                                        \
                    for (Py_ssize_t j = j0; j < je; j += BLOCK)                                    \
                        BLOCK_FN(dst + i * dr + j, src + i + j * sc, sc, dr);                      \
                for (Py_ssize_t i = i0; i < i1; i++)                                               \
                    for (Py_ssize_t j = (i < ie ? je : j0); j < j1; j++)                           \
                        dst[i * dr + j] = src[i + j * sc];                                         \
            }                                                                                      \
        }                                                                                          \
    }

DEFINE_BLOCK(block8_u16, uint16_t)
DEFINE_BLOCK(block8_u32, uint32_t)
DEFINE_BLOCK(block8_u64, uint64_t)
DEFINE_TRANSPOSE(transpose_u16, uint16_t, block8_u16, )
DEFINE_TRANSPOSE(transpose_u32, uint32_t, block8_u32, )
DEFINE_TRANSPOSE(transpose_u64, uint64_t, block8_u64, )

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* Eight source rows of eight 4-byte items become eight destination rows, in registers. The items are
 * moved as float bit patterns: loads and stores never touch the values. */
__attribute__((target("avx2"))) static inline void block8_avx2(uint32_t *dst, const uint32_t *src,
                                                               Py_ssize_t sc, Py_ssize_t dr) {
    float *d = (float *)dst;
    const float *s = (const float *)src;
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + sc);
    __m256 r2 = _mm256_loadu_ps(s + 2 * sc), r3 = _mm256_loadu_ps(s + 3 * sc);
    __m256 r4 = _mm256_loadu_ps(s + 4 * sc), r5 = _mm256_loadu_ps(s + 5 * sc);
    __m256 r6 = _mm256_loadu_ps(s + 6 * sc), r7 = _mm256_loadu_ps(s + 7 * sc);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + dr, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * dr, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * dr, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * dr, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * dr, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * dr, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * dr, _mm256_permute2f128_ps(u3, u7, 0x31));
}

DEFINE_TRANSPOSE(transpose_u32_avx2, uint32_t, block8_avx2, __attribute__((target("avx2"))))
#endif

static PyObject *transpose(PyObject *self, PyObject *args) {
    Py_ssize_t dst, src, rows, cols, sc, dr, itemsize;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnn:transpose", &dst, &src, &rows, &cols, &sc, &dr, &itemsize))
        return NULL;
    if (rows < 0 || cols < 0 || sc < 1 || dr < cols || (itemsize != 2 && itemsize != 4 && itemsize != 8)) {
        PyErr_SetString(PyExc_ValueError, "transpose: bad shape, stride or itemsize");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 2) {
        transpose_u16((uint16_t *)dst, (const uint16_t *)src, rows, cols, sc, dr);
    } else if (itemsize == 8) {
        transpose_u64((uint64_t *)dst, (const uint64_t *)src, rows, cols, sc, dr);
    } else {
#ifdef HAVE_AVX2_PATH
        if (__builtin_cpu_supports("avx2"))
            transpose_u32_avx2((uint32_t *)dst, (const uint32_t *)src, rows, cols, sc, dr);
        else
#endif
            transpose_u32((uint32_t *)dst, (const uint32_t *)src, rows, cols, sc, dr);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
static void stream_bytes(char *dst, const char *src, size_t n) {
    size_t head = (size_t)(-(uintptr_t)dst) & 15; /* bytes up to dst's first 16-byte boundary */
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    size_t blocks = n / 64;
    for (size_t k = 0; k < blocks; k++, dst += 64, src += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32)), d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
    }
    _mm_sfence(); /* the streamed stores are visible before anything after this copy */
    memcpy(dst, src, n % 64);
}
#else
static void stream_bytes(char *dst, const char *src, size_t n) { memcpy(dst, src, n); }
#endif

static PyObject *stream_copy(PyObject *self, PyObject *args) {
    Py_ssize_t dst, src, nbytes;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnn:stream_copy", &dst, &src, &nbytes)) return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "stream_copy: negative size");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    stream_bytes((char *)dst, (const char *)src, (size_t)nbytes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The largest |x| bit pattern of n items: >= the infinity's pattern means a NaN or an Inf is there. */
#define DEFINE_MAX_MAGNITUDE(NAME, T, ATTRIBUTES)                                                 \
    ATTRIBUTES static T NAME(const T *src, size_t n, T magnitude) {                              \
        T m = 0;                                                                                 \
        for (size_t i = 0; i < n; i++) {                                                         \
            T x = src[i] & magnitude;                                                            \
            m = x > m ? x : m;                                                                   \
        }                                                                                        \
        return m;                                                                                \
    }

DEFINE_MAX_MAGNITUDE(max_magnitude_u16, uint16_t, )
DEFINE_MAX_MAGNITUDE(max_magnitude_u32, uint32_t, )
DEFINE_MAX_MAGNITUDE(max_magnitude_u64, uint64_t, )
#ifdef HAVE_AVX2_PATH
DEFINE_MAX_MAGNITUDE(max_magnitude_u16_avx2, uint16_t, __attribute__((target("avx2"))))
DEFINE_MAX_MAGNITUDE(max_magnitude_u32_avx2, uint32_t, __attribute__((target("avx2"))))
#endif

#define CHECK_CHUNK (64 * 1024)

/* Whether none of n items at p is a NaN or an Inf (the dispatch of all_finite, without the GIL). */
static int finite_items(const void *p, size_t n, Py_ssize_t itemsize, int bfloat) {
    if (itemsize == 2) {
        uint16_t m;
#ifdef HAVE_AVX2_PATH
        if (__builtin_cpu_supports("avx2"))
            m = max_magnitude_u16_avx2((const uint16_t *)p, n, 0x7fff);
        else
#endif
            m = max_magnitude_u16((const uint16_t *)p, n, 0x7fff);
        return m < (bfloat ? 0x7f80 : 0x7c00);
    }
    if (itemsize == 4) {
        uint32_t m;
#ifdef HAVE_AVX2_PATH
        if (__builtin_cpu_supports("avx2"))
            m = max_magnitude_u32_avx2((const uint32_t *)p, n, 0x7fffffffu);
        else
#endif
            m = max_magnitude_u32((const uint32_t *)p, n, 0x7fffffffu);
        return m < 0x7f800000u;
    }
    return max_magnitude_u64((const uint64_t *)p, n, 0x7fffffffffffffffull) < 0x7ff0000000000000ull;
}

static PyObject *all_finite(PyObject *self, PyObject *args) {
    Py_ssize_t src, count, itemsize;
    int bfloat, finite = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnp:all_finite", &src, &count, &itemsize, &bfloat)) return NULL;
    if (count < 0 || (itemsize != 2 && itemsize != 4 && itemsize != 8)) {
        PyErr_SetString(PyExc_ValueError, "all_finite: bad count or itemsize");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    finite = finite_items((const void *)src, (size_t)count, itemsize, bfloat);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(finite);
}

static PyObject *copy_finite(PyObject *self, PyObject *args) {
    Py_ssize_t dst, src, count, itemsize;
    int bfloat, finite = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnp:copy_finite", &dst, &src, &count, &itemsize, &bfloat)) return NULL;
    if (count < 0 || (itemsize != 2 && itemsize != 4 && itemsize != 8)) {
        PyErr_SetString(PyExc_ValueError, "copy_finite: bad count or itemsize");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    size_t per_chunk = CHECK_CHUNK / (size_t)itemsize;
    for (size_t done = 0; done < (size_t)count; done += per_chunk) {
        size_t n = (size_t)count - done < per_chunk ? (size_t)count - done : per_chunk;
        const char *from = (const char *)src + done * (size_t)itemsize;
        if (finite) finite = finite_items(from, n, itemsize, bfloat);
        stream_bytes((char *)dst + done * (size_t)itemsize, from, n * (size_t)itemsize);
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(finite);
}

static PyObject *advise_huge_pages(PyObject *self, PyObject *args) {
    Py_ssize_t addr, nbytes;
    (void)self;
    if (!PyArg_ParseTuple(args, "nn:advise_huge_pages", &addr, &nbytes)) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = 2u << 20;
    uintptr_t begin = ((uintptr_t)addr + huge - 1) & ~(huge - 1), end = ((uintptr_t)addr + (uintptr_t)nbytes) & ~(huge - 1);
    if (nbytes > 0 && end > begin) (void)madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#else
    (void)addr, (void)nbytes;
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"advise_huge_pages", advise_huge_pages, METH_VARARGS,
     "advise_huge_pages(addr, nbytes): madvise(MADV_HUGEPAGE) on the 2 MiB pages inside the range (Linux)."},
    {"copy_finite", copy_finite, METH_VARARGS,
     "copy_finite(dst, src, count, itemsize, bfloat): stream_copy of count items, returning all_finite of them."},
    {"all_finite", all_finite, METH_VARARGS,
     "all_finite(src, count, itemsize, bfloat): no NaN or Inf among count IEEE floats at address src."},
    {"stream_copy", stream_copy, METH_VARARGS,
     "stream_copy(dst, src, nbytes): memcpy with non-temporal stores; addresses as integers, no overlap."},
    {"transpose", transpose, METH_VARARGS,
     "transpose(dst, src, rows, cols, src_col_stride, dst_row_stride, itemsize): "
     "dst[i*dst_row_stride + j] = src[i + j*src_col_stride]; addresses as integers, strides in items."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, 0, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
