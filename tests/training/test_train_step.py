"""Training parity: the train step's loss, gradients and updates equal transformers / peft / torch.optim
(the optimizer alone: test_optimizer.py).

Float32, highest matmul precision, max |ours - torch| <= 1e-4 * max |torch| per tensor.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from helpers import audio_tokens, random_features, random_text
from helpers.parity import RTOL, assert_close, flat

import af3_jax
from af3_jax import sharding
from af3_jax.checkpoints import lora, names
from af3_jax.data import processor
from af3_jax.training import optimizer, step as train_step

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RANK, ALPHA = 4, 16  # scale 4: a wrong scale cannot hide
PEFT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# k_proj biases shift every score of a query equally, so softmax makes their gradient exactly zero in
# theory; both sides return rounding noise there, which is compared on the scale of the largest gradient.
ZERO_GRAD = "self_attn.k_proj.bias"


def make_batch(tiny, seed=0, windows=((400,), (200,))):
  """Two rows, each one audio of the given windows' mel frames (by default one window each, 100 and 50
  tokens), right padded; only the answers are labels."""
  rng = np.random.default_rng(seed)
  answers = [6, 10]
  feats, fmask = random_features(rng, [n for row in windows for n in row])
  rows = [np.concatenate([random_text(rng, tiny, 5), np.full(sum(map(audio_tokens, row)), tiny.audio_token_id),
                          random_text(rng, tiny, 3 + a)]) for row, a in zip(windows, answers)]
  width = max(map(len, rows)) + 2
  ids = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
  mask = np.stack([np.pad(np.ones_like(r), (0, width - len(r))) for r in rows])
  labels = np.full_like(ids, processor.IGNORE)
  for i, (r, a) in enumerate(zip(rows, answers)):
    labels[i, len(r) - a:len(r)] = r[-a:]
  return dict(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=fmask, labels=labels)


def torch_loss_and_grads(model, batch):
  kw = {k: torch.tensor(v) for k, v in batch.items()}
  kw["position_ids"] = torch.tensor(np.maximum(np.cumsum(batch["attention_mask"], -1) - 1, 0))
  model.zero_grad(set_to_none=True)
  loss = model(**kw).loss
  loss.backward()
  return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def ours_loss_and_grads(module, trainable, batch):
  graphdef, params, frozen = train_step.split(module, trainable)
  fn = jax.jit(jax.value_and_grad(train_step.loss_fn), static_argnums=3)
  loss, grads = fn(params, frozen, batch, graphdef)
  return float(loss), flat(grads)


@pytest.fixture(scope="module")
def batch(gqa_ckpt):
  return make_batch(gqa_ckpt.tiny)


@pytest.fixture(scope="module")
def torch_full(gqa_ckpt, batch):
  """transformers' (loss, gradients by parameter name) for full fine-tuning on `batch`."""
  return torch_loss_and_grads(copy.deepcopy(gqa_ckpt.torch_model), batch)


@pytest.fixture(scope="module")
def torch_lora(peft_model, batch):
  """peft's (loss, gradients by parameter name): only lora_A / lora_B have any."""
  return torch_loss_and_grads(peft_model, batch)


def test_full_finetune_loss_and_grads(gqa_loaded, batch, torch_full):
  ref_loss, ref_grads = torch_full
  loss, grads = ours_loss_and_grads(gqa_loaded.module(), "all", batch)
  assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
  biggest = max(np.abs(g).max() for g in ref_grads.values())
  seen = set()
  for name, g in ref_grads.items():
    path, layer, transform = names.param_path(names.canonical(name, names.HF_PREFIXES))
    ours = grads[path] if layer is None else grads[path][layer]
    assert_close(ours, names.torch_to_ours(g, transform), scale=biggest if ZERO_GRAD in name else None)
    seen.add(path)
  assert seen == set(grads)  # every trainable parameter (embed_positions is frozen on both sides)


def make_peft(torch_model):
  """peft's LoRA on a copy of `torch_model`, with random A and B."""
  config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, lora_dropout=0.0)
  model = peft.get_peft_model(copy.deepcopy(torch_model), config)
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # lora_B non-zero, so lora_A gets gradients
  return model


@pytest.fixture(scope="module")
def peft_model(gqa_ckpt):
  return make_peft(gqa_ckpt.torch_model)


def peft_key(path, layer):
  """Our LoRA path (`.../q_proj/lora_a`) and a layer index -> peft's parameter name."""
  *module, leaf = path
  stem = ".".join(module).replace("layers", f"layers.{layer}", 1)
  return f"base_model.model.model.{stem}.lora_{leaf[-1].upper()}.default.weight"


