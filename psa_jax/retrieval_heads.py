"""The (layer, KV head) pairs PSA reads densely for a model: its retrieval heads.

In a few heads of a model the attention of a question sits on one block far back in the context. A block summary
(a mean and a half-box of the keys) can rank that one block below blocks of diffuse attention, and PSA's stopping
rule then stops before reaching it: the answer is lost although the rule's tolerance was met on what it read.
These heads are few and stable across texts, so they are found once per model on needle-free text
(`python -m psa_jax.bench --study=heads`, psa_jax/bench/heads.py) and read densely (tau 1 there) from PSA's
default tau up, at a small cost in KV read (`backend.head_thresholds`).

Where a model's list comes from (`resolve`):
  "auto"      a `psa_dense_heads.json` beside the model (in a Hugging Face directory, or `<file>.psa_dense_heads.json`
              beside a GGUF file), as the study writes it; else the list calibrated for the default model; else
              none.
  "none"      no head reads densely.
  "L:H,..."   the given pairs.
  a path      a JSON file as the study writes it.
"""

from __future__ import annotations

import json
import pathlib

FILE_NAME = "psa_dense_heads.json"

# `python -m psa_jax.bench --study=heads` on the default model (BENCHMARKS.md, "Retrieval heads").
CALIBRATED = {
    "smollm2-135m-instruct": ((7, 2), (17, 1), (18, 2)),
}


def parse(spec: str) -> tuple[tuple[int, int], ...]:
  """"L:H,L:H" -> ((L, H), (L, H)), sorted; "" or "none" -> (). Raises ValueError on anything else."""
  if spec.strip() in ("", "none"):
    return ()
  pairs = []
  for part in spec.split(","):
    try:
      layer, head = (int(x) for x in part.split(":"))
    except ValueError:
      raise ValueError(f"a dense head is LAYER:KV_HEAD, got {part!r} in {spec!r}") from None
    if layer < 0 or head < 0:
      raise ValueError(f"a dense head's layer and KV head are >= 0, got {part!r}")
    pairs.append((layer, head))
  return tuple(sorted(set(pairs)))


def read(path: str | pathlib.Path) -> tuple[tuple[int, int], ...]:
  """The pairs of a JSON file written by the heads study ({"dense_heads": [[L, H], ...], ...})."""
  try:
    data = json.loads(pathlib.Path(path).read_text())
    return tuple(sorted({(int(layer), int(head)) for layer, head in data["dense_heads"]}))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a dense-heads file ({{\"dense_heads\": [[layer, kv_head], ...]}}): {e}") from None


def beside(model_path: pathlib.Path) -> pathlib.Path:
  """Where "auto" looks for a model's calibration."""
  return model_path / FILE_NAME if model_path.is_dir() else model_path.with_name(f"{model_path.name}.{FILE_NAME}")


def resolve(spec: str, model: str | None, model_path: pathlib.Path | None) -> tuple[tuple[int, int], ...]:
  """The dense heads `spec` names for `model` (the --model value; None: the default model) found at `model_path`
  (None: not on disk). See the module docstring."""
  if spec != "auto":
    if spec.strip() not in ("", "none") and ":" not in spec:
      return read(spec)
    return parse(spec)
  if model_path is not None and beside(model_path).is_file():
    return read(beside(model_path))
  from psa_jax.models.checkpoint import DEFAULT_MODEL

  if model in (None, "", DEFAULT_MODEL):
    return CALIBRATED[DEFAULT_MODEL]
  return ()
