"""Train one stage of the AF3 curriculum.

  python train.py --config=configs/stage5.py --workdir=runs/stage5 --config.init_from=CKPT \
      --config.data.train=a.json,b.json [--config.total_steps=N] [--config.save_every=N]

Rerunning the same command resumes from the latest checkpoint in `workdir`; SIGTERM or SIGINT (to any
one process of a multi-process run) saves and exits 0. When the run completes, `workdir/model` holds
the last step's model (LoRA merged) in the layout `from_pretrained` reads, so the next stage can start
from `--config.init_from=runs/stage5` (before it completes, that takes its latest saved step).
One run at a time may use a workdir.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the final model go here.")
flags.adopt_module_key_flags(cli)  # --verbosity in --help
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Plan memory only: compile the stage's train step for "
                                  "every length bucket from init_from's config.json (no weights, no data), print "
                                  "the per-device plan and write workdir/memory.json.")
_TARGET = flags.DEFINE_string("target", None, "With --compile_only: plan for this accelerator instead of the devices "
                              "present, e.g. h100-8, h200-8, a100-8, v5p-8, v6e-8 (8 GPUs; TPU slices by their Cloud "
                              "names), compiled by its own compiler without it (needs the `accelerators` extra).")
_CACHE = cli.compilation_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])


def run(cfg, workdir: Path, compile_only: bool = False, target: str | None = None) -> int:
  from af3_jax import distributed, targets
  from af3_jax.training import checkpoint, plans, setup, workdirs
  from af3_jax.training.preemption import Stop

  if compile_only:
    # The target's devices before anything else: jax must not have started a backend yet.
    on = targets.compile_only(target) if target else None
    setup.check_config(cfg, needs_data=False)
    workdirs.check_workdir(workdir)
    return plans.stage_plan(cfg, workdir, workdirs.resolve_init(cfg.init_from), on)
  if target:
    raise ValueError("--target names the accelerator a memory plan is for: use it with --compile_only")
  # Everything that can be checked without the model first: loading the 8B model takes minutes.
  setup.check_config(cfg)
  samples = setup.read_samples(cfg.data.train)
  workdirs.check_workdir(workdir)
  init_from = workdirs.start_checkpoint(workdir, cfg.init_from)
  # The step training resumes from, read before joining so that `join` tells it at once.
  start = max(checkpoint.saved_steps(workdir / workdirs.CHECKPOINTS), default=0)
  if distributed.initialize_distributed():
    Stop.join(start)
  with workdirs.WorkdirLock(workdir):
    return _train(cfg, workdir, samples, init_from, start)


def _data(cfg, samples, init_from: str, rows: int):
  """(this host's batches of `rows` rows, the run's total steps, the pad id): total_steps, or epochs x the steps an
  epoch takes, counting the samples of the first step (read ahead, then replayed). Packed rows hold as
  many samples as fit, so there it is an estimate; it prints the first step's share of real tokens."""
  import jax

  import af3_jax
  from af3_jax import distributed
  from af3_jax.training import pipeline, run as train_run

  processor = af3_jax.Processor.from_pretrained(train_run.base_checkpoint(init_from), style=cfg.data.style or None,
                                                max_windows=cfg.data.max_windows)
  data = pipeline.train_batches(
      samples, processor, rows=rows, windows_per_row=cfg.data.max_windows, buckets=cfg.data.length_buckets,
      max_length=cfg.data.max_length, packing=cfg.data.packing, seed=cfg.data.seed, epochs=None,
      workers=cfg.data.workers, source=cfg.data.train, process_index=jax.process_index(),
      process_count=jax.process_count())
  try:
    first = pipeline.peek(data)
  except pipeline.NothingUsable:
    data.close()  # stops grain's worker processes now, not noisily at interpreter exit
    raise
  per_step, real, slots = distributed.all_hosts(pipeline.samples_in(first), int(first["attention_mask"].sum()),
                                              first["attention_mask"].size).sum(axis=0).tolist()
  per_epoch = len(samples) // per_step
  print(f"first step: {per_step} sample(s) ({'packed' if cfg.data.packing else 'one a row'}), real tokens in "
        f"{real / slots:.1%} of its {slots:,} token slots; {per_epoch} steps an epoch")
  total = cfg.total_steps or cfg.epochs * per_epoch
  if total < 1:
    data.close()
    raise ValueError(f"{len(samples)} samples make no full step of {per_step}; set total_steps to repeat them")
  return data, total, processor.tokenizer.pad_token_id or 0


