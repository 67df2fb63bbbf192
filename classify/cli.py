"""`classify`: the model-side command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curator.errors import AtelierError

app = typer.Typer(
    name="classify",
    help="Train, evaluate and run image classifiers on pretrained timm backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Train, evaluate and run image classifiers on pretrained timm backbones."""


@app.command()
def models(
    load: Annotated[bool, typer.Option(help="Also load each installed backbone and report its feature width.")] = False,
) -> None:
    """List the backbones that work offline, whether their weights are installed, and how to get the others."""
    from classify.models import describe_backbones

    try:
        rows = describe_backbones(load=load)
    except AtelierError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=exc.exit_code) from None
    table = Table(title="offline backbones")
    for column in ("name", "installed", "input", "features", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, "yes" if row.installed else "no", row.input_size or "-",
                      str(row.feature_dim) if row.feature_dim else "-", escape(row.description))
    console.print(table)
    console.print("Any other timm model name works with network access (Hugging Face hub) or --weights FILE.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
