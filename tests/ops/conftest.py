"""Per-class parametrization of the op suites (`tests/ops/linear_op_cases.py`): a test class
with a `parametrize(metafunc)` classmethod gives its tests' parameters from its own case lists."""


def pytest_generate_tests(metafunc):
    parametrize = getattr(metafunc.cls, "parametrize", None)
    if parametrize is not None:
        parametrize(metafunc)