def _train(cfg, workdir: Path, samples, init_from: str, start: int) -> int:
  import jax
  import numpy as np
  from tqdm import tqdm

  from af3_jax import distributed, memory, sharding, targets
  from af3_jax.training import checkpoint, metrics, pipeline, run as train_run, setup, workdirs
  from af3_jax.training import step as train_step
  from af3_jax.training.preemption import Stop

  print(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)")
  data, total, pad_id = _data(cfg, samples, init_from, setup.global_rows(cfg, mesh) // jax.process_count())

  ckpt = checkpoint.Checkpointer(workdir / workdirs.CHECKPOINTS, keep=cfg.keep_checkpoints, save_every=cfg.save_every)
  if start > total:
    ckpt.close()
    data.close()
    raise ValueError(f"{workdir}: its checkpoints reach step {start}, past total_steps={total}; "
                     "raise total_steps or choose another --workdir")
  changed = workdirs.record_settings(workdir, cfg, init_from)
  if start and changed:
    print(f"warning: resuming step {start} with settings that differ from the run that saved it: "
          f"{'; '.join(changed)}", file=sys.stderr)

  print(f"loading the model from {init_from} ...", flush=True)
  model = setup.load(cfg, init_from, mesh)
  graphdef, frozen, state, step_fn = setup.build(cfg, model, mesh, total)
  n_train, n_frozen = setup.count(state.params), setup.count(frozen)
  print(f"parameters: {n_train:,} trainable, {n_frozen:,} frozen ({cfg.trainable}); remat {cfg.remat}")
  if start:
    state = ckpt.restore(start, state, data)
    print(f"resumed from step {start}")
  primary = jax.process_index() == 0  # the one process that writes metrics (all save checkpoints together)
  log = metrics.MetricsLog(workdir, model=model.config, every=cfg.log_every, after_step=start,
                           peak_flops=cfg.peak_tflops * 1e12 * jax.device_count(), trainable=cfg.trainable,
                           lora_rank=cfg.lora.rank if cfg.trainable == "lora" else 0) if primary else None
  Stop.install()
  compiled = {}  # one program per batch shape (length bucket)
  capacity = targets.device_memory(mesh.devices.flat[0])
  tally = _Tally(start)
  # Under the guard a host<->device copy that nobody asked for (a stray numpy operand, a Python
  # conversion of a device value) is an error, not a silent sync per step: the batch goes up and the
  # metrics come down explicitly. Leaving the block by any path closes the event file.
  with tqdm(total=total, initial=start, desc="train", unit="step", disable=not primary) as bar, \
       jax.transfer_guard("disallow"), log or contextlib.nullcontext():
    for step in range(start + 1, total + 1):
      try:
        host = next(data)
      except pipeline.NothingUsable as e:
        ckpt.close()
        data.close()  # stops grain's worker processes now, not noisily at interpreter exit
        raise ValueError(str(e)) from None
      # Each host chose its length bucket from its own rows: all take the longest.
      hosts = distributed.all_hosts(int(host.pop("skipped")), host["input_ids"].shape[1])
      skipped, length = int(hosts[:, 0].sum()), int(hosts[:, 1].max())
      host = pipeline.pad_length(host, length, pad_id)
      batch = sharding.global_batch(host, mesh, cfg.accum_steps)
      shapes = tuple((k, v.shape) for k, v in sorted(batch.items()))
      with jax.set_mesh(mesh):
        if shapes not in compiled:
          tqdm.write(f"compiling the train step for input_ids {batch['input_ids'].shape} (once per length "
                     "bucket) ...")
          compiled[shapes] = step_fn.lower(state, frozen, batch).compile()
          tqdm.write(f"compiled train step for input_ids {batch['input_ids'].shape}: "
                     f"{memory.memory_summary(memory.memory_plan(compiled[shapes], capacity))}")
        state, m = compiled[shapes](state, frozen, batch)
      m = jax.device_get(m)
      if not np.isfinite(m["loss"]):
        print(f"error: non-finite loss {m['loss']} at step {step}; stopping without saving this state "
              f"(the last checkpoint is step {ckpt.latest_step()})", file=sys.stderr)
        ckpt.close()
        return 1
      tally.add(step, m, skipped)
      stop = Stop.after(step)
      stopping = stop or step == total
      if log:
        log.add(step, {**m, "skipped": skipped}, flush=stopping)
      bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{float(m['lr']):.2e}")
      bar.update()
      ckpt.save(step, state, data, force=stopping)
      if stop:
        ckpt.close()
        print(tally.summary(f"stopped at step {step} of {total} by a signal; checkpoint saved, rerun the command to "
                            "resume"))
        return 0
  ckpt.close()
  if workdirs.model_step(workdir) != total:  # a rerun of a finished run finds its model already written
    train_run.write_model(workdir, total, model, graphdef, state.params, frozen, train_step.lora_spec(cfg))
  print(tally.summary(f"done: step {total} of {total}; the trained model is in {workdir / 'model'}"))
  return 0


class _Tally:
  """What a run did, for its last line: steps, real tokens and skipped samples since it started."""

  def __init__(self, start: int):
    self.start, self.step, self.tokens, self.skipped = start, start, 0.0, 0
    self.started = time.perf_counter()

  def add(self, step: int, metrics, skipped: int) -> None:
    self.step, self.tokens, self.skipped = step, self.tokens + float(metrics["real_tokens"]), self.skipped + skipped

  def summary(self, outcome: str) -> str:
    seconds = time.perf_counter() - self.started
    return (f"{outcome} | this run: {self.step - self.start} step(s) in {seconds:.1f} s (compiles included), "
            f"{self.tokens / seconds:,.0f} real tokens/s, {self.skipped} unusable sample(s) skipped")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad --config file or override as one line and exit 1."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    # A --config file whose get_config raised comes with the whole traceback: its last line says why.
    head, _, trace = str(e).partition("Traceback (most recent call last):")
    problem = f"{head} {trace.strip().splitlines()[-1]}" if trace else str(e)
  except (KeyError, AttributeError) as e:  # ml_collections: an override names no field of the config
    problem = f"--config overrides: {_no_such_field(e)}"
  except OSError as e:  # ml_collections: the --config file cannot be read; its last line says why
    problem = f"cannot load the --config file ({str(e).splitlines()[-1].strip()})"
  except Exception as e:  # noqa: BLE001: the --config file's own Python failed (a syntax error, say)
    problem = f"cannot load the --config file ({type(e).__name__}: {e})"
  else:
    problem = _config_problem()
    if problem is None:
      return rest
  cli.fail(' '.join(problem.split()))


def _config_problem() -> str | None:
  """What is wrong with the loaded --config, which ml_collections would report only at first use."""
  config, name = _CONFIG.value, flags.FLAGS["config"].config_filename
  if isinstance(config, ConfigDict):
    return None
  try:
    config.keys()  # what ml_collections returns for a file it could not read raises its error here
  except OSError as e:
    return f"cannot load the --config file ({str(e).splitlines()[-1].strip()})"
  except AttributeError:
    pass
  return f"{name}: get_config() returned {type(config).__name__}, not an ml_collections ConfigDict"


def _no_such_field(e: BaseException) -> str:
  """ml_collections' message for an unknown field (a KeyError of "'name'\\nDid you mean ...", which may
  come wrapped in an AttributeError), as plain text."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  name, _, hint = (str(e.args[0]) if e.args else str(e)).partition("\n")
  if not (name.startswith("'") and name.endswith("'")):  # not a field name: another lookup failed
    return name
  return f"no such field {name}" + (f"; {hint[:1].lower()}{hint[1:]}" if hint else "")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.setup_logging()

  def start() -> int:
    cli.use_compilation_cache(_CACHE.value)
    return run(_CONFIG.value, Path(_WORKDIR.value), _COMPILE_ONLY.value, _TARGET.value)

  cli.exit_with(start)


if __name__ == "__main__":
  cli.process(lambda: app.run(main, flags_parser=_parse_flags))
