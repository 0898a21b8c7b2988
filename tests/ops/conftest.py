"""Per-class parametrization of the op suites (`tests/ops/linear_op_cases.py`,
`tests/ops/attention_op_cases.py`): a test class with a `case_lists()` classmethod gives each
of its tests' parameters (by argument name) from its own case lists; an empty list skips."""

import pytest


def pytest_generate_tests(metafunc):
    case_lists = getattr(metafunc.cls, "case_lists", None)
    if case_lists is None:
        return
    for name, values in case_lists().items():
        if name not in metafunc.fixturenames:
            continue
        if not values:
            skip = pytest.mark.skip(reason=f"{metafunc.cls.__name__} has no {name}s")
            values = [pytest.param(None, marks=skip)]
        metafunc.parametrize(name, values, ids=[str(v) for v in values])
