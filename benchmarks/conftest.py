"""Collect the ``bench_*.py`` suites of this folder (pyproject's python_files only names test files)."""

import pytest


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; do not collect them twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
