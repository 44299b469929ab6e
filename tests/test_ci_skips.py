"""Under CI=true a skipped test fails the run (tests/conftest.py); elsewhere a skip is only reported."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_needs_something_missing():
    pytest.skip("a package is missing")

@pytest.mark.xfail(reason="known bug")
def test_known_bug():
    assert False

def test_fine():
    pass
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_inner=SUITE)
    return pytester


@pytest.mark.parametrize("ci, failed", [("true", True), ("", False), ("false", False)])
def test_a_skip_fails_the_run_only_under_ci(suite, monkeypatch, ci, failed):
    monkeypatch.setenv("CI", ci)
    result = suite.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert (result.ret != 0) is failed
    assert ("test_needs_something_missing: Skipped: a package is missing" in result.stdout.str()) is failed


def test_without_skips_ci_passes(pytester, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_inner="def test_fine():\n    pass\n")
    assert pytester.runpytest_subprocess("-q").ret == 0
