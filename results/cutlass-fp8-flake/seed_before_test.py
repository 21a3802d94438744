"""pytest plugin: seed every random generator just before each test runs.

`test_modular_kernel_combinations_singlegpu` makes its weights from the pytest
worker's random state, which depends on the tests that worker ran before. With
`-p seed_before_test` and CUTLASS_FLAKE_SEED=N, the weights of each case come
from seed N, so the same seed gives the base and the patched tree the same
inputs and their pass or fail can be compared.
"""

import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(int(os.environ["CUTLASS_FLAKE_SEED"]))
