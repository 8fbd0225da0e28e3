"""The server-process runner now lives in the package (the serving benchmark uses it too); tests import it here."""

from psa_jax.bench.server_process import free_port, running_server

__all__ = ["free_port", "running_server"]
