"""value_grad_and_stats: gradients, MC Fisher, deep linear exactness, weight sharing, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from utils import assert_close, im2col, kron, relative_error


class MLP(nn.Module):
  features: tuple = (3, 4)
  activation: bool = True

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if self.activation and i < len(self.features) - 1:
        x = jnp.tanh(x)
    return x


def _f64(params):
  return jax.tree.map(lambda p: p.astype(jnp.float64), params)


def _mc_average_stats(grad_fn, params, *args, samples):
  """Statistics averaged over `samples` independent MC draws."""
  keys = jax.random.split(jax.random.key(0), samples)
  stats = jax.jit(jax.vmap(lambda k: grad_fn(params, *args, rng=k)[2]))(keys)
  return jax.tree.map(lambda s: s.mean(0), stats)


def test_gradients_equal_jax_grad():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (5, 2))
  y = jnp.arange(5) % 4
  params = model.init(jax.random.key(1), x)['params']
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  for fisher in ('empirical', 'mc'):
    loss, grads, _ = kfax.value_grad_and_stats(loss_fn, fisher=fisher)(params, rng=jax.random.key(2))
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params)
    assert_close(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_mc_fisher_approaches_the_exact_fisher(x64):
  """For one example, A ⊗ E[G_mc] is each layer's exact Fisher block Jᵀ (diag p - ppᵀ) J.
  Averaging 4000 draws, the relative Frobenius error is below 5% (about 1/√4000 ≈ 1.6% expected)."""
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (1, 2), jnp.float64)
  params = _f64(model.init(jax.random.key(1), x)['params'])
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), jnp.zeros(1, int))
  stats = _mc_average_stats(kfax.value_grad_and_stats(loss_fn, fisher='mc'), params, samples=4000)
  logits = lambda p: model.apply({'params': p}, x)[0]
  probs = np.asarray(jax.nn.softmax(logits(params)))
  output_fisher = np.diag(probs) - np.outer(probs, probs)
  jac = jax.jacobian(logits)(params)
  for key in ('Dense_0', 'Dense_1'):
    j = np.concatenate([np.asarray(jac[key]['kernel']).reshape(4, -1, jac[key]['kernel'].shape[-1]),
                        np.asarray(jac[key]['bias'])[:, None, :]], axis=1).reshape(4, -1)
    exact = j.T @ output_fisher @ j
    approx = kron(stats[key]['a_factor'], stats[key]['g_factor'])
    assert relative_error(approx, exact) < 0.05, key


def test_deep_linear_network_kfac_is_the_exact_ggn(x64):
  """Dangel et al. (2025), 'KFAC from scratch': for a deep linear network with squared error,
  A ⊗ E[G] equals the exact GGN block over a whole batch, since the output Jacobian w.r.t. each
  layer's output does not depend on the input. 2000 MC draws x 8 examples: error below 3%."""
  model = MLP(features=(4, 3, 2), activation=False)
  x = jax.random.normal(jax.random.key(0), (8, 3), jnp.float64)
  t = jax.random.normal(jax.random.key(1), (8, 2), jnp.float64)
  params = _f64(model.init(jax.random.key(2), x)['params'])
  loss_fn = lambda p: kfax.squared_error(model.apply({'params': p}, x), t)
  stats = _mc_average_stats(kfax.value_grad_and_stats(loss_fn, fisher='mc'), params, samples=2000)
  outputs = lambda p: model.apply({'params': p}, x)  # (8, 2)
  jac = jax.jacobian(outputs)(params)
  for key in ('Dense_0', 'Dense_1', 'Dense_2'):
    k, b = np.asarray(jac[key]['kernel']), np.asarray(jac[key]['bias'])  # (8, 2, in, out), (8, 2, out)
    j = np.concatenate([k, b[:, :, None, :]], axis=2).reshape(8, 2, -1)
    ggn = np.einsum('nop,noq->pq', j, j) / 8  # (1/N) Σ Jᵀ J, the Hessian of 0.5||·||² is I
    approx = kron(stats[key]['a_factor'], stats[key]['g_factor'])
    assert relative_error(approx, ggn) < 0.03, key


