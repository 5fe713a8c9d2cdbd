# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython driver of the CPU flash-attention kernel.

One parallel skeleton, the GIL released throughout.  The (batch x head) heads are taken in
groups; for each group, all threads first pack the group's K/V tiles into one shared panel
per head (`prange`, dynamic: a short entry's tiles past its end are empty), then share out the work items (head x query tile) with a
dynamic `prange`, heaviest tiles first so the tail of the schedule is light.  The caller plans
the thread count and the group (backends.cpu._tiles.plan_call: about four items per thread, a
multiple of the thread count where it can), so long sequences keep one panel (O(seq_kv x d))
and short ones a few small ones.  Each thread allocates its tile scratch once.  Invariants (checked by the Python caller, trusted here): q, k, v
are 4-D NumPy arrays of one supported dtype with matching shapes; out and lse are
C-contiguous, float64 for float64 input and float32 otherwise; block sizes are >= 1.
"""

from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cimport numpy as cnp

from ._openmp cimport FA_OPENMP, fa_omp_barrier, omp_get_max_threads

cnp.import_array()


cdef extern from "kernels/flash_cpu.h" nogil:
    enum:
        FA_DTYPE_F32
        FA_DTYPE_F64
        FA_DTYPE_F16
        FA_DTYPE_BF16
        FA_ISA_GENERIC
        FA_ISA_AVX2
        FA_ISA_AVX512
        FA_ISA_COUNT
        FA_MASK_BOOL
        FA_MASK_F16
        FA_MASK_BF16
        FA_MASK_F32
        FA_MASK_F64
    ctypedef struct fa_params:
        const char *q
        const char *k
        const char *v
        int64_t q_strides[4]
        int64_t k_strides[4]
        int64_t v_strides[4]
        void *out
        int64_t out_strides[3]
        void *lse
        int64_t lse_rows
        int in_dtype
        int64_t batch, heads, heads_kv, group, seq_q, seq_kv, head_dim, head_dim_v
        int64_t block_q, block_kv
        double scale
        int causal, bottom_right
        int64_t window_left, window_right
        double softcap
        const float *alibi
        int64_t alibi_sb
        const char *mask
        int mask_dtype
        int64_t mask_strides[4]
        const int32_t *lens_q
        const int32_t *lens_kv
        const int32_t *cu_q
        const int32_t *cu_kv
        const int32_t *block_table
        int64_t table_stride, block_size
        int64_t decode_heads
        int dropout
        uint32_t drop_threshold
        double drop_scale
        uint64_t seed
    int fa_isa_supported(int isa)
    int fa_best_isa()
    const char *fa_isa_name(int isa)
    int64_t fa_num_q_tiles(const fa_params *p)
    int64_t fa_num_kv_tiles(const fa_params *p)
    int64_t fa_panel_bytes(const fa_params *p, int isa)
    void *fa_aligned_alloc(int64_t nbytes)
    void fa_aligned_free(void *ptr)
    void *fa_scratch_new(const fa_params *p, int isa)
    void fa_scratch_free(void *scratch)
    void fa_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel)
    void fa_run_item(const fa_params *p, int isa, int64_t bh, int64_t qt, const void *panel, void *scratch)
    int64_t fa_decode_parts_bytes(const fa_params *p, int isa, int64_t nsplit)
    void *fa_decode_scratch_new(const fa_params *p, int isa)
    void fa_decode_item(const fa_params *p, int isa, int64_t bh, int64_t split, int64_t nsplit, void *parts,
                        void *scratch)
    void fa_decode_merge(const fa_params *p, int isa, int64_t row, int64_t nsplit, const void *parts)
    ctypedef struct fa_bwd:
        const char *dout
        const char *o
        const double *lse
        int64_t dout_strides[4]
        int64_t o_strides[4]
        void *dq
        void *dk
        void *dv
        void *dbias
        int64_t dq_strides[3]
        int64_t dk_strides[3]
        int64_t dv_strides[3]
        int64_t dbias_strides[3]
        int64_t nchunk
    int64_t fa_bwd_panel_bytes(const fa_params *p, int isa)
    int64_t fa_bwd_parts_bytes(const fa_params *p, int isa, int64_t nchunk)
    int64_t fa_bwd_dim_pad(int isa, int in_dtype)
    void *fa_bwd_scratch_new(const fa_params *p, int isa)
    void fa_bwd_pack_tile(const fa_params *p, int isa, int64_t bh, int64_t tile, void *panel)
    void fa_bwd_item(const fa_params *p, const fa_bwd *g, int isa, int64_t bh, int64_t chunk, const void *panel,
                     void *parts, void *scratch)
    void fa_bwd_reduce(const fa_params *p, const fa_bwd *g, int isa, int64_t bh, int64_t row, const void *parts)


cdef extern from "<string.h>" nogil:
    void *memset(void *s, int c, size_t n)


ISA_NAMES = {FA_ISA_GENERIC: "generic", FA_ISA_AVX2: "avx2", FA_ISA_AVX512: "avx512"}
_DTYPES = {"float32": FA_DTYPE_F32, "float64": FA_DTYPE_F64, "float16": FA_DTYPE_F16, "bfloat16": FA_DTYPE_BF16}
_codes_by_dtype = {}   # (table id, dtype) -> code: numpy's dtype.name is built anew at each access


cdef int _dtype_code(dict table, object dtype) except? -1:
    key = (id(table), dtype)
    code = _codes_by_dtype.get(key)
    if code is None:
        code = table[dtype.name]
        _codes_by_dtype[key] = code
    return code


def isa_code(str name):
    for code, isa_name in ISA_NAMES.items():
        if isa_name == name:
            return code
    raise ValueError(f"unknown SIMD path {name!r}; choose one of {', '.join(ISA_NAMES.values())}")


def supported_isas():
    """Names of the SIMD paths this CPU can run, best last."""
    return [ISA_NAMES[i] for i in range(FA_ISA_COUNT) if fa_isa_supported(i)]


def best_isa():
    return ISA_NAMES[fa_best_isa()]


cdef extern from "<stdlib.h>" nogil:
    char *getenv(const char *name)


def simd_from_env():
    """FASTATTN_SIMD as the process environment holds it now (``os.environ`` writes through to it), or None:
    a C lookup, a twentieth of ``os.environ.get``'s cost on every call."""
    cdef char *value = getenv(b"FASTATTN_SIMD")
    if value == NULL:
        return None
    return (<bytes> value).decode("utf-8", "surrogateescape")


def openmp_enabled():
    return bool(FA_OPENMP)


def default_threads():
    """OpenMP's current default (OMP_NUM_THREADS, threadpoolctl limits)."""
    return omp_get_max_threads()


cdef void _fill_strides(int64_t *dst, cnp.ndarray arr):
    cdef int axis
    for axis in range(4):
        dst[axis] = arr.strides[axis]


cdef void _fill_views(fa_params *p, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out,
                      cnp.ndarray lse, double scale, bint causal, bint bottom_right, int64_t window_left,
                      int64_t window_right, double softcap, object alibi) except *:
    """The fields both drivers fill alike: the views and their strides, the output, and the mask rule."""
    cdef cnp.ndarray alibi_arr
    cdef int axis
    p.q = <const char *> cnp.PyArray_DATA(q)
    p.k = <const char *> cnp.PyArray_DATA(k)
    p.v = <const char *> cnp.PyArray_DATA(v)
    _fill_strides(p.q_strides, q)
    _fill_strides(p.k_strides, k)
    _fill_strides(p.v_strides, v)
    p.out = cnp.PyArray_DATA(out)
    for axis in range(3):
        p.out_strides[axis] = out.strides[axis] // out.itemsize
    p.lse = cnp.PyArray_DATA(lse)
    p.lse_rows = q.shape[2]
    p.in_dtype = _dtype_code(_DTYPES, q.dtype)
    p.heads, p.heads_kv = q.shape[1], k.shape[1]
    p.group = p.heads // p.heads_kv if p.heads_kv else 1
    p.head_dim, p.head_dim_v = q.shape[3], v.shape[3]
    p.scale = scale
    p.causal = causal
    p.bottom_right = bottom_right
    p.window_left = window_left
    p.window_right = window_right
    p.softcap = softcap
    p.alibi = NULL
    p.alibi_sb = 0
    if alibi is not None:
        alibi_arr = alibi
        p.alibi = <const float *> cnp.PyArray_DATA(alibi_arr)
        p.alibi_sb = p.heads if alibi_arr.shape[0] > 1 else 0


_MASK_DTYPES = {"bool": FA_MASK_BOOL, "float16": FA_MASK_F16, "bfloat16": FA_MASK_BF16, "float32": FA_MASK_F32,
                "float64": FA_MASK_F64}


cdef const int32_t *_ints(object arr):
    cdef cnp.ndarray a
    if arr is None:
        return NULL
    a = arr
    return <const int32_t *> cnp.PyArray_DATA(a)


cdef void _fill_call(fa_params *p, int64_t batch, int64_t seq_q, int64_t seq_kv, int64_t block_q,
                     int64_t block_kv, object mask, object lens_q, object lens_kv, object cu_q, object cu_kv,
                     bint dropout, uint32_t drop_threshold, double drop_scale, uint64_t seed) except *:
    """The fields the forward and the backward fill alike: the entries and their lengths, the tiles, the
    attn_mask view, dropout (the block table is each caller's)."""
    cdef cnp.ndarray mask_arr
    p.batch = batch
    p.seq_q, p.seq_kv = seq_q, seq_kv
    p.block_q = block_q
    p.block_kv = block_kv
    p.mask = NULL
    p.mask_dtype = 0
    if mask is not None:
        mask_arr = mask
        p.mask = <const char *> cnp.PyArray_DATA(mask_arr)
        p.mask_dtype = _dtype_code(_MASK_DTYPES, mask_arr.dtype)
        _fill_strides(p.mask_strides, mask_arr)
    p.lens_q = _ints(lens_q)
    p.lens_kv = _ints(lens_kv)
    p.cu_q = _ints(cu_q)
    p.cu_kv = _ints(cu_kv)
    p.decode_heads = 1
    p.dropout = dropout
    p.drop_threshold = drop_threshold
    p.drop_scale = drop_scale
    p.seed = seed


def forward(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, cnp.ndarray lse, *,
            int64_t batch, int64_t seq_q, int64_t seq_kv,
            int64_t block_q, int64_t block_kv, double scale, bint causal, bint bottom_right,
            int64_t window_left, int64_t window_right, double softcap, object alibi, object mask,
            object lens_q, object lens_kv, object cu_q, object cu_kv,
            bint dropout, uint32_t drop_threshold, double drop_scale, uint64_t seed, str isa,
            int num_threads, int64_t group, object block_table=None):
    """Runs the kernel with ``num_threads`` threads (>= 1, at most one per work item) and ``group``
    (batch entry, k/v head) panels packed at a time (both planned by the caller:
    backends.cpu._tiles.plan_call); returns the number of threads that took part (0 for an empty
    call).  q (b, h, s, d) and k, v (b, h_kv, s, d) views; out (b, h, s, d_v) of the compute type,
    unit stride along d; lse contiguous (b, h, s).  ``batch``, ``seq_q``, ``seq_kv``: the entries and
    their padded (or longest) lengths (a packed call's views hold one entry).  ``alibi``: (b or 1, h)
    float32 or None; ``mask``: a (batch, h, seq_q, seq_kv) view or None; lens_* / cu_*: int32 or None.
    ``block_table``: a paged cache's (batch, max_blocks) int32 table (k, v then are (num_blocks, h_kv,
    block_size, d) views, every entry a valid block for the keys lens_kv asks for), or None."""
    cdef fa_params p
    cdef int isa_id = isa_code(isa)
    cdef int64_t n_heads, n_q, n_kv, n_groups, j, panel_bytes, panels_bytes
    cdef int64_t g = 0, first = 0, size = 0   # set before the parallel block: firstprivate copies
    cdef char *panels = NULL
    cdef void *scratch = NULL
    cdef int failed = 0
    cdef int *failed_flag = &failed   # written through a pointer: shared, not thread-private
    if not fa_isa_supported(isa_id):
        raise RuntimeError(f"SIMD path {isa!r} is not supported by this CPU; supported: {supported_isas()}")
    _fill_views(&p, q, k, v, out, lse, scale, causal, bottom_right, window_left, window_right, softcap, alibi)
    _fill_call(&p, batch, seq_q, seq_kv, block_q, block_kv, mask, lens_q, lens_kv, cu_q, cu_kv, dropout,
               drop_threshold, drop_scale, seed)
    _set_table(&p, block_table, k.shape[2])
    n_heads = p.batch * p.heads_kv   # panels: one per (batch entry, k/v head)
    n_q = fa_num_q_tiles(&p)
    n_kv = fa_num_kv_tiles(&p)
    if n_heads == 0 or n_q == 0:
        return 0
    if num_threads < 1 or num_threads > n_heads * n_q or group < 1 or group > n_heads:
        raise ValueError(f"fastattn: bad plan (num_threads={num_threads}, group={group}) for "
                         f"{n_heads} heads x {n_q} query tiles")
    n_groups = (n_heads + group - 1) // group
    panel_bytes = fa_panel_bytes(&p, isa_id)
    panels_bytes = -1 if panel_bytes < 0 or panel_bytes > (2**63 - 1) // group else group * panel_bytes
    if panels_bytes < 0:
        raise MemoryError(
            f"fastattn: k and v with seq_kv={p.seq_kv} keys of head_dim={p.head_dim} need more than 2**63 bytes "
            f"of packed K/V panels; the cpu backend packs every key it attends to"
        )
    panels = <char *> fa_aligned_alloc(panels_bytes)
    if panels == NULL:
        raise MemoryError(
            f"fastattn: could not allocate {panels_bytes} bytes of packed K/V panels for k and v with "
            f"seq_kv={p.seq_kv} keys of head_dim={p.head_dim} ({group} head(s) at a time)"
        )
    try:
        with nogil, parallel(num_threads=num_threads):
            scratch = fa_scratch_new(&p, isa_id)
            if scratch == NULL:
                failed_flag[0] = 1
            for g in range(n_groups):
                first = g * group
                size = min(group, n_heads - first)
                # dynamic: a ragged batch's short entries leave their high tiles empty, which a static split
                # would hand to one thread while the other packed every real tile
                for j in prange(size * n_kv, schedule="dynamic"):
                    fa_pack_tile(&p, isa_id, first + j % size, j // size, panels + (j % size) * panel_bytes)
                # end: prange
                fa_omp_barrier()  # the panels are complete before any item reads them
                for j in prange(size * n_q, schedule="dynamic"):
                    if scratch != NULL:
                        # heaviest items first: causal, the last query tiles; otherwise the full
                        # tiles before the short last one
                        fa_run_item(&p, isa_id, first + j % size,
                                    n_q - 1 - j // size if p.causal else j // size,
                                    panels + (j % size) * panel_bytes, scratch)
                # end: prange
                fa_omp_barrier()  # every item of the group is done before its panels are reused
            fa_scratch_free(scratch)
    finally:
        fa_aligned_free(panels)
    if failed:
        raise MemoryError(
            f"fastattn: could not allocate the per-thread tile scratch (block_q={block_q}, block_kv={block_kv}, "
            f"head_dim={p.head_dim})"
        )
    return num_threads


cdef void _set_table(fa_params *p, object block_table, int64_t block_size):
    cdef cnp.ndarray table
    p.block_table = NULL
    p.table_stride = 0
    p.block_size = 0
    if block_table is not None:
        table = block_table
        p.block_table = <const int32_t *> cnp.PyArray_DATA(table)
        p.table_stride = table.shape[1]
        p.block_size = block_size


def decode(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, cnp.ndarray lse, *,
           cnp.ndarray lens_kv, object block_table, double scale, bint causal, int64_t window_left,
           int64_t window_right, double softcap, object alibi, str isa, int num_threads, int64_t nsplit,
           int64_t heads_per_item=1):
    """Decode: every query row of a (batch entry, k/v head) against its lens_kv[b] keys, read in place
    (fa_decode_item), the keys cut into ``nsplit`` splits merged by their lse (fa_decode_merge); the mask
    aligned bottom-right.  q (b, h, s, d), out (b, h, s, d_v) of the compute type with unit stride along d,
    lse contiguous (b, h, s); k, v (b, h_kv, s_cache, d) views, or with ``block_table`` (batch, max_blocks)
    int32 a paged cache's (num_blocks, h_kv, block_size, d) views.  Invariants (checked by the caller):
    lens_kv int32 (b,) within the cache (and its blocks valid), nsplit >= 1, num_threads >= 1.
    ``heads_per_item``: k/v heads of one work item (neighbours in memory: read side by side).
    Returns the threads that took part."""
    cdef fa_params p
    cdef int isa_id = isa_code(isa)
    cdef int64_t n_items, n_rows, j, parts_bytes
    cdef void *parts = NULL
    cdef void *scratch = NULL
    cdef int failed = 0
    cdef int *failed_flag = &failed
    if not fa_isa_supported(isa_id):
        raise RuntimeError(f"SIMD path {isa!r} is not supported by this CPU; supported: {supported_isas()}")
    _fill_views(&p, q, k, v, out, lse, scale, causal, True, window_left, window_right, softcap, alibi)
    p.batch = q.shape[0]
    p.seq_q, p.seq_kv = q.shape[2], k.shape[2]
    p.block_q = p.seq_q * p.group
    p.block_kv = 32
    p.mask = NULL
    p.mask_dtype = 0
    p.lens_q = NULL
    p.lens_kv = <const int32_t *> cnp.PyArray_DATA(lens_kv)
    p.cu_q = NULL
    p.cu_kv = NULL
    _set_table(&p, block_table, k.shape[2])
    p.dropout = 0
    p.drop_threshold = 0
    p.drop_scale = 1.0
    p.seed = 0
    if heads_per_item < 1:
        raise ValueError(f"fastattn: heads_per_item must be >= 1, got {heads_per_item}")
    p.decode_heads = min(heads_per_item, max(p.heads_kv, 1))
    n_items = p.batch * ((p.heads_kv + p.decode_heads - 1) // p.decode_heads)
    n_rows = p.batch * p.heads * p.seq_q
    if n_items == 0 or p.seq_q == 0:
        return 0
    if num_threads < 1 or nsplit < 1:
        raise ValueError(f"fastattn: bad decode plan (num_threads={num_threads}, nsplit={nsplit})")
    if nsplit > 1:
        parts_bytes = fa_decode_parts_bytes(&p, isa_id, nsplit)
        if parts_bytes < 0:
            raise MemoryError(f"fastattn: {nsplit} splits of {n_rows} rows do not fit in memory")
        parts = fa_aligned_alloc(parts_bytes)
        if parts == NULL:
            raise MemoryError(f"fastattn: could not allocate {parts_bytes} bytes for {nsplit} decode splits")
    try:
        with nogil, parallel(num_threads=num_threads):
            scratch = fa_decode_scratch_new(&p, isa_id)
            if scratch == NULL:
                failed_flag[0] = 1
            for j in prange(n_items * nsplit, schedule="dynamic"):
                if scratch != NULL:
                    fa_decode_item(&p, isa_id, j // nsplit, j % nsplit, nsplit, parts, scratch)
            fa_scratch_free(scratch)
        if nsplit > 1 and not failed:
            with nogil:
                for j in prange(n_rows, schedule="static", num_threads=num_threads):
                    fa_decode_merge(&p, isa_id, j, nsplit, parts)
    finally:
        fa_aligned_free(parts)
    if failed:
        raise MemoryError(f"fastattn: could not allocate the per-thread decode scratch ({p.block_q} rows, "
                          f"head_dim={p.head_dim})")
    return num_threads


def dim_pad(str isa, str dtype):
    """The backward's gradient arrays have their head dims rounded up to a multiple of this."""
    return fa_bwd_dim_pad(isa_code(isa), _DTYPES[dtype])


cdef void _fill_strides3(int64_t *dst, cnp.ndarray arr):
    cdef int axis
    for axis in range(3):
        dst[axis] = arr.strides[axis] // arr.itemsize


def backward(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray dout, cnp.ndarray o, cnp.ndarray lse,
             cnp.ndarray dq, cnp.ndarray dk, cnp.ndarray dv, object dbias, *, int64_t batch, int64_t seq_q,
             int64_t seq_kv, int64_t block_q, int64_t block_kv, double scale, bint causal, bint bottom_right,
             int64_t window_left, int64_t window_right, double softcap, object alibi, object mask, object lens_q,
             object lens_kv, object cu_q, object cu_kv, bint dropout, uint32_t drop_threshold, double drop_scale,
             uint64_t seed, str isa, int num_threads, int64_t group, int64_t nchunk):
    """The backward (kernels/flash_bwd_tile.h) with ``num_threads`` threads, ``group`` (batch entry, k/v head)
    panels at a time and each head's query tiles in ``nchunk`` chunks (planned by the caller:
    backends.cpu._tiles.plan_backward).  q, k, v, dout (b, h, s, d_v) and o: the forward's views; lse the
    forward's (b, h, s) as float64, contiguous; dq (b, h, s, dp), dk (b, h_kv, s, dp), dv (b, h_kv, s,
    dvp): zeroed arrays of the compute type, unit stride along the last axis, dp / dvp multiples of
    ``dim_pad``; dbias: None or a zeroed contiguous (b, h, s_q, s_kv) array of the compute type (dS).  The
    mask arguments are the forward's.  Returns the threads that took part."""
    cdef fa_params p
    cdef fa_bwd gb
    cdef int isa_id = isa_code(isa)
    cdef int64_t n_heads, n_kv, n_groups, j, panel_bytes, panels_bytes, parts_bytes = 0
    cdef int64_t gi = 0, first = 0, size = 0
    cdef char *panels = NULL
    cdef char *parts = NULL
    cdef void *scratch = NULL
    cdef int failed = 0
    cdef int *failed_flag = &failed
    cdef cnp.ndarray dbias_arr
    if not fa_isa_supported(isa_id):
        raise RuntimeError(f"SIMD path {isa!r} is not supported by this CPU; supported: {supported_isas()}")
    _fill_views(&p, q, k, v, dq, lse, scale, causal, bottom_right, window_left, window_right, softcap, alibi)
    _fill_call(&p, batch, seq_q, seq_kv, block_q, block_kv, mask, lens_q, lens_kv, cu_q, cu_kv, dropout,
               drop_threshold, drop_scale, seed)
    _set_table(&p, None, 0)
    gb.dout = <const char *> cnp.PyArray_DATA(dout)
    gb.o = <const char *> cnp.PyArray_DATA(o)
    gb.lse = <const double *> cnp.PyArray_DATA(lse)
    _fill_strides(gb.dout_strides, dout)
    _fill_strides(gb.o_strides, o)
    gb.dq = cnp.PyArray_DATA(dq)
    gb.dk = cnp.PyArray_DATA(dk)
    gb.dv = cnp.PyArray_DATA(dv)
    _fill_strides3(gb.dq_strides, dq)
    _fill_strides3(gb.dk_strides, dk)
    _fill_strides3(gb.dv_strides, dv)
    gb.dbias = NULL
    if dbias is not None:
        dbias_arr = dbias
        gb.dbias = cnp.PyArray_DATA(dbias_arr)
        _fill_strides3(gb.dbias_strides, dbias_arr)
    gb.nchunk = nchunk
    n_heads = p.batch * p.heads_kv
    n_kv = fa_num_kv_tiles(&p)
    if n_heads == 0 or fa_num_q_tiles(&p) == 0 or n_kv == 0:
        return 0
    if num_threads < 1 or group < 1 or group > n_heads or nchunk < 1:
        raise ValueError(f"fastattn: bad backward plan (num_threads={num_threads}, group={group}, "
                         f"nchunk={nchunk}) for {n_heads} heads")
    n_groups = (n_heads + group - 1) // group
    panel_bytes = fa_bwd_panel_bytes(&p, isa_id)
    panels_bytes = -1 if panel_bytes < 0 or panel_bytes > (2**63 - 1) // group else group * panel_bytes
    if nchunk > 1:
        parts_bytes = fa_bwd_parts_bytes(&p, isa_id, nchunk)
        if parts_bytes < 0 or parts_bytes > (2**63 - 1) // group:
            panels_bytes = -1
    if panels_bytes < 0:
        raise MemoryError(f"fastattn: the backward's packed K/V panels for seq_kv={p.seq_kv} keys of "
                          f"head_dim={p.head_dim} need more than 2**63 bytes")
    panels = <char *> fa_aligned_alloc(panels_bytes)
    if nchunk > 1:
        parts = <char *> fa_aligned_alloc(group * parts_bytes)
    if panels == NULL or (nchunk > 1 and parts == NULL):
        fa_aligned_free(panels)
        fa_aligned_free(parts)
        raise MemoryError(f"fastattn: could not allocate {panels_bytes + group * parts_bytes} bytes of backward "
                          f"panels ({group} head(s) of seq_kv={p.seq_kv}, head_dim={p.head_dim}, {nchunk} chunks)")
    try:
        with nogil, parallel(num_threads=num_threads):
            scratch = fa_bwd_scratch_new(&p, isa_id)
            if scratch == NULL:
                failed_flag[0] = 1
            for gi in range(n_groups):
                first = gi * group
                size = min(group, n_heads - first)
                for j in prange(size * n_kv, schedule="dynamic"):   # as in the forward: ragged entries
                    fa_bwd_pack_tile(&p, isa_id, first + j % size, j // size, panels + (j % size) * panel_bytes)
                # end: prange
                if nchunk > 1:
                    for j in prange(size, schedule="static"):
                        memset(parts + j * parts_bytes, 0, parts_bytes)
                    # end: prange
                fa_omp_barrier()  # the panels are complete before any item reads them
                for j in prange(size * nchunk, schedule="dynamic"):
                    if scratch != NULL:
                        fa_bwd_item(&p, &gb, isa_id, first + j % size, j // size, panels + (j % size) * panel_bytes,
                                    parts + (j % size) * parts_bytes if nchunk > 1 else NULL, scratch)
                # end: prange
                fa_omp_barrier()
                if nchunk > 1:
                    for j in prange(size * p.seq_kv, schedule="static"):
                        fa_bwd_reduce(&p, &gb, isa_id, first + j // p.seq_kv, j % p.seq_kv,
                                      parts + (j // p.seq_kv) * parts_bytes)
                    # end: prange
                    fa_omp_barrier()  # the group's parts are added before they are reused
            fa_scratch_free(scratch)
    finally:
        fa_aligned_free(panels)
        fa_aligned_free(parts)
    if failed:
        raise MemoryError(f"fastattn: could not allocate the per-thread backward scratch (block_q={block_q}, "
                          f"block_kv={block_kv}, head_dim={p.head_dim})")
    return num_threads
