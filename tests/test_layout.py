"""The package's layout: wings over a small core, imports only pointing down, no cycles.

Layers, lowest first: the core (config, sharding, buckets, generation, files, targets, hlo, memory,
gpu_specs, distributed, results) < models, audio < checkpoints < data < inference, training < serving, evaluation
< the package's public names (`af3_jax/__init__.py`, gathered from the wings) and the stage configs
(configs/) < the programs (infer.py, serve.py, eval.py, train.py, cli.py, convert/, bench/). A module may import
its own wing and any lower layer; two wings of one layer (models and audio, inference and training,
serving and evaluation) never import each other, and the programs import only `cli` among themselves
(bench/ its own helpers). The graph is read from the source with `ast`, imports inside functions
included: nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

CORE = {"config", "sharding", "buckets", "generation", "files", "targets", "hlo", "memory", "gpu_specs",
        "distributed", "results"}
# Each layer's wings, lowest first.
LAYERS = [{"core"}, {"models", "audio"}, {"checkpoints"}, {"data"}, {"inference", "training"},
          {"serving", "evaluation"}, {"api", "configs"}, {"programs", "cli", "bench", "convert"}]
RANK = {wing: rank for rank, wings in enumerate(LAYERS) for wing in wings}
PROGRAMS = ["infer.py", "serve.py", "eval.py", "train.py", "cli.py"]


def module_files() -> dict[str, Path]:
  """Dotted module name -> source file, for the package and the programs."""
  files = [*ROOT.glob("af3_jax/**/*.py"), *(ROOT / p for p in PROGRAMS), *ROOT.glob("convert/*.py"),
           *ROOT.glob("bench/*.py"), *ROOT.glob("configs/*.py")]
  out = {}
  for f in files:
    parts = list(f.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = f
  return out


def wing(module: str) -> str:
  parts = module.split(".")
  if parts[0] == "af3_jax":
    if len(parts) == 1:
      return "api"  # the public names, gathered from the wings: for the programs and users alone
    return "core" if parts[1] in CORE else parts[1]
  if parts[0] in PROGRAMS_NAMES:
    return "cli" if parts[0] == "cli" else "programs"
  return parts[0]  # convert, bench, configs


PROGRAMS_NAMES = {p.removesuffix(".py") for p in PROGRAMS}


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
  """(imported module of ours, line) for every import in `path`: `from a import b` names module a.b
  when there is one, else a."""
  out = []
  bench = module.startswith("bench.")
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
    else:
      continue
    for name in names:
      if bench and f"bench.{name}" in known:  # the benchmarks run from bench/ and import its helpers by name
        name = f"bench.{name}"
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module:
        out.append((name, node.lineno))
  return out


def graph() -> dict[str, list[tuple[str, int]]]:
  known = module_files()
  return {m: imports(m, f, known) for m, f in known.items()}


def upward(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
  """Every import that points up a layer or across to another wing of the same layer."""
  known = module_files()
  bad = []
  for module, targets in edges.items():
    here = wing(module)
    for target, line in targets:
      there = wing(target)
      if there == here or RANK[there] < RANK[here] or (there == "cli" and RANK[here] == RANK["cli"]):
        continue
      where = known[module].relative_to(ROOT)
      bad.append(f"{where}:{line}: {module} ({here}) imports {target} ({there})")
  return bad


def cycles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
  """One cycle through each strongly connected group of modules (Tarjan's algorithm), as a path."""
  succ = {m: sorted({t for t, _ in ts}) for m, ts in edges.items()}
  index, low, stack, on, groups = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in succ.get(v, []):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(set(group))

  for v in sorted(succ):
    if v not in index:
      visit(v)
  out = []
  for group in groups:  # a shortest way back to the start, inside the group
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier and start not in [w for v in frontier for w in succ[v]]:
      nxt = []
      for v in frontier:
        for w in succ[v]:
          if w in group and w not in paths:
            paths[w] = paths[v] + [w]
            nxt.append(w)
      frontier = nxt
    end = next(v for v in frontier if start in succ[v])
    out.append(paths[end] + [start])
  return out


def test_imports_only_point_down():
  bad = upward(graph())
  assert not bad, "imports that point up or across the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
  found = cycles(graph())
  assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_see_a_wrong_import():
  """The checks themselves: an upward import and a cycle added to the real graph are both named."""
  edges = graph()
  assert "af3_jax.inference.engine" in {t for t, _ in edges["af3_jax.serving.service"]}  # the graph is read
  edges["af3_jax.models.qwen2"] = [*edges["af3_jax.models.qwen2"], ("af3_jax.training.step", 1)]
  edges["af3_jax.config"] = [*edges["af3_jax.config"], ("af3_jax.sharding", 1)]
  edges["af3_jax.sharding"] = [*edges["af3_jax.sharding"], ("af3_jax.config", 1)]
  assert [b for b in upward(edges) if "qwen2" in b] == [
      "af3_jax/models/qwen2.py:1: af3_jax.models.qwen2 (models) imports af3_jax.training.step (training)"]
  assert ["af3_jax.config", "af3_jax.sharding", "af3_jax.config"] in cycles(edges)
