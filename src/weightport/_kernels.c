/* weightport._kernels: the copies weightport does at memory speed, releasing the GIL.
 *
 * transpose(dst, src, rows, cols, src_col_stride, dst_row_stride, itemsize)
 *   dst[i * dst_row_stride + j] = src[i + j * src_col_stride]   for i < rows, j < cols
 * Addresses are integers, strides count elements, itemsize is 2, 4 or 8 bytes.
 *
 * This is the copy of a Keras kernel (in, gates*hidden), or one gate's block of its columns,
 * into PyTorch's row-major (gates*hidden, in) weight. Neither NumPy nor torch has a blocked,
 * thread-friendly kernel for a strided block: element-wise loops miss the cache and the TLB on
 * every read. Here the destination goes in strips of columns one cache line wide, each strip down
 * every row in 8 x 8 blocks (transposed in registers, AVX2 for 4-byte items where the CPU has it),
 * so each destination line is written whole, by non-temporal stores for 4-byte items: about the
 * time of a plain memcpy of the same bytes (a tiled order measured 2.5x that).
 *
 * stream_copy(dst, src, nbytes)
 *   memcpy with non-temporal stores (AVX2, else SSE2, on x86-64): a big copy's destination is
 *   written without first being read into the cache, a third less memory traffic than torch's copy_
 *   or a memcpy below the C library's own (machine-dependent, often hundreds of MiB) streaming
 *   threshold. The source is asked for 2 KiB ahead, across the 4 KiB page boundaries where the
 *   hardware prefetchers stop. Elsewhere it is memcpy.
 *
 * all_finite(src, count, itemsize, bfloat)
 *   Whether none of ``count`` IEEE floats (2, 4 or 8 bytes; 2 with ``bfloat``: bfloat16) is a NaN
 *   or an infinity: the largest magnitude bit pattern is compared with the infinity's, in one
 *   read-only pass (AVX2 where the CPU has it), faster than a sum and without its overflow.
 *
 * copy_finite(dst, src, count, itemsize, bfloat, streamed=False)
 *   all_finite and a copy into fresh memory fused: each 64 KiB chunk is scanned (which brings it
 *   into the cache) and then copied from there, so the source is read from memory once for both.
 *   Plain stores unless ``streamed``: memory never written before has its pages zeroed by the system
 *   as they are first touched, which leaves their lines in the cache, where plain stores overwrite
 *   them (streamed stores would push them out first: 1.5-2x slower, measured). Pages made ready
 *   beforehand by ``populate`` are written by streamed stores, as existing memory is.
 *   Returns whether every item was finite; the copy is made either way.
 *
 * populate(addr, nbytes)
 *   Backs the whole pages of fresh memory in [addr, addr + nbytes) at once (Linux 5.14+:
 *   madvise(MADV_POPULATE_WRITE)), where touching them one by one takes a fault per page (measured:
 *   a tenth to a fifth faster for a new model's tensors). Leaves the contents as they are. Returns
 *   whether it did; False elsewhere, where the pages are backed as they are first written.
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
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

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

/* The whole copy in strips of destination columns one 64-byte line wide (at least a block), each
 * strip down every row in BLOCK_FN blocks, then the strip's ragged edges item by item: every line
 * of the destination is written whole before the next, and the strip's source rows are read in
 * order, a few sequential streams the hardware prefetchers follow. */
#define DEFINE_TRANSPOSE(NAME, T, BLOCK_FN)                                                        \
    static void NAME(T *dst, const T *src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t sc,         \
                     Py_ssize_t dr) {                                                              \
        const Py_ssize_t strip = 64 / (Py_ssize_t)sizeof(T) > BLOCK ? 64 / (Py_ssize_t)sizeof(T) : BLOCK; \
        Py_ssize_t ie = rows / BLOCK * BLOCK;                                                      \
        for (Py_ssize_t j0 = 0; j0 < cols; j0 += strip) {                                          \
            Py_ssize_t j1 = j0 + strip < cols ? j0 + strip : cols;                                 \
            Py_ssize_t je = j0 + (j1 - j0) / BLOCK * BLOCK;                                        \
            for (Py_ssize_t i = 0; i < ie; i += BLOCK)                                             \
                for (Py_ssize_t j = j0; j < je; j += BLOCK)                                        \
                    BLOCK_FN(dst + i * dr + j, src + i + j * sc, sc, dr);                          \
            for (Py_ssize_t i = 0; i < rows; i++)                                                  \
                for (Py_ssize_t j = (i < ie ? je : j0); j < j1; j++) dst[i * dr + j] = src[i + j * sc]; \
        }                                                                                          \
    }

