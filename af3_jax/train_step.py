"""The train step: per-stage trainable sets, the loss, and one pure, jitted update (`train_run.py`
has a run's plumbing around it: config, workdir, final model).

Usage (docs/architecture.md#the-train-step):

  module = model.module()                                # from af3_jax.from_pretrained
  lora.add(module, lora.Spec(rank=64, alpha=16), key)    # stage 3.5 only
  graphdef, params, frozen = split(module, "lora")
  optimizer = optim.make_optimizer(lr, total_steps)
  state = init_state(params, optimizer, mesh)
  step_fn = jit_train_step(graphdef, optimizer, state, frozen, mesh, accum_steps=8)
  with jax.set_mesh(mesh):
    state, metrics = step_fn(state, frozen, batch)       # `state` is donated; never reuse the old one

Batches are dicts of `AudioFlamingo3.__call__`'s inputs, rows right padded as `data.pipeline` pads
them, plus `labels` (B, T) int, -100 where nothing is supervised. With accum_steps > 1 every array
carries a leading micro-batch axis of that length.
Packed batches (several samples a row) add `segment_ids` and `position_ids` (`data.pipeline.pack`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from af3_jax import flops, optim, sharding

IGNORE = -100  # labels that are not supervised (transformers' ignore_index)

# The Whisper position table is never trained upstream (`embed_positions.requires_grad_(False)`).
_POSITIONS = nnx.PathContains("embed_positions")

# Each stage's trainable set (docs/upstream.md#optimiser-and-stages): 1 projector, 2 encoder_projector, 3 and 4 all, 3.5
# lora. nnx.LoRAParam subclasses nnx.Param, so "all" also trains LoRA weights if the model has any,
# and "lora" must name LoRAParam itself, never Param.
TRAINABLE = {
    "lora": nnx.LoRAParam,
    "projector": nnx.All(nnx.Param, nnx.PathContains("multi_modal_projector")),
    "encoder_projector": nnx.All(nnx.Param, nnx.Not(_POSITIONS), nnx.Any(
        nnx.PathContains("audio_tower"), nnx.PathContains("multi_modal_projector"))),
    "all": nnx.All(nnx.Param, nnx.Not(_POSITIONS)),
}


def split(module: nnx.Module, trainable: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, frozen rest) for a stage's trainable set, a key of `TRAINABLE`."""
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable must be one of {sorted(TRAINABLE)}, got {trainable!r}")
  graphdef, params, frozen = nnx.split(module, TRAINABLE[trainable], ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"trainable={trainable!r} selects no parameter (LoRA needs lora.add first)")
  return graphdef, params, frozen