def lora_module(loaded, peft_model):
  """Our module with LoRA added and peft's weights copied in (a = A.T, b = B.T, stacked on layers)."""
  module = loaded.module()
  adapted = lora.add(module, lora.Spec(RANK, ALPHA), jax.random.PRNGKey(0))
  assert len(adapted) == 7  # stacked: one Linear per projection
  weights = {n: p.detach().numpy() for n, p in peft_model.named_parameters()}
  lora_state = nnx.state(module, nnx.LoRAParam)
  values = {path: np.stack([weights[peft_key(path, i)].T for i in range(loaded.config.decoder.num_layers)])
            for path in flat(lora_state)}
  nnx.replace_by_pure_dict(lora_state, traverse_util.unflatten_dict(values))
  nnx.update(module, lora_state)
  return module


def assert_lora_matches(loaded, peft_model, batch, torch_lora):
  """Our LoRA loss and gradients (peft's weights copied in) equal peft's."""
  ref_loss, ref_grads = torch_lora
  assert all("lora_" in n for n in ref_grads)
  loss, grads = ours_loss_and_grads(lora_module(loaded, peft_model), "lora", batch)
  assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
  assert len(grads) == 14
  for path, g in grads.items():
    for i in range(g.shape[0]):
      assert_close(g[i], ref_grads[peft_key(path, i)].T)


def test_lora_loss_and_grads(gqa_loaded, peft_model, batch, torch_lora):
  assert_lora_matches(gqa_loaded, peft_model, batch, torch_lora)


def test_music_flamingo_lora_loss_and_grads(music_ckpt, music_loaded):
  """Music Flamingo: the first row's audio has two windows, the second turned by window index 1."""
  batch = make_batch(music_ckpt.tiny, windows=((3000, 400), (200,)))
  model = make_peft(music_ckpt.torch_model)
  assert_lora_matches(music_loaded, model, batch, torch_loss_and_grads(model, batch))


def test_add_lora_keeps_the_base(gqa_loaded):
  """Base paths and values stay, lora_b starts at zero (the output is unchanged), axes follow the kernel."""
  module = gqa_loaded.module()
  lora.add(module, lora.Spec(RANK, ALPHA), jax.random.PRNGKey(0))
  params = flat(nnx.state(module))
  base = flat(gqa_loaded.state)
  assert {k for k in params if k[-1] not in ("lora_a", "lora_b")} == set(base)
  for k, v in base.items():
    np.testing.assert_array_equal(params[k], v)
  mlp = module.language_model.layers.mlp
  dec = gqa_loaded.config.decoder
  assert mlp.down_proj.lora_a.shape == (dec.num_layers, dec.intermediate_size, RANK)
  assert mlp.down_proj.lora_b.shape == (dec.num_layers, RANK, dec.hidden_size)
  assert not np.asarray(mlp.down_proj.lora_b[...]).any() and mlp.down_proj.lora_scale == ALPHA / RANK
  assert tuple(nnx.get_partition_spec(mlp.down_proj.lora_a).get_value()) == ("layers", "mlp", None)
  assert tuple(nnx.get_partition_spec(mlp.down_proj.lora_b).get_value()) == ("layers", None, "embed")
  assert module.lm_head.lora_a is None


def test_trainable_sets_match_torch(gqa_ckpt, gqa_loaded, peft_model):
  """Parameter counts per stage filter equal the torch modules upstream trains in that stage."""
  torch_params = {n: p.numel() for n, p in gqa_ckpt.torch_model.named_parameters() if p.requires_grad}
  expect = {
      "projector": sum(v for n, v in torch_params.items() if "multi_modal_projector" in n),
      "encoder_projector": sum(v for n, v in torch_params.items() if "audio_tower" in n or "projector" in n),
      "all": sum(torch_params.values()),
  }
  size = lambda state: sum(x.size for x in jax.tree.leaves(state))
  for trainable, count in expect.items():
    _, params, frozen = train_step.split(gqa_loaded.module(), trainable)
    assert size(params) == count, trainable
    assert size(params) + size(frozen) == sum(p.numel() for p in gqa_ckpt.torch_model.parameters())
  with pytest.raises(ValueError, match="lora.add first"):
    train_step.split(gqa_loaded.module(), "lora")
  _, params, _ = train_step.split(lora_module(gqa_loaded, peft_model), "lora")
  assert size(params) == peft_model.get_nb_trainable_parameters()[0]


def split_micro(batch):
  """The 2-row batch as 2 micro-batches of one row (and one audio window) each."""
  return {k: v[:, None] for k, v in batch.items()}