def test_weight_sharing_adds_a_and_averages_g(x64):
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(3)
      return nn.Dense(2)(jnp.tanh(dense(x)) + jnp.tanh(dense(2.0 * x)))

  model = Shared()
  x = jax.random.normal(jax.random.key(0), (4, 2), jnp.float64)
  y = jnp.arange(4) % 2
  params = _f64(model.init(jax.random.key(1), x)['params'])
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  _, grads, stats = kfax.value_grad_and_stats(loss_fn, fisher='empirical')(params)
  w, b = params['Dense_0']['kernel'], params['Dense_0']['bias']
  head = lambda h: nn.Dense(2).apply({'params': params['Dense_1']}, h)
  out_loss = lambda y1, y2: kfax.softmax_cross_entropy(head(jnp.tanh(y1) + jnp.tanh(y2)), y)
  inputs = [x, 2.0 * x]
  dys = jax.grad(out_loss, (0, 1))(*(z @ w + b[None] for z in inputs))
  rows = [np.concatenate([np.asarray(z), np.ones((4, 1))], axis=1) for z in inputs]
  a = sum(r.T @ r / 4 for r in rows)  # A = Σ_calls (1/M) Σ_m a aᵀ
  g = sum(4 * np.asarray(d).T @ np.asarray(d) for d in dys) / 2  # G = mean_calls N Σ_m dy dyᵀ
  # Statistics are float64 under x64 (exact references), float32 otherwise, never lower.
  assert stats['Dense_0']['a_factor'].dtype == jnp.float64
  assert_close(stats['Dense_0']['a_factor'], a, rtol=1e-10, atol=1e-14)
  assert_close(stats['Dense_0']['g_factor'], g, rtol=1e-10, atol=1e-14)
  kernel_grad = sum(r[:, :2].T @ np.asarray(d) for r, d in zip(rows, dys))
  assert_close(grads['Dense_0']['kernel'], kernel_grad, rtol=1e-10)


class ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(nn.relu(x).mean((1, 2)))


def test_mutable_batch_stats_and_has_aux():
  model = ConvBN()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  y = jnp.arange(4) % 3
  variables = model.init(jax.random.key(1), x, train=False)

  def loss_fn(params, batch_stats):
    logits, new_state = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                    mutable=['batch_stats'])
    return kfax.softmax_cross_entropy(logits, y), (logits, new_state)

  grad_fn = kfax.value_grad_and_stats(loss_fn, has_aux=True)
  (loss, (logits, new_state)), grads, stats = grad_fn(
      variables['params'], variables['batch_stats'], rng=jax.random.key(2))
  (ref_loss, (ref_logits, ref_state)), ref_grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables['params'], variables['batch_stats'])
  assert_close(loss, ref_loss, rtol=1e-6)
  assert_close(logits, ref_logits, rtol=1e-6)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-6), new_state, ref_state)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
  assert set(stats) == {'Conv_0', 'BatchNorm_0', 'Dense_0'}
  assert stats['Conv_0']['a_factor'].shape == (18, 18)  # no bias: 3*3*2 inputs only
  assert stats['BatchNorm_0']['fisher'].shape == (4, 2, 2)  # per channel, (scale, bias)
  table = grad_fn.layers(variables['params'], variables['batch_stats'])
  summary = kfax.summary(table)
  assert 'BatchNorm_0/scale' in summary and 'norm: unit-wise 2x2 per channel (4)' in summary
  assert 'Conv_0/kernel' in summary and 'conv: A 18x18 ⊗ G 4x4' in summary
  assert 'fallback' not in summary


