# OpenMP helpers that still build without OpenMP (every call then reports one thread).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FA_OPENMP 1
    #else
    #define FA_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    #endif
    """
    bint FA_OPENMP
    int omp_get_max_threads() nogil
    int omp_get_thread_num() nogil
