"""chainerkfac's ImageNet input as image lists: "relative/path label" lines under a root folder
(its `--train_list --train_root --val_list --val_root`), read with grain and decoded with Pillow.

Each process loads its own slice of every global batch, as `_common.synthetic_batches` does: the
global stream is one shuffled order of the list per epoch (`grain.MapDataset.shuffle`, reseeded
each epoch by `repeat`, the same in every process for a seed), global batch `b` is positions
`b G .. b G + G - 1` of it, and process `p` of `P` takes its `L = G / P` positions
`b G + p L ..` (`global_position`). Batches run on across epoch boundaries, as the seed's Chainer
iterator did. An example's crop and flip are drawn from `(seed, position)`, so a global batch is
the same whatever the number of processes.

The seed's preprocessing (its `examples/imagenet/datasets.py`):

* decode to RGB; an image whose shorter side is below the crop is resized up to it, keeping its
  aspect ratio (`resize=None`); `resize=S` resizes every image's shorter side to S instead (the
  common "resize 256, crop 224" pipeline, not the seed's);
* training: a random `image_size` square crop at a uniform offset in `[0, H - size - 1]` (the
  seed's range, one short of the last position) and a horizontal
  flip with probability 1/2; evaluation: the centre crop;
* subtract a per-pixel mean image's top-left corner (the seed's `mean.npy`, `load_mean`) or a
  per-channel mean, in [0, 255] pixel units, then scale by 1/255 (no division by a std): 0 is
  the mean, which random erasing fills in. Mixup and random erasing run on the device
  (`recipe.py`).

Output per process: `(x float32 (L, size, size, 3) NHWC, y int32 (L,), w float32 (L,))`; `w` is
1, except for the padding (zero images, label 0) that completes the last evaluation batch, so
that every process runs as many evaluation batches.

Parallelism: grain's thread pool (`ReadOptions(num_threads=workers)`) decodes and augments
single examples ahead of the consumer (Pillow's decoder and resampler release the GIL); one more
thread stacks them into batches and keeps `prefetch` batches ready, so the training thread only
takes finished batches. `processes=N` uses N grain worker processes instead (`mp_prefetch`), for
hosts that need more images/s than one process's GIL allows; the batches are the same.
`benchmarks/loader.py` measures the rates.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # images, labels, weights (as `_common`)
Item = tuple[str, int]  # an image's path and label

# ImageNet's RGB channel means in [0, 255] pixels; the seed's mean.npy averages to about these.
CHANNEL_MEAN = (123.68, 116.78, 103.94)

# ------------------------------------------------------------------------------ image lists


def read_image_list(path: str, root: str, num_classes: int | None = None) -> list[Item]:
  """The `(root/relative path, label)` pairs of a list of "relative/path label" lines (blank
  lines are skipped; a path may contain spaces). Raises SystemExit, naming the file and line,
  for a missing list or root, a line without a label, a label that is not an integer or is
  outside [0, num_classes), and an empty list. The images themselves are opened when loaded."""
  if not os.path.isfile(path):
    raise SystemExit(f'image list {path!r}: no such file.')
  if not os.path.isdir(root):
    raise SystemExit(f'image root {root!r} (for {path!r}): no such directory.')
  root = os.path.abspath(root)
  items = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      fields = line.rsplit(None, 1)
      if not fields:
        continue
      if len(fields) != 2:
        raise SystemExit(f'{path}:{number}: expected "relative/path label", got {line.strip()!r}.')
      name, label = fields
      try:
        label = int(label)
      except ValueError:
        raise SystemExit(f'{path}:{number}: the label {label!r} is not an integer.') from None
      if label < 0 or (num_classes is not None and label >= num_classes):
        limit = '' if num_classes is None else num_classes
        raise SystemExit(f'{path}:{number}: the label {label} is outside [0, {limit}).')
      items.append((os.path.join(root, name), label))
  if not items:
    raise SystemExit(f'image list {path!r} has no images.')
  return items


def load_mean(path: str) -> np.ndarray:
  """A mean image from a .npy file: the seed's (3, H, W) CHW, (H, W, 3) HWC, or a (3,) channel
  mean, in [0, 255] pixel units; returned HWC (or (3,)) float32."""
  try:
    mean = np.load(path)
  except (OSError, ValueError) as e:
    raise SystemExit(f'mean image {path!r}: {e}') from None
  if mean.ndim == 3 and mean.shape[0] == 3 and mean.shape[-1] != 3:
    mean = mean.transpose(1, 2, 0)
  if mean.shape != (3,) and (mean.ndim != 3 or mean.shape[-1] != 3):
    raise SystemExit(f'mean image {path!r}: shape {mean.shape}, expected (3, H, W), (H, W, 3)'
                     ' or (3,).')
  return mean.astype(np.float32)


# ------------------------------------------------------------------------- one image's steps


def decode(path: str, min_side: int, resize: int | None = None) -> np.ndarray:
  """The image at `path` as RGB uint8 (H, W, 3): resized (bilinear, aspect ratio kept) so that
  its shorter side is `resize`, or, with `resize=None` (the seed's), only if that side is below
  `min_side`. A JPEG to be shrunk is decoded at the smallest of 1/2, 1/4, 1/8 scale that is
  still large enough (Pillow's `draft`), which is much faster for large images."""
  with Image.open(path) as image:
    width, height = image.size
    target = resize or max(min(width, height), min_side)
    scale = target / min(width, height)
    size = (max(round(width * scale), target), max(round(height * scale), target))
    if scale < 1:
      image.draft('RGB', size)
    image = image.convert('RGB')
  if image.size != size:
    image = image.resize(size, Image.Resampling.BILINEAR)
  return np.asarray(image)


def random_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A size x size crop at the seed's uniform offsets in [0, max(H - size - 1, 0)], flipped left
  to right with probability 1/2."""
  height, width = image.shape[:2]
  top = rng.integers(max(height - size - 1, 0) + 1)
  left = rng.integers(max(width - size - 1, 0) + 1)
  crop = image[top:top + size, left:left + size]
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The seed's evaluation crop: offsets (H - size) // 2 and (W - size) // 2."""
  height, width = image.shape[:2]
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def mean_image(mean: Sequence[float] | np.ndarray, size: int) -> np.ndarray:
  """A (size, size, 3) float32 mean image: a (3,) channel mean broadcast, or the top-left corner
  of an (H, W, 3) mean image (as the seed's). A whole image subtracts several times faster than a
  (3,) mean broadcast along numpy's last axis."""
  mean = np.asarray(mean, np.float32)
  if mean.shape == (3,):
    mean = np.broadcast_to(mean, (size, size, 3))
  elif mean.ndim != 3 or mean.shape[-1] != 3 or min(mean.shape[:2]) < size:
    raise SystemExit(f'mean: shape {mean.shape}, expected (3,) or (H, W, 3) with H, W >= {size}.')
  return np.ascontiguousarray(mean[:size, :size])


def normalize(image: np.ndarray, mean: np.ndarray) -> np.ndarray:
  """(image - mean) / 255 in float32, for a uint8 image and a `mean_image` of its size."""
  return (image.astype(np.float32) - mean) * np.float32(1 / 255)


# ------------------------------------------------------------------------------ the datasets


def global_position(k: int, local_batch: int, process_index: int, process_count: int) -> int:
  """The position in the global stream of this process's k-th example: global batch
  `k // local_batch`, this process's slice of it."""
  batch, offset = divmod(k, local_batch)
  return (batch * process_count + process_index) * local_batch + offset


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Decoding and cropping settings, shared by training and evaluation."""

  image_size: int
  mean: np.ndarray  # `mean_image(mean, image_size)`
  resize: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainExample:
  """This process's k-th training example: the stream's `global_position(k)`-th item, randomly
  cropped and flipped with an RNG seeded by `(seed, position)`; weight 1."""

  stream: grain.MapDataset  # the shuffled, repeated items
  prep: Preprocess
  seed: int
  local_batch: int
  process_index: int
  process_count: int

  def __call__(self, k: int) -> tuple[np.ndarray, np.int32, np.float32]:
    g = global_position(k, self.local_batch, self.process_index, self.process_count)
    path, label = self.stream[g]
    p = self.prep
    rng = np.random.default_rng((self.seed, g))
    image = random_crop_flip(decode(path, p.image_size, p.resize), p.image_size, rng)
    return normalize(image, p.mean), np.int32(label), np.float32(1)


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """This process's k-th evaluation example: item `global_position(k)` in list order, centre
  cropped; past the end of the list a zero image with label 0 and weight 0."""

  items: Sequence[Item]
  prep: Preprocess
  local_batch: int
  process_index: int
  process_count: int

  def __call__(self, k: int) -> tuple[np.ndarray, np.int32, np.float32]:
    g = global_position(k, self.local_batch, self.process_index, self.process_count)
    p = self.prep
    if g >= len(self.items):
      return np.zeros((p.image_size, p.image_size, 3), np.float32), np.int32(0), np.float32(0)
    path, label = self.items[g]
    image = center_crop(decode(path, p.image_size, p.resize), p.image_size)
    return normalize(image, p.mean), np.int32(label), np.float32(1)


def examples(items: Sequence[Item], prep: Preprocess, local_batch: int, *, train: bool,
             seed: int = 0, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This process's examples, lazily: endless for training; for evaluation, enough for
  ceil(len(items) / global batch) batches."""
  shard = {'local_batch': local_batch, 'process_index': process_index,
           'process_count': process_count}
  if train:
    stream = grain.MapDataset.source(items).shuffle(seed=seed).repeat()
    return grain.MapDataset.range(2**62).map(TrainExample(stream, prep, seed, **shard))
  batches = -(-len(items) // (local_batch * process_count))
  return grain.MapDataset.range(batches * local_batch).map(EvalExample(items, prep, **shard))


def prefetched_batches(dataset: grain.MapDataset, local_batch: int, workers: int,
                       prefetch: int, processes: int = 0) -> grain.IterDataset:
  """Batches of `dataset`'s examples, in order, made ahead of the consumer.

  processes=0: `workers` threads make examples, one more stacks `prefetch` batches ahead
  (workers=0, prefetch=0: all on the caller's thread). processes=N: N grain worker processes
  take turns, each making whole batches with `workers` threads and keeping `prefetch` ready
  (no GIL shared with the training thread; batches come back through shared memory)."""
  if processes:
    from absl import flags  # grain's worker processes read its absl flags; no absl app here
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    read = grain.ReadOptions(num_threads=max(workers, 1), prefetch_buffer_size=max(workers, 1))
    pool = grain.MultiprocessingOptions(num_workers=processes,
                                        per_worker_buffer_size=max(prefetch, 1))
    batches = dataset.batch(local_batch, drop_remainder=True)
    return batches.to_iter_dataset(read).mp_prefetch(pool)
  ahead = max(2 * workers, local_batch * max(prefetch, 1)) if workers else 0  # examples
  read = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=ahead)
  batched = dataset.to_iter_dataset(read).batch(local_batch, drop_remainder=True)
  if not prefetch:
    return batched
  return grain.experimental.ThreadPrefetchIterDataset(batched, prefetch_buffer_size=prefetch)


def imagelist_batches(items: Sequence[Item], image_size: int, local_batch: int, *, train: bool,
                      seed: int = 0, mean: Sequence[float] | np.ndarray = CHANNEL_MEAN,
                      resize: int | None = None, workers: int = 8, prefetch: int = 2,
                      processes: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[Batch]:
  """This process's slices of the global batches of `items` (`read_image_list`), as
  `(x, y, w)` numpy arrays: endless shuffled epochs for training, one pass for evaluation.
  The process defaults to `jax.process_index()` of `jax.process_count()`."""
  if resize is not None and resize < image_size:
    raise SystemExit(f'resize {resize} is smaller than the {image_size} crop.')
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  prep = Preprocess(image_size, mean_image(mean, image_size), resize)
  data = examples(items, prep, local_batch, train=train,
                  seed=seed, process_index=process_index, process_count=process_count)
  return iter(prefetched_batches(data, local_batch, workers, prefetch, processes))
