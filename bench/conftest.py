"""pytest-benchmark over the workload grid of ``fastattn._bench`` (the one the CLI uses).

Run explicitly (CI's test run does not collect this folder)::

    pytest bench/ --benchmark-enable                      # the quick grid
    pytest bench/ --benchmark-enable --bench-grid full    # the --compare torch grid
    pytest bench/ --benchmark-enable --bench-threads 1 --benchmark-json out.json
"""

from __future__ import annotations

import pytest

from fastattn import _bench

GRIDS = {"quick": _bench.quick_grid, "default": _bench.default_grid, "full": _bench.full_grid}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastattn bench")
    group.addoption("--bench-grid", choices=sorted(GRIDS), default="quick",
                    help="which workload grid of fastattn._bench to time (default: quick)")
    group.addoption("--bench-threads", type=int, default=None, help="threads for every implementation")
    group.addoption("--bench-rounds", type=int, default=3, help="timed rounds per benchmark (after a warm-up)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "workload" in metafunc.fixturenames:
        workloads = GRIDS[metafunc.config.getoption("--bench-grid")]()
        metafunc.parametrize("workload", workloads, ids=[w.label.replace(" ", "-") for w in workloads])


@pytest.fixture(scope="session")
def bench_threads(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--bench-threads")


@pytest.fixture(scope="session")
def bench_rounds(request: pytest.FixtureRequest) -> int:
    return max(1, request.config.getoption("--bench-rounds"))
