"""How many threads a CPU call runs on: decided here and only here.

    threads = min(asked, cpus, useful, items)

``asked``   ``num_threads`` when given, else OpenMP's default (``OMP_NUM_THREADS``,
            ``threadpoolctl.threadpool_limits``): an upper bound, never a demand.
``cpus``    the CPUs this process may run on now: its affinity mask, and a cgroup CPU quota
            (a container given 1.5 CPUs gets 2).  More threads than that only wait for each
            other; an absurd request (``num_threads=2000``) would also make the OpenMP runtime
            abort the interpreter when it cannot create them.
``useful``  one thread per ``MIN_WORK_PER_THREAD_NS`` of estimated single-thread work, so a
            small call (one decode step, a short head) never pays for waking a thread team.  On
            an idle machine a second thread saves a few tens of microseconds there; on a busy
            one (every core taken by another process) each wake-up and barrier of a team can
            cost a scheduler time slice, milliseconds.
``items``   the driver's work items (a thread without one has nothing to do).

The OpenMP runtime is told to spin briefly before sleeping (``SPIN_COUNT``, see
``configure_openmp_wait``): waiting threads of a team whose partner was descheduled then
give their core back instead of burning their time slice.
"""

from __future__ import annotations

import functools
import math
import os

#: estimated single-thread work below which a call runs on one thread (per extra thread)
MIN_WORK_PER_THREAD_NS = 250_000
#: single-thread rates of the estimate: fused attention FLOPs, and packing K/V (bytes read + written)
_FLOPS_PER_NS = 40.0
_PACK_BYTES_PER_NS = 20.0

#: libgomp's active-wait iterations before a waiting thread sleeps (its default is 300000)
SPIN_COUNT = 3000

_WAIT_SETTINGS: dict[str, str | None] = {}


def configure_openmp_wait() -> None:
    """Sets a short libgomp spin (``GOMP_SPINCOUNT=SPIN_COUNT``) for the runtime about to load.

    libgomp reads its environment once, when it is loaded; call this just before the compiled
    extension is imported, and :func:`restore_environment` right after, so child processes see
    the caller's environment unchanged.  Nothing is changed when the caller chose a policy
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) or when libgomp is already loaded.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        chosen = os.environ.get("GOMP_SPINCOUNT")
        _WAIT_SETTINGS["spin_count"] = chosen or f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
        return
    if _libgomp_loaded():
        _WAIT_SETTINGS["spin_count"] = "libgomp's (loaded before fastattn)"
        return
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    _WAIT_SETTINGS["set"] = "GOMP_SPINCOUNT"
    _WAIT_SETTINGS["spin_count"] = str(SPIN_COUNT)


def restore_environment() -> None:
    if _WAIT_SETTINGS.pop("set", None) == "GOMP_SPINCOUNT":
        os.environ.pop("GOMP_SPINCOUNT", None)


def openmp_wait_policy() -> str:
    """What the kernel's OpenMP threads do when they wait (for ``fastattn.info()``)."""
    return _WAIT_SETTINGS.get("spin_count") or "libgomp's default"


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _cgroup_cpu_quota() -> int | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota, rounded up."""
    candidates = (("/sys/fs/cgroup/cpu.max", None),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as f:
                fields = f.read().split()
            if period_path is not None:
                with open(period_path) as f:
                    fields = [fields[0], f.read().strip()]
        except (OSError, IndexError):
            continue
        try:
            if fields[0] == "max" or int(fields[0]) <= 0:
                return None
            return max(1, math.ceil(int(fields[0]) / int(fields[1])))
        except (ValueError, IndexError, ZeroDivisionError):
            return None
    return None


def cpu_limit() -> int:
    """CPUs this process may use now: affinity mask and cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def work_estimate_ns(flops: int, kv_elements: int, compute_itemsize: int) -> float:
    """Rough single-thread time of a call: its FLOPs plus packing every K/V element once."""
    return flops / _FLOPS_PER_NS + 2 * kv_elements * compute_itemsize / _PACK_BYTES_PER_NS


def choose_threads(asked: int, *, flops: int, kv_elements: int, compute_itemsize: int, items: int) -> int:
    """The thread count of one call (see the module docstring)."""
    useful = 1 + int(work_estimate_ns(flops, kv_elements, compute_itemsize) // MIN_WORK_PER_THREAD_NS)
    most = min(asked, useful, items)
    if most <= 1:  # one thread whatever the CPUs (a decode step: no affinity lookup)
        return 1
    return min(most, cpu_limit())
