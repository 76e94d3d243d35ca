"""Root conftest: only the ``--benchmark`` option (test options live in tests/conftest.py).

``pytest --benchmark`` adds the pytest-benchmark suites of benchmarks/ to a test run. Without it,
benchmark items are skipped, unless benchmarks/ (or a file in it) is named on the command line,
as in ``pytest benchmarks --benchmark-only``.
"""

from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).parent.resolve() / "benchmarks"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="also collect and run the benchmark suites in benchmarks/ (slow)")


def _in_benchmarks(path: Path) -> bool:
    return path == BENCHMARKS_DIR or BENCHMARKS_DIR in path.parents


def _named_paths(config) -> list[Path]:
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return []
    return [Path(config.invocation_params.dir, arg.split("::")[0]).resolve() for arg in config.args]


def pytest_configure(config):
    # With no paths on the command line pytest collects testpaths (tests/); add benchmarks/ to them.
    if config.getoption("--benchmark") and not any(_in_benchmarks(p) for p in _named_paths(config)):
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            config.args.append(str(BENCHMARKS_DIR))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark") or any(_in_benchmarks(p) for p in _named_paths(config)):
        return
    skip = pytest.mark.skip(reason="benchmark: run with --benchmark, or name benchmarks/ on the command line")
    for item in items:
        if _in_benchmarks(Path(item.path).resolve()):
            item.add_marker(skip)
