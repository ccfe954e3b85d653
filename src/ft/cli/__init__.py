"""The `ft` command line. Only this package imports typer and rich."""

from __future__ import annotations


def main() -> None:
    """Console entry point. The BLAS re-exec runs first: it must happen before mlx is imported."""
    import sys

    from ft.engine.runtime import maybe_reexec_with_fast_blas

    maybe_reexec_with_fast_blas()
    from ft.cli.app import run

    sys.exit(run())
