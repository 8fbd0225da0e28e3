"""`python -m psa_jax.serve`: the OpenAI-compatible server (issue 5, not built yet)."""

from absl import app, flags

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "GGUF file, Hugging Face directory or alias.")


def main(argv):
  del argv
  raise SystemExit(
      f"psa_jax.serve: serving is not implemented yet (model {_MODEL.value!r}); the set-up succeeded. "
      "Track issue 5 (server) and issue 4 (engine).")


if __name__ == "__main__":
  app.run(main)
