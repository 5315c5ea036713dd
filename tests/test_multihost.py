"""Two processes (jax.distributed on localhost, CPU collectives, 2 devices each) train to the same
parameters as one process with 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run(nproc: int, out: str) -> None:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(pid), str(nproc), out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(nproc)]
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output


def test_two_processes_match_one_process(tmp_path):
  _run(2, str(tmp_path / 'two.npz'))
  _run(1, str(tmp_path / 'one.npz'))
  two, one = np.load(tmp_path / 'two.npz'), np.load(tmp_path / 'one.npz')
  assert sorted(two.files) == sorted(one.files) and len(one.files) == 4
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=2e-4, atol=2e-5)  # reduction order
