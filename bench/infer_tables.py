"""What bench_infer.py prints of its `Timing`s: a line per cell as it runs, the table of every cell, and
issue 21's figures side by side. A `Timing` whose fields are None ran out of device memory ("OOM")."""


def describe(t) -> str:
  """One cell's `Timing` in a line, as the cells are run."""
  if t.ttft is None:
    return "out of device memory"
  parts = [f"TTFT {t.ttft:.3f} s", f"{t.tok_s:.1f} tok/s"]
  if t.loop_tok_s is not None:
    parts += [f"loop {t.loop_tok_s:.1f} tok/s", f"compile {t.compile_s:.1f} s ({t.compiles} programs)"]
  return ", ".join(parts)


def table(jax_t: dict[str, dict], torch_t: dict) -> str:
  """jax_t: {variant: {(audio, batch): Timing}}; a row per cell and JAX variant."""
  lines = ["| audio | batch | JAX weights | JAX TTFT s | torch TTFT s | JAX tok/s | JAX loop tok/s | torch tok/s "
           "| JAX compile s | JAX programs |", "|---|---|---|---|---|---|---|---|---|---|"]
  for (audio, rows), t in torch_t.items():
    for variant, cells in jax_t.items():
      j = cells[audio, rows]
      lines.append(f"| {audio} | {rows} | {variant} | {_fmt(j.ttft, '.3f')} | {_fmt(t.ttft, '.3f')} | "
                   f"{_fmt(j.tok_s, '.1f')} | {_fmt(j.loop_tok_s, '.1f')} | {_fmt(t.tok_s, '.1f')} | "
                   f"{_fmt(j.compile_s, '.1f')} | {_fmt(j.compiles, 'd')} |")
  return "\n".join(lines)


def _fmt(x, spec: str) -> str:
  return "OOM" if x is None else format(x, spec)


def figures(jax_t: dict[str, dict], torch_t: dict, variants: dict[str, tuple[str, str]]) -> str:
  """Issue 21's table: each figure for transformers and every JAX variant, "-" where its cell was not
  run. variants: {label: (quantize, projections)}."""
  def cell(cells, audio, rows, field):
    t = cells.get((audio, rows))
    return "-" if t is None else _fmt(getattr(t, field), ".3f" if field == "ttft" else ".1f")

  rows = [("decode batch 1, tok/s (`generate` loop)", "30s", 1, "tok_s", "loop_tok_s"),
          ("decode batch 8, tok/s (`generate` loop)", "30s", 8, "tok_s", "loop_tok_s"),
          ("time to first token, 30 s audio, s", "30s", 1, "ttft", "ttft"),
          ("prefill, 10 min audio (time to first token), s", "10min", 1, "ttft", "ttft")]
  lines = ["| figure | transformers | " + " | ".join(f"JAX {v}" for v in jax_t) + " |",
           "|---|---|" + "---|" * len(jax_t)]
  for name, audio, n, torch_field, jax_field in rows:
    lines.append(f"| {name} | {cell(torch_t, audio, n, torch_field)} | "
                 + " | ".join(cell(c, audio, n, jax_field) for c in jax_t.values()) + " |")
  compiled = [f"{sum(t.compiles or 0 for t in c.values())} ({sum(t.compile_s or 0 for t in c.values()):.1f} s)"
              for c in jax_t.values()]
  lines.append("| programs compiled (seconds) | - | " + " | ".join(compiled) + " |")
  ratios = []
  for label, (quantize, projections) in variants.items():
    base = next((c for other, c in jax_t.items() if variants[other] == ("none", projections)), None)
    t, b = jax_t[label].get(("30s", 1)), base and base.get(("30s", 1))
    ok = quantize == "int8" and t and b and t.loop_tok_s and b.loop_tok_s
    ratios.append(f"{t.loop_tok_s / b.loop_tok_s:.2f}x" if ok else "-")
  lines.append("| int8 decode batch 1, x the same projections unquantised | - | " + " | ".join(ratios) + " |")
  return "\n".join(lines)
