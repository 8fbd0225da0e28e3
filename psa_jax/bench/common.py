"""Shared pieces of the benchmark studies: real text, timing, tables, plots, result files."""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax


def prose(n_chars: int) -> str:
  """English prose every Python install has offline: the pydoc topics."""
  from pydoc_data import topics
  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  while len(text) < n_chars:
    text += "\n\n" + text
  return text[:n_chars]


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import os
  return f"{jax.devices()[0].device_kind} / {cpu} x{os.cpu_count()} / jax {jax.__version__}"


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def progress(message: str) -> None:
  print(f"[bench] {message}", file=sys.stderr, flush=True)


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  lines = [" | ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
  lines.insert(1, "-|-".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.0f}"
  return str(x)


def save(out_dir: pathlib.Path, name: str, rows: list[dict], meta: dict) -> pathlib.Path:
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), **meta, "rows": rows}, indent=1))
  return path


def plot(path: pathlib.Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], *,
         logx: bool = False, logy: bool = False) -> pathlib.Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  _draw(ax, title, xlabel, ylabel, series, logx=logx, logy=logy)
  return _save_figure(fig, path)


def plot_panels(path: pathlib.Path, title: str, panels: Sequence[dict]) -> pathlib.Path:
  """Several plots side by side in one file, two to a row. Each panel is a dict of `plot`'s arguments:
  title, xlabel, ylabel, series and optionally logx, logy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = min(2, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
  for ax, panel in zip(axes.flat, panels):
    _draw(ax, **panel)
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(title)
  return _save_figure(fig, path)


def _draw(ax, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]], *, logx: bool = False,
          logy: bool = False) -> None:
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logx:
    ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()


def _save_figure(fig, path: pathlib.Path) -> pathlib.Path:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
