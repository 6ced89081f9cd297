"""The ``weightlab`` command line. Each command group lives in its own module and registers here."""

import logging

import typer

app = typer.Typer(
    name="weightlab",
    help="Catalog, compose, deploy and train the weight residuals behind fast, personalized video diffusion.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


COMMAND_MODULES = ("inspect", "merge", "registry", "train", "serve", "generate", "export", "jobs")


def _register() -> None:
    """Each command module exposes ``register(app)``; modules import their heavy dependencies lazily."""
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"weightlab.cli.{name}").register(app)


_register()