def run_steps(module, trainable, batches, mesh, accum_steps, total=10):
  graphdef, params, frozen = train_step.split(module, trainable)
  tx = optimizer.make_optimizer(1e-3, total, warmup_ratio=0.0, clip_norm=1.0)
  state = train_step.init_state(params, tx, mesh)
  step_fn = train_step.jit_train_step(graphdef, tx, state, frozen, mesh, accum_steps=accum_steps)
  metrics = []
  with jax.set_mesh(mesh):
    for b in batches:
      b = jax.device_put(b, sharding.batch_shardings(b, mesh, accum_steps))
      state, m = step_fn(state, frozen, b)
      metrics.append(jax.device_get(m))
  return state, metrics


def test_gradient_accumulation_equals_one_big_batch(gqa_ckpt, gqa_loaded, batch, torch_full):
  """Two micro-batches of one row each (6 and 10 label tokens) make the update transformers makes from
  the whole batch: its token-mean loss and gradients, clipped to norm 1, then one AdamW step."""
  state, [m] = run_steps(gqa_loaded.module(), "projector", [split_micro(batch)], gqa_loaded.mesh, accum_steps=2)
  ref_loss, ref_grads = torch_full
  lr = 1e-3  # run_steps' peak rate; no warmup, so the first update uses it
  torch_model = copy.deepcopy(gqa_ckpt.torch_model)
  torch_params = {n: p for n, p in torch_model.named_parameters() if "projector" in n}
  for n, p in torch_params.items():
    p.grad = torch.tensor(ref_grads[n])
  ref_norm = float(torch.nn.utils.clip_grad_norm_(torch_params.values(), 1.0))
  torch.optim.AdamW(torch_params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step()
  assert int(m["label_tokens"]) == 16 and int(state.step) == 1
  assert abs(m["loss"] - ref_loss) <= RTOL * ref_loss
  assert abs(m["grad_norm"] - ref_norm) <= RTOL * ref_norm and ref_norm > 1.0  # clipping is active
  assert m["lr"] == pytest.approx(lr)
  params = flat(state.params)
  for n, p in torch_params.items():
    path, _, transform = names.param_path(names.canonical(n, names.HF_PREFIXES))
    assert_close(params[path], names.torch_to_ours(p.detach().numpy(), transform))


def test_sharded_lora_step_matches_peft(gqa_ckpt, peft_model, batch, torch_lora):
  """The jitted step on a (2, 2, 2) mesh of fake devices: the first step's loss and gradient norm are
  peft's (as the unsharded ones are, above); a second step runs on the donated state."""
  mesh = sharding.make_mesh((2, 2, 2))
  module = lora_module(af3_jax.from_pretrained(gqa_ckpt.hf, dtype=jnp.float32, mesh=mesh), peft_model)
  state, metrics = run_steps(module, "lora", [batch, make_batch(gqa_ckpt.tiny, seed=1)], mesh, accum_steps=1)
  ref_loss, ref_grads = torch_lora
  ref_norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in ref_grads.values()))
  assert abs(metrics[0]["loss"] - ref_loss) <= RTOL * ref_loss
  assert abs(metrics[0]["grad_norm"] - ref_norm) <= RTOL * ref_norm
  assert np.isfinite(metrics[1]["loss"]) and int(state.step) == 2
  lora_b = state.params["language_model"]["layers"]["mlp"]["gate_proj"]["lora_b"]
  assert lora_b[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_chunked_cross_entropy_equals_the_full_one():
  """Chunks of 3 positions (with a ragged last chunk) give the loss and gradients of full logits."""
  rng = np.random.default_rng(7)
  hidden = jnp.asarray(rng.standard_normal((2, 11, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((8, 17)), jnp.float32)
  labels = jnp.asarray(np.where(rng.random((2, 11)) < 0.3, -100, rng.integers(0, 17, (2, 11))), jnp.int32)

  def full(hidden, kernel):
    logits = (hidden @ kernel)[:, :-1]
    y = labels[:, 1:]
    valid = y != -100
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(valid, y, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0))

  chunked = lambda hidden, kernel: train_step.cross_entropy(hidden, lambda h: h @ kernel, labels, chunk=3)[0]
  np.testing.assert_allclose(chunked(hidden, kernel), full(hidden, kernel), rtol=1e-6)
  for g, r in zip(jax.grad(chunked, (0, 1))(hidden, kernel), jax.grad(full, (0, 1))(hidden, kernel)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  assert int(train_step.cross_entropy(hidden, lambda h: h @ kernel, labels, chunk=3)[1]) == int((labels[:, 1:] != -100).sum())
