"""The notebooks under examples/notebooks/ run top to bottom in a fresh Jupyter kernel of this
Python, and show what they say they show.

Needs nbclient, nbformat, ipykernel and matplotlib (the `test` extra): without them these tests
fail, with the install command, rather than skip.
"""

import importlib.util
import math
import pathlib
import re

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'examples' / 'notebooks'
MULTI_GPU = NOTEBOOKS / 'multi_gpu.ipynb'
NEEDED = ('nbclient', 'nbformat', 'ipykernel', 'matplotlib')


def _require() -> None:
  missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
  if missing:
    pytest.fail(f'the notebook tests need {", ".join(missing)}: pip install -e ".[test]"',
                pytrace=False)


def _text(nb) -> str:
  """Everything the notebook's code cells printed, in order."""
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []) if o.get('output_type') == 'stream')


def _images(nb) -> int:
  return sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code'
             for o in c.get('outputs', []))


def _execute(path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch):
  """`path` executed in a new kernel of this interpreter, from the notebook's own folder."""
  _require()
  import nbclient
  import nbformat
  from ipykernel.kernelspec import write_kernel_spec

  # A kernel spec of this very interpreter, first on Jupyter's search path: whatever `python3`
  # kernels the user has installed elsewhere, the kernel imports the kfax under test.
  write_kernel_spec(tmp_path / 'kernels' / 'kfax-test')
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name='kfax-test', timeout=600,
                                   resources={'metadata': {'path': str(path.parent)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  return nb


def _results_table(text: str) -> dict[str, dict[str, float]]:
  """The notebook's table: optimizer, steps and seconds to 97% ('-': never), mean and final
  test accuracy."""
  rows = {}
  for name, steps, _seconds, mean, final in re.findall(
      r'^(K-FAC|SGD|Adam) +(\d+|-) +([\d.]+|-) +([\d.]+) +([\d.]+)$', text, re.MULTILINE):
    rows[name] = {'steps': math.inf if steps == '-' else int(steps), 'mean': float(mean),
                  'final': float(final)}
  assert sorted(rows) == ['Adam', 'K-FAC', 'SGD'], text
  return rows


def test_multi_gpu_notebook_runs_and_kfac_wins_on_8_devices(tmp_path, monkeypatch):
  nb = _execute(MULTI_GPU, tmp_path, monkeypatch)
  text = _text(nb)
  assert re.search(r'^8 devices:', text, re.MULTILINE), text[:500]  # its first cell's fake devices
  assert 'NNX table == linen table: True' in text
  # The notebook's own assertion cell: 8 devices give the 1-device K-FAC update.
  assert 'OK: 8 devices give the 1-device K-FAC update' in text
  diff = float(re.search(r'largest 1-vs-8-device difference ([\d.e+-]+)', text).group(1))
  assert diff < 1e-5
  rows = _results_table(text)
  kfac = rows.pop('K-FAC')
  for name, other in rows.items():  # fewer steps to 97% test accuracy than SGD and Adam
    assert kfac['steps'] < other['steps'], (name, kfac, other)
  assert kfac['mean'] > rows['SGD']['mean'], (kfac, rows['SGD'])  # more accurate along the way
  assert kfac['final'] >= 0.96, kfac
  assert _images(nb) >= 2  # the digits and the training curves


def test_stored_multi_gpu_notebook_is_executed():
  """The committed notebook carries its outputs (GitHub renders them), from an error-free run."""
  _require()
  import nbformat

  nb = nbformat.read(MULTI_GPU, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not [o for c in code for o in c.outputs if o.output_type == 'error']
  assert 'OK: 8 devices give the 1-device K-FAC update' in _text(nb)
  assert _images(nb) >= 2
  assert MULTI_GPU.stat().st_size < 500_000
  assert nb.metadata.kernelspec.name == 'python3'
