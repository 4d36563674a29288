"""The --runtime choice, without importing torch (the CLI's --help must stay fast); geoindex.runtime acts on it."""
from __future__ import annotations

import os

import click

RUNTIMES = ("auto", "torch", "openvino")
RUNTIME_ENV = "GEOINDEX_RUNTIME"
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def _set_runtime(ctx, param, value):
    """--runtime becomes $GEOINDEX_RUNTIME, which every model of this process (and of serve's workers) reads."""
    if value is None:
        return None
    choice = value.strip().lower()
    if choice not in RUNTIMES:
        raise click.ClickException(f"--runtime {value!r} is not one of: {', '.join(RUNTIMES)}")
    os.environ[RUNTIME_ENV] = choice
    return choice


runtime_option = click.option(
    "--runtime", default=None, callback=_set_runtime, expose_value=False,
    help="Where the embedding model runs: auto (OpenVINO on a CPU when it is installed, several times faster; "
         "PyTorch on a GPU), torch or openvino. Embeddings agree across runtimes, so an index built with one "
         "answers queries embedded with another [default: auto, or $GEOINDEX_RUNTIME].")