def test_bfloat16_params_give_float32_statistics_and_state():
  model = MLP(features=(8, 3))
  x = jax.random.normal(jax.random.key(0), (6, 4), jnp.bfloat16)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init(jax.random.key(1), x)['params'])
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), jnp.arange(6) % 3)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='mc')
  loss, grads, stats = grad_fn(params, rng=jax.random.key(2))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats))
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  tx = optax.chain(kfax.kfac(grad_fn.layers(params), damping_mode='eigen'), optax.sgd(0.1))
  state = tx.init(params)
  updates, state = jax.jit(lambda g, s, st: tx.update(g, s, params, stats=st))(grads, state, stats)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  kstate = state[0]
  for key in ('Dense_0', 'Dense_1'):
    assert {n: v.dtype for n, v in kstate.factors[key].items()} == {
        'a_factor': jnp.float32, 'g_factor': jnp.float32}
    assert {n: v.dtype for n, v in kstate.decompositions[key].items()} == {
        n: jnp.float32 for n in ('a_eigvals', 'a_eigvecs', 'g_eigvals', 'g_eigvecs')}
  assert all(np.isfinite(np.asarray(u, np.float32)).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('reduce', [False, True], ids=['expand', 'reduce'])
def test_bfloat16_statistics_multiply_bfloat16_and_accumulate_float32(reduce):
  """`kronecker_terms` of bfloat16 rows: its matmuls take the bfloat16 operands as they are, with
  float32 results (the accelerators' fast path; with reduce, the rows are averaged in float32
  first), and equal the statistics of the rows copied to float32 (products of bfloat16 numbers
  are exact in float32; only the order of the sums differs)."""
  from kfax import _kinds
  a = jax.random.normal(jax.random.key(0), (8, 5, 2, 7)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(1), (8, 5, 2, 3)).astype(jnp.bfloat16)
  rows = _kinds.Rows(reduce=reduce)
  terms = lambda a, g: _kinds.kronecker_terms(a, g, rows, (False, True))
  dots = [e for e in jax.make_jaxpr(terms)(a, g).eqns if e.primitive.name == 'dot_general']
  assert len(dots) == 2
  operand = jnp.float32 if reduce else jnp.bfloat16
  assert all(v.aval.dtype == operand for e in dots for v in e.invars)
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)
  got, want = terms(a, g), terms(a.astype(jnp.float32), g.astype(jnp.float32))
  for name in ('a_factor', 'g_factor'):
    assert got[name].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-5,
                               atol=1e-6)


def test_grouped_conv_has_one_kronecker_block_per_group(x64):
  """A grouped conv is `groups` independent convs: per group, A and G from that group's input
  channels (im2col) and output channels, and K-FAC inverts each block on its own."""

  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), feature_group_count=2)(x)
      return nn.Dense(2)(jnp.tanh(x).mean((1, 2)))

  model = Grouped()
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2), jnp.float64)
  y = jnp.array([0, 1])
  # Jitted throughout: one compile per function instead of one per operation.
  params = jax.jit(lambda k: _f64(model.init(k, x)['params']))(jax.random.key(1))
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical')
  _, grads, stats = jax.jit(grad_fn)(params)
  conv = nn.Conv(4, (3, 3), feature_group_count=2)
  head = lambda h: nn.Dense(2).apply({'params': params['Dense_0']}, jnp.tanh(h).mean((1, 2)))
  output_gradient = jax.jit(lambda p: jax.grad(lambda h: kfax.softmax_cross_entropy(head(h), y))(
      conv.apply({'params': p}, x)))
  dy = np.asarray(output_gradient(params['Conv_0'])).reshape(-1, 4)
  patches = im2col(np.asarray(x), (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1))  # (2, 25, 9 * 2)
  n, t = patches.shape[:2]
  a, g = stats['Conv_0']['a_factor'], stats['Conv_0']['g_factor']
  assert a.shape == (2, 10, 10) and g.shape == (2, 2, 2)

  def group_matrix(tree, group):  # [kernel rows of the group's input channel; bias row]
    out = slice(2 * group, 2 * group + 2)
    kernel = np.asarray(tree['Conv_0']['kernel'])[:, :, 0, out].reshape(9, 2)
    return np.concatenate([kernel, np.asarray(tree['Conv_0']['bias'])[None, out]])

  for group in range(2):
    rows = np.concatenate([patches[..., group::2].reshape(n * t, 9), np.ones((n * t, 1))], axis=1)
    dy_g = dy[:, 2 * group:2 * group + 2]
    assert_close(a[group], rows.T @ rows / (n * t), rtol=1e-6, atol=1e-12)
    assert_close(g[group], n * dy_g.T @ dy_g, rtol=1e-6, atol=1e-12)
    assert_close(group_matrix(grads, group), rows.T @ dy_g, rtol=1e-9, atol=1e-12)
  table = grad_fn.layers(params)
  assert 'conv: 2 x A 10x10 ⊗ G 2x2' in kfax.summary(table)

  damping = 1e-3
  tx = kfax.kfac(table, damping=damping, damping_mode='eigen', norm_constraint=None)
  updates, _ = jax.jit(lambda g, p, st: tx.update(g, tx.init(p), stats=st))(grads, params, stats)
  for group in range(2):
    dense = kron(a[group], g[group]) + damping * np.eye(20)
    ref = np.linalg.solve(dense, group_matrix(grads, group).ravel()).reshape(10, 2)
    assert relative_error(group_matrix(updates, group), ref) < 1e-4, group


