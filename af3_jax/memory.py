"""What XLA plans a compiled program to hold per device (arguments, temporaries, peak), and whether it
fits the device: for training's `--compile_only` plans, the benchmarks and the accelerator tests alike."""

from __future__ import annotations

import jax


def memory_plan(compiled, capacity: int | None = None) -> dict[str, float] | None:
  """A compiled step's memory per device in GiB, as XLA planned it (None where the backend does not
  say): arguments, temporaries and the peak (arguments + outputs - donated buffers + temporaries);
  with the device's `capacity` in bytes, also that (`device_gib`) and the share of it left free."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  plan = {"arguments_gib": m.argument_size_in_bytes / 2**30, "temporaries_gib": m.temp_size_in_bytes / 2**30,
          "peak_gib": peak / 2**30}
  if capacity:
    plan.update(device_gib=capacity / 2**30, headroom=1 - peak / capacity)
  return plan


def compiled_plan(lowered, capacity: int | None = None) -> dict | None:
  """`memory_plan` of a lowered step once compiled. A compiler that refuses a program too big for the
  device (TPU's does, naming the sizes) gives `{"error": its reason}` instead: a plan's answer too."""
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"error": " ".join(str(e).split())}
  return memory_plan(compiled, capacity)


def fits(plan: dict | None) -> bool:
  """Whether a `compiled_plan` fits its device (True where the capacity is unknown)."""
  return plan is not None and "error" not in plan and plan.get("headroom", 0) >= 0


def memory_summary(plan: dict | None) -> str:
  """`memory_plan`'s or `compiled_plan`'s figures as one line."""
  if plan is None:
    return "memory analysis not available on this backend"
  if "error" in plan:
    return f"does not fit: {plan['error']}"
  line = (f"arguments {plan['arguments_gib']:.2f} GiB, temporaries {plan['temporaries_gib']:.2f} GiB, "
          f"peak {plan['peak_gib']:.2f} GiB per device")
  if "device_gib" in plan:
    free = plan["headroom"]
    line += f" of {plan['device_gib']:.1f} GiB: " + (f"{free:.0%} free" if free >= 0 else "does not fit")
  return line
