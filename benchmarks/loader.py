"""Images/s of the image-list training loader (`examples/_data.py`) on this machine's CPUs.

Writes a few hundred JPEGs of ImageNet-like size (500x375, quality 90, about 100 KB: a smooth
random field plus noise) and an image list for them, then times one process's training batches
(decode, random 224 crop, flip, mean subtraction, float32 NHWC) for 1, 2, 4, 8, ... grain worker
threads, for grain worker processes (`mp_prefetch`, one thread each), and with every image
resized to 256 first (not the seed's preprocessing). The consumer does nothing but take batches,
so a rate is the loader's ceiling on these cores. Each setting is timed in `--rounds` passes
and the best kept, as the machine may be shared. Prints a table and writes
`benchmarks/results/loader.md`.

    python benchmarks/loader.py                      # about 1.5 min on 2 cores
    python benchmarks/loader.py --workers 4 8 16 32 --processes 4 8 16 --files 512
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse
import datetime
import gc
import platform
import sys
import tempfile
import time

import grain
import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'examples'))
import _data

# The H200 rate is an assumption, not a measurement: ResNet-50 training in bfloat16 on one
# H200 with a tuned JAX step, about 3,000 images/s (K-FAC steps are slower, so it needs less).
H200_IMAGES_PER_S = 3000


def write_images(folder: str, files: int, height: int, width: int, seed: int = 0) -> str:
  """`files` JPEGs in `folder` and `folder/list.txt` naming them, labels cycling over 1000."""
  rng = np.random.default_rng(seed)
  lines = []
  for i in range(files):
    name = f'img{i:05d}.jpg'
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
      smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
      pixels = smooth + rng.normal(0, 20, smooth.shape)
      Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    lines.append(f'{name} {i % 1000}\n')
  with open(os.path.join(folder, 'list.txt'), 'w') as f:
    f.writelines(lines)
  return os.path.join(folder, 'list.txt')


def per_image_ms(items: list, size: int, n: int = 100) -> dict[str, float]:
  """Single-thread milliseconds per image of each step."""
  rng, mean = np.random.default_rng(0), _data.mean_image(_data.CHANNEL_MEAN, size)
  times = {'decode': 0.0, 'crop + flip': 0.0, 'normalize': 0.0}
  for i in range(n):
    t0 = time.perf_counter()
    image = _data.decode(items[i % len(items)][0], size)
    t1 = time.perf_counter()
    crop = _data.random_crop_flip(image, size, rng)
    t2 = time.perf_counter()
    _data.normalize(crop, mean)
    t3 = time.perf_counter()
    times['decode'] += t1 - t0
    times['crop + flip'] += t2 - t1
    times['normalize'] += t3 - t2
  return {k: 1e3 * v / n for k, v in times.items()}


def loader(items: list, args: argparse.Namespace, threads: int, processes: int,
           resize: int | None):
  return _data.imagelist_batches(items, args.image_size, args.batch, train=True, workers=threads,
                                 processes=processes, resize=resize, process_index=0,
                                 process_count=1)


def images_per_s(loader, args: argparse.Namespace) -> tuple[float, float]:
  """Images/s over `args.batches` batches after `args.warmup`, and the slowest wait in ms."""
  for _ in range(args.warmup):
    next(loader)
  waits = []
  start = time.perf_counter()
  for _ in range(args.batches):
    t = time.perf_counter()
    next(loader)
    waits.append(time.perf_counter() - t)
  return args.batches * args.batch / (time.perf_counter() - start), 1e3 * max(waits)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  cores = len(os.sched_getaffinity(0))
  counts = [1 << i for i in range(8) if 1 << i <= max(8, 2 * cores)]
  p.add_argument('--workers', type=int, nargs='+', default=counts)
  p.add_argument('--processes', type=int, nargs='*', default=[c for c in counts if c <= cores],
                 help='worker process counts to compare (none: skip)')
  p.add_argument('--resize_workers', type=int, nargs='*', default=[cores],
                 help='thread counts to time with every image resized to 256 (shorter side)')
  p.add_argument('--rounds', type=int, default=2, help='passes over the settings; best kept')
  p.add_argument('--files', type=int, default=256)
  p.add_argument('--height', type=int, default=375)
  p.add_argument('--width', type=int, default=500)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--batch', type=int, default=64, help="this process's batch")
  p.add_argument('--batches', type=int, default=12, help='timed batches per setting')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dir', help='image folder (default: a temporary one)')
  p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'results', 'loader.md'))
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    folder = args.dir or tmp
    os.makedirs(folder, exist_ok=True)
    items = _data.read_image_list(write_images(folder, args.files, args.height, args.width),
                                  folder)
    kb = np.mean([os.path.getsize(path) for path, _ in items]) / 1e3
    load_before = os.getloadavg()
    steps: dict[str, float] = {}
    settings = ([('threads', w, 0, None) for w in args.workers]
                + [('processes', w, w, None) for w in args.processes]
                + [('threads', w, 0, 256) for w in args.resize_workers])
    best: dict[tuple, tuple[float, float]] = {}
    for round_ in range(args.rounds):  # the best of rounds: the machine may be shared
      for step, ms in per_image_ms(items, args.image_size).items():
        steps[step] = min(steps.get(step, ms), ms)
      for kind, w, processes, resize in settings:
        threads = 1 if processes else w
        batches = loader(items, args, threads, processes, resize)
        rate, wait = images_per_s(batches, args)
        del batches  # stops its threads or processes before the next setting
        gc.collect()
        key = (kind, w, resize)
        best[key] = max(best.get(key, (0.0, 0.0)), (rate, wait))
        print(f'round {round_}: {kind:9s} {w:3d} resize {resize}: {rate:6.0f} images/s',
              flush=True)
    load_after = os.getloadavg()

  top = max(best.items(), key=lambda kv: kv[1][0])
  per_core = top[1][0] / min(top[0][1], cores)
  serial = 1e3 / sum(steps.values())  # images/s of one core from the single-thread cost
  machine = (
      f'{datetime.datetime.now().isoformat(timespec="minutes")}: {platform.machine()}, {cores}'
      f' cores available to this process (os.cpu_count() = {os.cpu_count()}); load average'
      f' (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after: the machine is shared,'
      f' so rates are the best of {args.rounds} rounds and still a lower bound. Python'
      f' {platform.python_version()}, grain {grain.__version__}, Pillow {PIL.__version__},'
      f' numpy {np.__version__}.')
  setup = (
      f'{args.files} generated JPEGs, {args.width}x{args.height}, {kb:.0f} KB on average, in'
      f' training batches of {args.batch} at {args.image_size}x{args.image_size}: the seed\'s'
      ' preprocessing (no resize at this size, random crop, flip, mean subtraction, float32) or'
      f' with every image resized to 256 first; {args.batches} timed batches after'
      f' {args.warmup}, the consumer only taking batches. threads: `workers` grain threads in'
      ' this process; processes: that many grain worker processes of one thread each.')
  single = ('Single-thread ms per image (seed preprocessing, the best of rounds): '
            + ', '.join(f'{k} {v:.2f}' for k, v in steps.items())
            + f', total {sum(steps.values()):.2f} ({serial:.0f} images/s per core).')
  need = (
      f'Best: {top[1][0]:.0f} images/s ({top[0][0]}, {top[0][1]} workers), {per_core:.0f} per'
      f' core. **One H200 training ResNet-50 would need about {H200_IMAGES_PER_S} images/s: an'
      ' assumption (bfloat16, a tuned step), not measured.** That is about'
      f' {H200_IMAGES_PER_S / serial:.0f} cores of input work at the single-thread cost above'
      f' ({H200_IMAGES_PER_S / per_core:.0f} at the best measured rate per core here).')
  table = ['| kind | workers | resize | images/s | slowest batch wait (ms) |',
           '|---|---:|---|---:|---:|',
           *[f'| {kind} | {w} | {resize or "seed"} | {rate:.0f} | {wait:.0f} |'
             for (kind, w, resize), (rate, wait) in best.items()]]
  lines = ['# Image-list loader throughput (`benchmarks/loader.py`)', '', machine, '', setup, '',
           single, '', *table, '', need, '']
  text = '\n'.join(lines)
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