def test_parameters_outside_layers_get_the_fallback():
  """A parameter no captured layer uses is found wherever it sits in the params tree; it gets the
  diagonal fallback N g² (damped like a Kronecker block of that mean eigenvalue), or passes
  through with fallback='none'."""
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (3, 2))
  y = jnp.array([0, 1, 3])
  params = {'model': jax.jit(model.init)(jax.random.key(1), x)['params'],
            'scale': 1.5 * jnp.ones(())}
  loss_fn = lambda p: p['scale'] * kfax.softmax_cross_entropy(
      model.apply({'params': p['model']}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical')
  _, grads, stats = jax.jit(grad_fn)(params)
  table = grad_fn.layers(params)
  assert set(stats) == {'model/Dense_0', 'model/Dense_1', 'scale'}
  assert table.entries['scale'].curvature == 'diagonal'
  assert 'not used by any module call capture saw' in kfax.summary(table)
  diag = 3 * float(grads['scale']) ** 2  # N g², N = 3 examples
  assert_close(stats['scale']['diag'], diag, rtol=1e-6)
  damping = 1e-4
  tx = kfax.kfac(table, damping=damping, norm_constraint=None)  # factored damping
  updates, _ = jax.jit(lambda g, p, st: tx.update(g, tx.init(p), stats=st))(grads, params, stats)
  shift = 2 * np.sqrt(damping * diag) + damping
  assert_close(updates['scale'], float(grads['scale']) / (diag + shift), rtol=1e-5)
  dense = lambda tree: tree['model']['Dense_0']['kernel']
  assert relative_error(dense(updates), dense(grads)) > 0.1  # K-FAC still preconditions the MLP

  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical', fallback='none')
  _, grads, stats = jax.jit(grad_fn)(params)
  table = grad_fn.layers(params)
  assert set(stats) == {'model/Dense_0', 'model/Dense_1'}
  assert table.entries['scale'].curvature == 'none'
  tx = kfax.kfac(table)
  updates, _ = jax.jit(lambda g, p, st: tx.update(g, tx.init(p), stats=st))(grads, params, stats)
  np.testing.assert_array_equal(updates['scale'], grads['scale'])
  dense = lambda tree: tree['model']['Dense_0']['kernel']
  assert relative_error(dense(updates), dense(grads)) > 0.1  # K-FAC still preconditions the MLP


def _tiny():
  model = MLP()
  x = jnp.ones((3, 2))
  return model, model.init(jax.random.key(0), x)['params'], x


def test_errors():
  model, params, x = _tiny()
  ce = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), jnp.zeros(3, int))
  with pytest.raises(ValueError, match=r"`fisher` must be one of \('empirical', 'mc'\), got 'exact'"):
    kfax.value_grad_and_stats(ce, fisher='exact')
  with pytest.raises(ValueError, match=r"`sequence` must be one of \('expand', 'reduce'\)"):
    kfax.value_grad_and_stats(ce, sequence='sum')
  with pytest.raises(ValueError, match=r"`fallback` must be one of \('diagonal', 'none'\)"):
    kfax.value_grad_and_stats(ce, fallback='identity')
  with pytest.raises(ValueError, match=r'`subsample` must be an integer >= 1 .*got 0'):
    kfax.value_grad_and_stats(ce, subsample=0)
  with pytest.raises(ValueError, match=r'`subsample_positions` must be an integer >= 1, got 1.5'):
    kfax.value_grad_and_stats(ce, subsample_positions=1.5)
  with pytest.raises(ValueError, match=r'sequence="reduce" sums them first'):
    kfax.value_grad_and_stats(ce, subsample_positions=2, sequence='reduce')
  with pytest.raises(ValueError, match=r'`stats_dtype` must be None or "bfloat16" .*got'
                     r' \'float16\''):
    kfax.value_grad_and_stats(ce, stats_dtype='float16')
  with pytest.raises(ValueError, match=r'fisher="mc" samples targets and needs a PRNG key'):
    kfax.value_grad_and_stats(ce)(params)  # "mc" is the default
  plain = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({'params': p}, x), jnp.zeros(3, int)).mean()
  with pytest.raises(ValueError, match=r'fisher="mc" needs the loss to be built from'
                     r' kfax.softmax_cross_entropy'):
    kfax.value_grad_and_stats(plain, fisher='mc')(params, rng=jax.random.key(0))
  with pytest.raises(ValueError, match='must return a scalar mean loss, got shape'):
    kfax.value_grad_and_stats(lambda p: model.apply({'params': p}, x), fisher='empirical')(params)
  with pytest.raises(ValueError, match=r'returned a tuple; if it is \(loss, aux\), pass has_aux'):
    kfax.value_grad_and_stats(lambda p: (ce(p), 0), fisher='empirical')(params)
  # A loss that calls no layer: nothing raises, every parameter gets the diagonal fallback.
  table = kfax.value_grad_and_stats(lambda p: jnp.sum(p['Dense_0']['kernel'])).layers(params)
  assert {e.curvature for e in table.entries.values()} == {'diagonal'}
  assert set(table.entries) == {'Dense_0/kernel', 'Dense_0/bias', 'Dense_1/kernel', 'Dense_1/bias'}