@struct.dataclass
class TrainState:
  """step () int32; params: the trainable nnx.State (param_dtype, float32 by default); opt_state: optax's; rng: a uint32 (2,) key.

  Nothing draws from `rng` yet: the model has no dropout or layerdrop (transformers' AF3 configs set
  every rate to 0). A stochastic layer would take `jax.random.fold_in(rng, step)`, so runs stay
  reproducible across restarts.
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


LOSS_CHUNK = 1024  # positions per row whose float32 logits exist at once in the loss


def cross_entropy(hidden: jax.Array, lm_head: Callable, labels: jax.Array,
                  chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, number of label tokens) of `lm_head(hidden)`, transformers' `ForCausalLMLoss`.

  hidden (B, T, D); labels (B, T) int. Position t predicts labels[t + 1]; -100 is skipped; logits are
  upcast to float32 as upstream. In packed rows the pipeline ignores each sample's first label, so no
  position predicts a token of the next sample. The head and the loss run over `chunk` positions at a
  time under `jax.checkpoint`, so neither pass holds the whole (B, T, V) logits (an 8k-token row of
  AF3's 151,672-word vocabulary is 5 GB in float32); backward recomputes each chunk's logits.
  """
  b, t, d = hidden.shape
  n = -(-t // chunk)
  chunk = -(-t // n)  # n equal chunks: the head runs on as little padding as possible
  targets = jnp.pad(labels[:, 1:], ((0, 0), (0, n * chunk - t + 1)), constant_values=IGNORE)
  h = jnp.pad(hidden, ((0, 0), (0, n * chunk - t), (0, 0)))
  xs = (h.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1))

  @jax.checkpoint
  def one(carry, chunk_xs):
    h, y = chunk_xs
    logits = lm_head(h).astype(jnp.float32)
    valid = y != IGNORE
    picked = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    losses = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    return (carry[0] + losses.sum(), carry[1] + valid.sum(dtype=jnp.int32)), None

  (total, count), _ = jax.lax.scan(one, (jnp.float32(0), jnp.int32(0)), xs)
  return total, count


def summed_loss_fn(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array],
                   graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, label count) of one batch; the model computes in its own compute dtype."""
  model = nnx.merge(graphdef, params, frozen)
  inputs = {k: v for k, v in batch.items() if k != "labels"}
  # Batches are right padded (`data.pipeline`): attention takes row lengths.
  return cross_entropy(model.hidden_states(**inputs, right_padded=True), model.lm_head, batch["labels"])


def loss_fn(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array],
            graphdef: nnx.GraphDef) -> jax.Array:
  """Token-level mean cross-entropy over the label tokens: `AudioFlamingo3ForConditionalGeneration(labels=)`."""
  total, count = summed_loss_fn(params, frozen, batch, graphdef)
  return total / jnp.maximum(count, 1)


def train_step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer update from `accum_steps` micro-batches (a leading axis when accum_steps > 1).

  Normalisation: the gradients and losses of all micro-batches are summed over tokens and divided once
  by the window's label count, so the update is that of the token mean over the whole window, as
  HF Trainer normalises with `num_items_in_batch` since transformers 4.46 (the version upstream used;
  docs/upstream.md#open-questions). Micro-batches with more label tokens weigh more; averaging
  per-micro-batch means would not equal one big batch. The same holds across data-parallel devices:
  the batch is one global array, so the count is global.

  `optimizer` comes from `optim.make_optimizer` (the lr metric reads its state). metrics, all scalars:
  loss (window token mean, float32), grad_norm (before clipping, as HF logs it), lr (of this update),
  label_tokens (label count, int32), and the window's `flops.batch_counts` (real tokens, token slots,
  attention pairs, audio windows: what MFU and packing efficiency need). A non-finite loss or grad_norm shows in the metrics, and the
  update is applied anyway: the caller checks `jnp.isfinite(metrics["loss"])` and stops or restores.
  """
  micro = batch if accum_steps > 1 else jax.tree.map(lambda x: x[None], batch)
  leading = {x.shape[0] for x in jax.tree.leaves(micro)}
  if leading != {accum_steps}:
    raise ValueError(f"batch arrays need a leading micro-batch axis of {accum_steps}, got {sorted(leading)}")
  grad_fn = jax.value_and_grad(summed_loss_fn, has_aux=True)

  def accumulate(carry, mb):
    grads, total, count = carry
    (loss_sum, n), g = grad_fn(state.params, frozen, mb, graphdef)
    return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, total, count), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.int32(0)), micro)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=total / denom, grad_norm=optax.tree.norm(grads), label_tokens=count,
                 lr=optim.learning_rate(opt_state), **flops.batch_counts(micro))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, mesh: Mesh,
               seed: int = 0, dtype=jnp.float32) -> TrainState:
  """A step-0 TrainState, born sharded: params cast to `dtype` (float32: the optimizer's updates stay
  exact), optimizer state, rng from `seed`.

  `params` (e.g. bfloat16 from the checkpoint) is read, not donated: the model still references it.
  """

  def init(p):
    p = jax.tree.map(lambda x: x.astype(dtype), p)
    return TrainState(step=jnp.int32(0), params=p, opt_state=optimizer.init(p), rng=jax.random.PRNGKey(seed))

  return jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init, params), mesh))(params)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """NamedShardings of a (possibly abstract) TrainState: params and moments by their logical axes."""
  replicated = NamedSharding(mesh, P())
  return TrainState(step=replicated, params=sharding.state_shardings(state.params, mesh),
                    opt_state=sharding.state_shardings(state.opt_state, mesh), rng=replicated)


def jit_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, state: TrainState,
                   frozen: nnx.State, mesh: Mesh, accum_steps: int = 1) -> Callable:
  """`train_step` jitted once: state and frozen weights on their logical shardings, state donated.

  `state` and `frozen` may be abstract; only their shapes and axes are read. Batches keep the
  shardings they arrive with (`sharding.batch_shardings`). Call and `.lower()` it under `jax.set_mesh(mesh)`.
  """
  state_sharding = state_shardings(state, mesh)
  step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, accum_steps=accum_steps)
  return jax.jit(step, in_shardings=(state_sharding, sharding.state_shardings(frozen, mesh), None),
                 out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=(0,))
