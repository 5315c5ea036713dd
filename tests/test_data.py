"""The image-list loader (`examples/_data.py`) through its real input code: JPEG lists written
here with Pillow, decoded by grain's worker threads (and once by worker processes)."""

import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'examples'))
import _data

SIZE = 16  # the crop
N = 12  # images in the list
MEAN = np.asarray(_data.CHANNEL_MEAN, np.float32)


def colour(i: int) -> tuple[int, int, int]:
  """Image i's uniform colour, far enough from the others' to survive JPEG."""
  return (20 * i + 10, 200 - 15 * i, 128)


def identify(x: np.ndarray, mean: np.ndarray = MEAN) -> np.ndarray:
  """The image index of each of a batch of loaded uniform images, from its red channel."""
  red = (x * 255 + mean)[..., 0].mean(axis=(1, 2))
  return np.rint((red - 10) / 20).astype(int)


@pytest.fixture
def image_list(tmp_path: pathlib.Path) -> tuple[str, str]:
  """N uniform-colour JPEGs of varied sizes (two smaller than the crop) under root/ in two
  folders, listed as "relative/path label" lines with label i % 5 and a blank line."""
  root = tmp_path / 'root'
  lines = []
  for i in range(N):
    folder = root / f'class{i % 2}'
    folder.mkdir(parents=True, exist_ok=True)
    width, height = (20 + 3 * i, 18 + 2 * i) if i > 1 else (12 + i, 24)
    Image.new('RGB', (width, height), colour(i)).save(folder / f'img {i}.jpg', quality=95)
    lines.append(f'class{i % 2}/img {i}.jpg {i % 5}\n' + ('\n' if i == 5 else ''))
  (tmp_path / 'list.txt').write_text(''.join(lines))
  return str(tmp_path / 'list.txt'), str(root)


def load(items, local_batch, batches, *, train=True, **kwargs):
  kwargs = {'seed': 0, 'workers': 2, 'process_index': 0, 'process_count': 1} | kwargs
  loader = _data.imagelist_batches(items, SIZE, local_batch, train=train, **kwargs)
  out = [next(loader) for _ in range(batches)] if train else list(loader)
  return [np.concatenate(part) for part in zip(*out)]  # x, y, w over all batches


def global_stream(items, processes, local_batch, batches, **kwargs):
  """The global batches of `processes` simulated processes, their slices side by side."""
  parts = [load(items, local_batch, batches, process_index=p, process_count=processes, **kwargs)
           for p in range(processes)]

  def merged(i: int) -> np.ndarray:  # batch b of process p is rows b L .. b L + L - 1
    rows = [part[i].reshape(batches, local_batch, *part[i].shape[1:]) for part in parts]
    return np.stack(rows, 1).reshape(-1, *parts[0][i].shape[1:])

  return merged(0), merged(1), merged(2)


def test_read_image_list(image_list):
  path, root = image_list
  items = _data.read_image_list(path, root, num_classes=5)
  assert len(items) == N  # the blank line skipped; paths with spaces kept
  assert items[3] == (str(pathlib.Path(root).resolve() / 'class1' / 'img 3.jpg'), 3)


def test_shapes_dtypes_and_labels(image_list):
  items = _data.read_image_list(*image_list)
  x, y, w = load(items, 4, 3)  # one epoch
  assert x.shape == (12, SIZE, SIZE, 3) and x.dtype == np.float32
  assert y.dtype == np.int32 and w.dtype == np.float32 and (w == 1).all()
  ids = identify(x)
  np.testing.assert_array_equal(y, ids % 5)  # each label is its image's
  want = np.asarray([colour(i) for i in ids], np.float32)[:, None, None]
  np.testing.assert_allclose(x * 255 + MEAN, np.broadcast_to(want, x.shape), atol=3)


def test_every_image_once_per_epoch_across_processes(image_list):
  items = _data.read_image_list(*image_list)
  x, y, _ = global_stream(items, processes=2, local_batch=2, batches=6)  # 2 epochs of 12
  ids = identify(x)
  np.testing.assert_array_equal(y, ids % 5)
  for epoch in ids.reshape(2, N):
    assert sorted(epoch) == list(range(N))
  assert list(ids[:N]) != list(ids[N:])  # reshuffled each epoch
  assert list(ids[:N]) != list(range(N))
  # The same global batches, crops and flips included, whatever the number of processes.
  x1, y1, _ = global_stream(items, processes=1, local_batch=4, batches=6)
  np.testing.assert_array_equal(x1, x)
  np.testing.assert_array_equal(y1, y)