class Mixed(nn.Module):
  """Every statistics path that `subsample` touches: conv patches, Embed lookup and attend,
  attention (DenseGeneral), LayerNorm and Dense on sequences."""

  @nn.compact
  def __call__(self, image, tokens):
    c = nn.Conv(3, (3, 3), strides=2)(image)  # (B, 3, 3, 3)
    embed = nn.Embed(7, 6)
    h = embed(tokens) + nn.Dense(6)(c.reshape(c.shape[0], 1, -1))
    n = nn.LayerNorm()(h)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, out_features=6)(n, n)
    return embed.attend(jnp.tanh(nn.Dense(6)(h)))


@pytest.mark.parametrize('sequence', ['expand', 'reduce'])
def test_subsample_equals_the_statistics_of_the_kept_examples(x64, sequence):
  """`subsample=3`: the statistics of a batch of 12 are those of its examples 0, 3, 6, 9 alone
  (the empirical Fisher's G is per example, scaled to the batch), for every kind, in both
  sequence modes; the gradients still come from all 12."""
  model = Mixed()
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  image = jax.random.normal(k1, (12, 6, 6, 2), jnp.float64)
  tokens = jax.random.randint(k2, (12, 5), 0, 7)
  targets = jax.random.randint(k3, (12, 5), 0, 7)
  params = _f64(model.init(jax.random.key(1), image, tokens)['params'])

  def loss(p, image, tokens, targets):
    return kfax.softmax_cross_entropy(model.apply({'params': p}, image, tokens), targets)

  fn = lambda k: kfax.value_grad_and_stats(loss, fisher='empirical', sequence=sequence,
                                           subsample=k)
  table = fn(3).layers(params, image, tokens, targets)
  assert {e.kind for e in table.entries.values()} >= {'conv', 'embed', 'dense', 'norm'}
  _, grads, stats = fn(3)(params, image, tokens, targets)
  kept = lambda a: a[::3]
  _, _, want = fn(1)(params, kept(image), kept(tokens), kept(targets))
  assert set(stats) == set(want) == {k for k, e in table.entries.items()
                                     if e.curvature != 'none'}
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-10, atol=1e-14), stats, want)
  _, full_grads, full = fn(1)(params, image, tokens, targets)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-12, atol=1e-15), grads, full_grads)
  assert relative_error(stats['Conv_0']['a_factor'], full['Conv_0']['a_factor']) > 1e-3


