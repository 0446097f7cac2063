"""What a compiled program writes: its optimised HLO (`compiled.as_text()`) read as instructions.

A program compiled for an accelerator (`targets.devices`, no accelerator needed) is XLA's plan for it:
each top-level instruction (in the entry computation, a loop body or a branch) is a kernel or a library
call that writes its result to memory; the instructions inside a fusion are not, they run in registers.
This is how tests see, on a CPU machine, whether a GPU step copies a weight before its matmul.
`compiles` counts the programs XLA compiles while a block runs (tests' recompile guards, benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (\(.*?\)|\S+) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CONTROL = {"while": ("condition", "body"), "conditional": ("true_computation", "false_computation"),
            "call": ("to_apply",)}
# Instructions that write nothing of their own: they name buffers other instructions wrote.
_NO_WRITE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
             "after-all"}
# What a computation that only moves or converts its inputs holds: its result is a copy of them.
_DATA_MOVEMENT = {"parameter", "constant", "copy", "slice", "dynamic-slice", "convert", "bitcast", "reshape",
                  "transpose", "tuple", "get-tuple-element", "bitcast-convert"}


@dataclasses.dataclass(frozen=True)
class Instruction:
  """A top-level instruction: the arrays it writes, (dtype, dims) each, and for a fusion the opcodes of
  the computation it runs."""

  name: str
  opcode: str
  arrays: tuple[tuple[str, tuple[int, ...]], ...]
  fused: frozenset[str] = frozenset()

  @property
  def copies(self) -> bool:
    """Its result only moves or converts what it reads (a copy, a slice, a dtype conversion)."""
    return (self.fused or {self.opcode}) <= _DATA_MOVEMENT


def instructions(text: str) -> list[Instruction]:
  """The instructions of `text` that write memory: those of the entry computation and of the loops,
  branches and calls it runs, not those inside fusions."""
  bodies: dict[str, list[str]] = {}
  entry = name = None
  for line in text.splitlines():
    if m := _COMPUTATION.match(line):
      name = m.group(2)
      bodies[name] = []
      entry = name if m.group(1) else entry
    elif name is not None and _INSTRUCTION.match(line):
      bodies[name].append(line)

  def opcodes(computation: str) -> frozenset[str]:
    return frozenset(_INSTRUCTION.match(line).group(3) for line in bodies.get(computation, ()))

  found, seen, todo = [], set(), [entry]
  while todo:
    computation = todo.pop()
    if computation in seen or computation not in bodies:
      continue
    seen.add(computation)
    for line in bodies[computation]:
      m = _INSTRUCTION.match(line)
      opcode = m.group(3)
      for key in _CONTROL.get(opcode, ()):
        todo += re.findall(rf"\b{key}=%([\w.-]+)", line)
      if opcode == "conditional":
        todo += re.findall(r"%([\w.-]+)", "".join(re.findall(r"branch_computations=\{([^}]*)\}", line)))
      if opcode in _NO_WRITE:
        continue
      called = re.search(r"\bcalls=%([\w.-]+)", line)
      arrays = tuple((dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(m.group(2)))
      found.append(Instruction(m.group(1), opcode, arrays, opcodes(called.group(1)) if called else frozenset()))
  return found


def _squeezed(dims) -> tuple[int, ...]:
  return tuple(d for d in dims if d != 1)


def writes_of_shape(text: str, shapes) -> list[Instruction]:
  """The top-level instructions that write an array of one of `shapes` (dims; sizes of 1 ignored, so a
  (1, in, out) slice of a stacked kernel matches its (in, out)), in any dtype."""
  wanted = {_squeezed(s) for s in shapes}
  return [i for i in instructions(text) if any(_squeezed(dims) in wanted for _, dims in i.arrays)]


@contextlib.contextmanager
def compiles():
  """The names of the programs XLA compiles inside the block, a list that grows as they compile (jax's
  backend compile events, from any thread; a persistent cache hit counts too)."""
  from jax import monitoring

  names = []

  def listener(event, _, fun_name=None, **__):
    if event == "/jax/core/compile/backend_compile_duration":
      names.append(fun_name)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    monitoring.unregister_event_duration_listener(listener)
