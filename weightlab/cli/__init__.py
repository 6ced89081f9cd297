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


def _register() -> None:
    from weightlab.cli import inspect as _inspect
    from weightlab.cli import merge as _merge

    _inspect.register(app)
    _merge.register(app)
    __import__("weightlab.cli.registry", fromlist=["register"]).register(app)
    __import__("weightlab.cli.train", fromlist=["register"]).register(app)


_register()
