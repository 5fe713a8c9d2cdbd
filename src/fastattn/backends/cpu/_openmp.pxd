# OpenMP helpers that still build without OpenMP (every call then reports one thread).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FA_OPENMP 1
    /* an orphaned barrier: binds to the enclosing parallel region (Cython's prange is nowait) */
    static inline void fa_omp_barrier(void) { _Pragma("omp barrier") }
    #else
    static inline void fa_omp_barrier(void) {}
    #define FA_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint FA_OPENMP
    int omp_get_max_threads() nogil
    int omp_get_thread_num() nogil
    void fa_omp_barrier() nogil