@pytest.mark.parametrize('k, stats_dtype', [(2, None), (3, None), (1, 'bfloat16')])
def test_subsample_positions_and_stats_dtype_are_the_statistics_of_the_kept_rounded_rows(
    x64, k, stats_dtype):
  """`subsample_positions=k`: a conv's A and G from the output positions whose coordinates sum
  to a multiple of k (explicit im2col), a Dense over tokens' from every k-th token; G scaled by
  all positions over the kept ones. `stats_dtype="bfloat16"`: from the rows rounded to bfloat16,
  their products accumulated in float32 (not bfloat16, which would miss by about 1e-3)."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Conv(3, (3, 3))(x)).reshape(x.shape[0], -1, 3)  # 30 tokens
      return nn.Dense(2)(h).mean(1)

  model = Net()
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 2), jnp.float64)
  y = jnp.array([0, 1])
  params = jax.jit(lambda key: _f64(model.init(key, x)['params']))(jax.random.key(1))
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical', subsample_positions=k,
                                      stats_dtype=stats_dtype)
  _, _, stats = jax.jit(grad_fn)(params)
  conv = nn.Conv(3, (3, 3)).apply({'params': params['Conv_0']}, x)
  h = jnp.tanh(conv).reshape(2, 30, 3)
  head = lambda z: kfax.softmax_cross_entropy(z.mean(1), y)  # z: the Dense outputs
  dense = lambda h: nn.Dense(2).apply({'params': params['Dense_0']}, h)
  dz = np.asarray(jax.grad(head)(dense(h)))
  dconv = np.asarray(jax.grad(lambda c: head(dense(jnp.tanh(c).reshape(2, 30, 3))))(conv))
  rounded = lambda r: r if stats_dtype is None else np.asarray(
      jnp.asarray(r).astype(jnp.bfloat16)).astype(np.float64)
  with_ones = lambda r: np.concatenate([rounded(r), np.ones((len(r), 1))], axis=1)
  tol = dict(rtol=1e-10, atol=1e-14) if stats_dtype is None else dict(rtol=2e-6, atol=1e-9)

  def check(name, rows, dy, kept):
    dy = rounded(dy)
    assert_close(stats[name]['a_factor'], rows.T @ rows / len(rows), **tol)
    assert_close(stats[name]['g_factor'], 2 * dy.T @ dy * 30 / kept, **tol)

  keep = np.flatnonzero(np.indices((5, 6)).sum(0).reshape(-1) % k == 0)
  patches = im2col(np.asarray(x), (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1))
  check('Conv_0', with_ones(patches[:, keep].reshape(-1, 18)),
        dconv.reshape(2, 30, 3)[:, keep].reshape(-1, 3), keep.size)
  check('Dense_0', with_ones(np.asarray(h)[:, ::k].reshape(-1, 3)),
        dz[:, ::k].reshape(-1, 2), len(range(0, 30, k)))
