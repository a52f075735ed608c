"""The `fseg-jax` command: a thin shell over the public functions, one small module per subcommand.

Subcommands are imported only when invoked, so `fseg-jax --help` does not pay for importing JAX.
"""

from __future__ import annotations

import importlib

import click

from fseg_jax.cli.common import explained_errors

# subcommand name -> "module:attribute" of its click command
_COMMANDS = {
    "convert": "fseg_jax.cli.convert:convert",
    "segment": "fseg_jax.cli.segment:segment",
    "concepts": "fseg_jax.cli.concepts:concepts",
    "slide": "fseg_jax.cli.slide:slide",
    "evaluate": "fseg_jax.cli.evaluate:evaluate",
    "view": "fseg_jax.cli.view:view",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, cmd_name):
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        with explained_errors():
            return super().invoke(ctx)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="fseg_jax")
def main():
    """Unsupervised segmentation of H&E images with pathology foundation models (F-Seg) in JAX."""
