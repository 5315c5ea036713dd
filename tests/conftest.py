"""Test setup: 8 CPU devices, strict rank promotion, warnings as errors (pyproject)."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture
def x64():
  """Runs a test in float64, for references that must be exact."""
  with jax.enable_x64(True):
    yield
