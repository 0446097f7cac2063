"""Training checkpoints (orbax): the train state and the data iterator's position, saved together.

Saves are asynchronous and atomic (orbax writes a temporary folder and renames it when complete), so a
crash during a save never spoils the latest complete checkpoint; only the last `keep` are kept.
`saved_steps` and `restore_params` read a run's checkpoints without a manager (an export, or a run
starting from another's step), so reading never changes the folder.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """`workdir/checkpoints/<step>/{state,data}`."""

  def __init__(self, directory: Path, *, keep: int, save_every: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data: grain.DatasetIterator, *, force: bool = False) -> bool:
    """Saves when `step` is due (every `save_every`) or when forced; returns whether it did."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, data: grain.DatasetIterator):
    """The state at `step` (in the abstract state's shardings); `data` continues after that step's batch."""
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data))
    return self.manager.restore(step, args=args).state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def saved_steps(directory: Path) -> list[int]:
  """The steps with a complete checkpoint in `directory`, ascending (none: []). Reads file names only,
  so it may run before `jax.distributed.initialize`."""
  return sorted(ocp.utils.checkpoint_steps(directory.absolute()))


def restore_params(step_dir: Path, abstract_params):
  """The trainable params of the train state saved in `step_dir` (`<directory>/<step>`), in the dtypes
  and shardings of `abstract_params` (a tree of jax.ShapeDtypeStruct); the optimizer state and the
  data position are not read."""
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore((step_dir / "state").absolute(), args=args)["params"]
