"""The statistics' matmul alone, `Σ x xᵀ` over (64 x 1024) rows of 288 features (a 3x3 conv of
32 channels), in float32 and with the rows rounded to bfloat16 (float32 accumulation), as
`value_grad_and_stats(stats_dtype=)` does. Milliseconds, median of 10 calls, interleaved.

  python benchmarks/second_moment_dtype.py
  XLA_FLAGS=--xla_cpu_max_isa=AVX2 python benchmarks/second_moment_dtype.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

x = jax.random.normal(jax.random.key(0), (64, 1024, 288))
variants = {
    'float32': jax.jit(lambda x: jnp.einsum('eri,erj->ij', x, x)),
    'bfloat16 rows': jax.jit(lambda x: jnp.einsum('eri,erj->ij', x.astype(jnp.bfloat16),
                                                  x.astype(jnp.bfloat16),
                                                  preferred_element_type=jnp.float32)),
}
times = {name: [] for name in variants}
for fn in variants.values():
  fn(x).block_until_ready()
for _ in range(10):
  for name, fn in variants.items():
    start = time.perf_counter()
    fn(x).block_until_ready()
    times[name].append(1e3 * (time.perf_counter() - start))
for name, ts in times.items():
  print(f'{name}: {statistics.median(ts):.1f} ms')
