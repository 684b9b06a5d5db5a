"""The ``mdnumba`` command group. Thin: parses options, calls the library, prints."""

from __future__ import annotations

import click

from mdnumba.info import collect_info


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mdnumba")
def main() -> None:
    """mdnumba: multi-dimensional LSTMs with hand-written Numba kernels."""


@main.command()
def info() -> None:
    """Show versions, CPU threads and whether CUDA is usable."""
    for key, value in collect_info().items():
        click.echo(f"{key:>18}: {value}")
