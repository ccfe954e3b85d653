"""`ft serve`: an OpenAI-compatible API for the workspace's base models and tuned runs."""

from __future__ import annotations

from typing import Annotated

import typer

from ft.cli.common import console, get_workspace
from ft.cli.options import HostOpt, PortOpt, command_args
from ft.services import serving


def _banner(info: serving.ServeInfo) -> None:
    con = console()
    con.print(
        f"[bold green]ft serve[/] listening on [bold]{info.url}[/]  (OpenAI API at {info.url}/v1)",
        highlight=False,
    )
    for m in info.models:
        mark = "*" if m.id == info.default_model else " "
        what = f"tuned on {m.base}, checkpoint {m.checkpoint}" if m.kind == "tuned" else "base model"
        con.print(f"  {mark} {m.id}  [dim]({what})[/]", highlight=False)
    con.print('  [dim]* default when a request names no model; choose with the request\'s "model" field[/]')
    auth = '-H "Authorization: Bearer $FT_SERVE_API_KEY" ' if info.auth else ""
    con.print(
        f"  auth: {'on (Bearer serve_api_key from passwords.yml)' if info.auth else 'off (loopback only)'}\n"
        f"  try:  curl {info.url}/v1/chat/completions {auth}-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{info.default_model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\'\n'
        "  stop with Ctrl-C",
        highlight=False,
        markup=False,
    )
    con.file.flush()


def serve(
    ctx: typer.Context,
    port: PortOpt = 8000,
    host: HostOpt = "127.0.0.1",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Default model (base model or run id).")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Serve this tuned run by default: RUN or RUN:step-000100.")
    ] = None,
    max_models: Annotated[int, typer.Option("--max-models", min=1, help="Models kept in memory (LRU).")] = 1,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=0, help="Requests waiting beyond those generating; more get 429."),
    ] = 16,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            min=1,
            max=256,
            help="Requests for one model generated together (continuous batching).",
        ),
    ] = 16,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            min=16,
            max=8192,
            help="Prompt tokens read per step, between decoding steps of the others (a client leaving stops "
            "its prompt within one chunk).",
        ),
    ] = 512,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens", min=1, help="Cap on tokens generated per request (default: the context left)."
        ),
    ] = None,
    max_tokens_default: Annotated[
        int,
        typer.Option(
            "--max-tokens-default",
            min=1,
            help="Tokens a chat may generate when the request sets no max_tokens.",
        ),
    ] = serving.DEFAULT_MAX_TOKENS_CHAT,
    max_client_requests: Annotated[
        int,
        typer.Option(
            "--max-client-requests",
            min=1,
            help="Requests one client address may have in progress (429 beyond).",
        ),
    ] = 32,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout",
            min=0.1,
            help="Seconds a connection may take to send a request head (idle connections are closed after).",
        ),
    ] = 10.0,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=1, help="Seconds a request may take, queue included (504 after)."),
    ] = 600.0,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", min=0.01, help="Largest request body (413 beyond).")
    ] = 1.0,
    cors_origins: Annotated[
        list[str] | None,
        typer.Option(
            "--cors-origin", help="Allow browser apps from this origin (repeatable); CORS is off by default."
        ),
    ] = None,
    log_prompts: Annotated[
        bool, typer.Option("--log-prompts", help="Also log prompt and completion text (off by default).")
    ] = False,
    keep_quantized: Annotated[
        bool,
        typer.Option(
            "--keep-quantized",
            help="Keep quantized weights as stored (on CPU they are dequantized when they fit).",
        ),
    ] = False,
) -> None:
    """Serve base models and tuned runs over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    opts = serving.ServeOptions.model_validate(command_args(ctx))
    serving.serve(get_workspace(ctx), opts, on_listening=_banner)