DEFINE_BLOCK(block8_u16, uint16_t)
DEFINE_BLOCK(block8_u32, uint32_t)
DEFINE_BLOCK(block8_u64, uint64_t)
DEFINE_TRANSPOSE(transpose_u16, uint16_t, block8_u16)
DEFINE_TRANSPOSE(transpose_u32, uint32_t, block8_u32)
DEFINE_TRANSPOSE(transpose_u64, uint64_t, block8_u64)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* Eight source rows of eight 4-byte items become eight destination rows, in registers. The items are
 * moved as float bit patterns: loads and stores never touch the values. */
__attribute__((target("avx2"))) static inline void block8_avx2(const float *s, Py_ssize_t sc, __m256 out[8]) {
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
    out[0] = _mm256_permute2f128_ps(u0, u4, 0x20), out[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    out[2] = _mm256_permute2f128_ps(u2, u6, 0x20), out[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    out[4] = _mm256_permute2f128_ps(u0, u4, 0x31), out[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    out[6] = _mm256_permute2f128_ps(u2, u6, 0x31), out[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* transpose_u32's strips with two register blocks side by side: each destination row gets a whole
 * 64-byte line at once, written by non-temporal stores (no read of the line first) where the rows
 * are 32-byte aligned. Into fresh memory too: a strip touches every destination row's page, so the
 * lines the system zeroed on those first touches have left the cache before the strips reach them.
 * The last columns (fewer than a strip) go through transpose_u32. */
__attribute__((target("avx2"))) static void transpose_u32_avx2(uint32_t *dst, const uint32_t *src,
                                                               Py_ssize_t rows, Py_ssize_t cols,
                                                               Py_ssize_t sc, Py_ssize_t dr) {
    int streamed = (uintptr_t)dst % 32 == 0 && dr % 8 == 0;
    Py_ssize_t ie = rows / BLOCK * BLOCK, je = cols / 16 * 16;
    __m256 left[8], right[8];
    for (Py_ssize_t j0 = 0; j0 < je; j0 += 16) {
        for (Py_ssize_t i = 0; i < ie; i += BLOCK) {
            block8_avx2((const float *)src + i + j0 * sc, sc, left);
            block8_avx2((const float *)src + i + (j0 + 8) * sc, sc, right);
            float *d = (float *)dst + i * dr + j0;
            for (int a = 0; a < BLOCK; a++) {
                if (streamed) {
                    _mm256_stream_ps(d + a * dr, left[a]);
                    _mm256_stream_ps(d + a * dr + 8, right[a]);
                } else {
                    _mm256_storeu_ps(d + a * dr, left[a]);
                    _mm256_storeu_ps(d + a * dr + 8, right[a]);
                }
            }
        }
        for (Py_ssize_t i = ie; i < rows; i++)
            for (Py_ssize_t j = j0; j < j0 + 16; j++) dst[i * dr + j] = src[i + j * sc];
    }
    if (streamed) _mm_sfence(); /* the streamed stores are visible before anything after this copy */
    if (je < cols) transpose_u32(dst + je, src + je * sc, rows, cols - je, sc, dr);
}
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
#define PREFETCH_AHEAD 2048 /* source bytes asked for ahead of the copy (1-2 KiB measured best) */

/* One 64-byte line from s to d (d 16-byte aligned) by non-temporal stores. */
static inline void stream_line(char *d, const char *s) {
    __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
    _mm_stream_si128((__m128i *)d, a);
    _mm_stream_si128((__m128i *)(d + 16), b);
    _mm_stream_si128((__m128i *)(d + 32), c);
    _mm_stream_si128((__m128i *)(d + 48), e);
}

/* The same in two 32-byte stores (d 32-byte aligned): a tenth faster where the CPU has them. */
__attribute__((target("avx2"))) static inline void stream_line_avx2(char *d, const char *s) {
    __m256i a = _mm256_loadu_si256((const __m256i *)s), b = _mm256_loadu_si256((const __m256i *)(s + 32));
    _mm256_stream_si256((__m256i *)d, a);
    _mm256_stream_si256((__m256i *)(d + 32), b);
}

/* n bytes by non-temporal stores of whole destination lines, the source asked for 2 KiB ahead by
 * non-temporal prefetches (which leave the caches to the destination's neighbours, and never
 * fault): the hardware prefetchers stop at every 4 KiB page, where a stream without them waits.
 * Measured on 369 MB: AVX2 stores and the prefetch each take a tenth off SSE2 stores alone. */
#define DEFINE_STREAM_BYTES(NAME, LINE, ATTRIBUTES)                                                 \
    ATTRIBUTES static void NAME(char *dst, const char *src, size_t n) {                             \
        size_t head = (size_t)(-(uintptr_t)dst) & 63; /* up to dst's first whole line */            \
        if (head > n) head = n;                                                                     \
        memcpy(dst, src, head);                                                                     \
        dst += head, src += head, n -= head;                                                        \
        size_t lines = n / 64 * 64;                                                                 \
        for (size_t k = 0; k < lines; k += 64) {                                                    \
            _mm_prefetch(src + k + PREFETCH_AHEAD, _MM_HINT_NTA);                                   \
            LINE(dst + k, src + k);                                                                 \
        }                                                                                           \
        _mm_sfence(); /* the streamed stores are visible before anything after this copy */        \
        memcpy(dst + lines, src + lines, n - lines);                                                \
    }

DEFINE_STREAM_BYTES(stream_bytes_sse2, stream_line, )
DEFINE_STREAM_BYTES(stream_bytes_avx2, stream_line_avx2, __attribute__((target("avx2"))))

static void stream_bytes(char *dst, const char *src, size_t n) {
    if (__builtin_cpu_supports("avx2"))
        stream_bytes_avx2(dst, src, n);
    else
        stream_bytes_sse2(dst, src, n);
}
#else
static void stream_bytes(char *dst, const char *src, size_t n) {
    memcpy(dst, src, n);
}
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
    int bfloat, streamed = 0, finite = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnp|p:copy_finite", &dst, &src, &count, &itemsize, &bfloat, &streamed))
        return NULL;
    if (count < 0 || (itemsize != 2 && itemsize != 4 && itemsize != 8)) {
        PyErr_SetString(PyExc_ValueError, "copy_finite: bad count or itemsize");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    size_t per_chunk = CHECK_CHUNK / (size_t)itemsize;
    for (size_t done = 0; done < (size_t)count; done += per_chunk) {
        size_t n = (size_t)count - done < per_chunk ? (size_t)count - done : per_chunk;
        const char *from = (const char *)src + done * (size_t)itemsize;
        char *to = (char *)dst + done * (size_t)itemsize;
        if (finite) finite = finite_items(from, n, itemsize, bfloat);
        if (streamed)
            stream_bytes(to, from, n * (size_t)itemsize);
        else
            memcpy(to, from, n * (size_t)itemsize);
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(finite);
}

#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23 /* Linux 5.14's value, where the C library's headers are older */
#endif

static PyObject *populate(PyObject *self, PyObject *args) {
    Py_ssize_t addr, nbytes;
    int done = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "nn:populate", &addr, &nbytes)) return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "populate: negative size");
        return NULL;
    }
#ifdef __linux__
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t first = ((uintptr_t)addr + page - 1) / page * page, end = ((uintptr_t)addr + (uintptr_t)nbytes) / page * page;
    if (end > first) {
        Py_BEGIN_ALLOW_THREADS
        done = madvise((void *)first, end - first, MADV_POPULATE_WRITE) == 0;
        Py_END_ALLOW_THREADS
    }
#endif
    return PyBool_FromLong(done);
}

static PyMethodDef methods[] = {
    {"copy_finite", copy_finite, METH_VARARGS,
     "copy_finite(dst, src, count, itemsize, bfloat, streamed=False): a copy of count items into fresh "
     "memory (streamed stores where it was populated), returning all_finite of them."},
    {"populate", populate, METH_VARARGS,
     "populate(addr, nbytes): back the whole pages of fresh memory in the range at once; whether it did."},
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