def test_determinism_for_a_seed(image_list):
  items = _data.read_image_list(*image_list)
  a, b, c = (load(items, 4, 6, seed=s)[0] for s in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert list(identify(a)) != list(identify(c))


def test_eval_padding_weights(image_list):
  items = _data.read_image_list(*image_list)[:10]
  x, y, w = global_stream(items, processes=2, local_batch=2, batches=3, train=False)
  assert x.shape == (12, SIZE, SIZE, 3)  # ceil(10 / 4) = 3 global batches
  np.testing.assert_array_equal(w, [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(identify(x[:10]), range(10))  # in list order
  np.testing.assert_array_equal(y, [i % 5 for i in range(10)] + [0, 0])
  assert (x[10:] == 0).all()
  # Process 1 runs as many batches as process 0, though its last is all padding.
  assert len(load(items, 2, None, train=False, process_index=1, process_count=2)[0]) == 6


def test_mean_image(image_list, tmp_path):
  items = _data.read_image_list(*image_list)
  mean = np.random.default_rng(0).uniform(0, 255, (3, 20, 24)).astype(np.float32)  # CHW
  np.save(tmp_path / 'mean.npy', mean)
  hwc = _data.load_mean(str(tmp_path / 'mean.npy'))
  np.testing.assert_array_equal(hwc, mean.transpose(1, 2, 0))
  x, _, _ = load(items, 4, 3, mean=hwc)
  ids = identify(x, hwc[:SIZE, :SIZE])  # the top-left corner subtracted
  want = np.asarray([colour(i) for i in ids], np.float32)[:, None, None]
  np.testing.assert_allclose(x * 255 + hwc[:SIZE, :SIZE], np.broadcast_to(want, x.shape), atol=3)


def test_crop_offsets_and_flips():
  height, width = 20, 23
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  image = np.stack([rows, cols, 0 * rows], -1).astype(np.uint8)
  rng = np.random.default_rng(0)
  crops = np.stack([_data.random_crop_flip(image, SIZE, rng) for _ in range(4000)])
  flipped = crops[:, 0, 0, 1] > crops[:, 0, 1, 1]
  tops = crops[:, 0, 0, 0]
  lefts = np.where(flipped, crops[:, 0, -1, 1], crops[:, 0, 0, 1])
  assert abs(flipped.mean() - 0.5) < 0.03  # binomial std 0.008
  # The seed's offsets: uniform over [0, H - size - 1], one short of the last position.
  np.testing.assert_array_equal(np.unique(tops), range(height - SIZE))
  np.testing.assert_array_equal(np.unique(lefts), range(width - SIZE))
  assert np.bincount(lefts).min() > 4000 / (width - SIZE) * 0.8
  np.testing.assert_array_equal(_data.center_crop(image, SIZE)[0, 0, :2], [2, 3])


def test_flips_through_the_loader(tmp_path):
  pixels = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
  pixels[:, SIZE:] = 255  # dark left half, bright right half
  Image.fromarray(pixels).save(tmp_path / 'a.jpg', quality=95)
  (tmp_path / 'list.txt').write_text('a.jpg 0\n')
  items = _data.read_image_list(str(tmp_path / 'list.txt'), str(tmp_path))
  x, _, _ = load(items, 100, 4)
  # Unflipped crops are brighter on the right, flipped ones on the left.
  flipped = x[:, :, 0].mean(axis=(1, 2)) > x[:, :, -1].mean(axis=(1, 2))
  assert abs(flipped.mean() - 0.5) < 0.1  # binomial std 0.025


def test_resize_shorter_side(image_list):
  items = _data.read_image_list(*image_list)
  assert _data.decode(items[0][0], SIZE).shape == (24 * SIZE // 12, SIZE, 3)  # 12x24 scaled up
  assert _data.decode(items[5][0], SIZE).shape == (28, 35, 3)  # large enough: as it is
  assert _data.decode(items[5][0], SIZE, resize=20).shape == (20, 25, 3)


def test_worker_processes_make_the_same_batches(image_list):
  """processes=N: grain's mp_prefetch, here with one worker process (each start imports grain
  and jax, seconds on 2 cores); its batches are the threads' ones."""
  items = _data.read_image_list(*image_list)
  threads = load(items, 4, 4)
  processes = load(items, 4, 4, processes=1, workers=2)
  for a, b in zip(threads, processes):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('text, message', [
    ('a.jpg\n', r'list.txt:2: expected "relative/path label"'),
    ('a.jpg one\n', r"list.txt:2: the label 'one' is not an integer"),
    ('a.jpg 7\n', r'list.txt:2: the label 7 is outside \[0, 5\)'),
    ('a.jpg -1\n', r'list.txt:2: the label -1 is outside'),
])
def test_bad_lines(tmp_path, text, message):
  (tmp_path / 'list.txt').write_text('b.jpg 0\n' + text)
  with pytest.raises(SystemExit, match=message):
    _data.read_image_list(str(tmp_path / 'list.txt'), str(tmp_path), num_classes=5)


def test_clear_errors(tmp_path):
  with pytest.raises(SystemExit, match="image list '.*missing.txt': no such file"):
    _data.read_image_list(str(tmp_path / 'missing.txt'), str(tmp_path))
  (tmp_path / 'list.txt').write_text('\n')
  with pytest.raises(SystemExit, match="image root '.*nowhere'"):
    _data.read_image_list(str(tmp_path / 'list.txt'), str(tmp_path / 'nowhere'))
  with pytest.raises(SystemExit, match='has no images'):
    _data.read_image_list(str(tmp_path / 'list.txt'), str(tmp_path))
  with pytest.raises(SystemExit, match='mean: shape'):
    _data.mean_image(np.zeros((8, 8, 3)), SIZE)
  np.save(tmp_path / 'bad.npy', np.zeros((2, 4)))
  with pytest.raises(SystemExit, match='bad.npy'):
    _data.load_mean(str(tmp_path / 'bad.npy'))
  with pytest.raises(SystemExit, match='resize 8 is smaller'):
    _data.imagelist_batches([('a.jpg', 0)], SIZE, 1, train=True, resize=8)
  # An image that is listed but missing fails when it is loaded, naming it.
  loader = _data.imagelist_batches([(str(tmp_path / 'gone.jpg'), 0)], SIZE, 1, train=True,
                                   process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='gone.jpg'):
    next(loader)
