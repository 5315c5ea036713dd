"""A kfax data-parallel run for test_multihost.py: `python multihost_worker.py PORT PID NPROC OUT`.

Each of NPROC processes holds 4 // NPROC CPU devices; together they train a small CNN for a few
steps with kfax.kfac(axis_name='data') under shard_map over all 4 devices. Process 0 writes the
final parameters to OUT (.npz).
"""

import sys

import jax

port, pid, nproc, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
jax.config.update('jax_num_cpu_devices', 4 // nproc)
if nproc > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', num_processes=nproc, process_id=pid)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kfax  # noqa: E402


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


model = Net()
loss_fn = lambda p, x, y: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical')  # deterministic
mesh = jax.make_mesh((4,), ('data',))
params = model.init(jax.random.key(0), jnp.ones((1, 5, 5, 1)))['params']
table = grad_fn.layers(params, jnp.ones((2, 5, 5, 1)), jnp.zeros(2, jnp.int32))
tx = optax.chain(kfax.kfac(table, damping=1e-2, inverse_every=2, axis_name='data'),
                 optax.sgd(0.1))


def step(params, state, x, y):
  _, grads, stats = grad_fn(params, x, y)
  grads = jax.tree.map(lambda g: g / jax.lax.psum(1, 'data'), grads)  # summed by check_vma
  updates, state = tx.update(grads, state, params, stats=stats)
  return optax.apply_updates(params, updates), state


step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
                             out_specs=(P(), P())))
rng = np.random.default_rng(0)
state = tx.init(params)
replicated = lambda t: jax.tree.map(
    lambda v: jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.asarray(v)), t)
params, state = replicated(params), replicated(state)
local = slice(pid * 8 // nproc, (pid + 1) * 8 // nproc)
for _ in range(3):
  x, y = rng.normal(size=(8, 5, 5, 1)).astype(np.float32), rng.integers(0, 3, size=8)
  batch = NamedSharding(mesh, P('data'))
  params, state = step(params, state, jax.make_array_from_process_local_data(batch, x[local]),
                       jax.make_array_from_process_local_data(batch, y[local]))
if pid == 0:
  flat = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0))
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(out, **flat)
