"""`ft serve`: an OpenAI-compatible API for the workspace's base models and tuned runs."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ft.cli.common import console, get_workspace
from ft.cli.options import HostOpt, PortOpt, command_args, field_option
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


_DEFAULT = serving.ServeOptions()


def _option(name: str, *flags: str, **option: Any) -> Any:
    """The flag of a ServeOptions field, with its docstring as help (and its default in _DEFAULT)."""
    return field_option(serving.ServeOptions, name, *flags, **option)


def serve(
    ctx: typer.Context,
    port: PortOpt = _DEFAULT.port,
    host: HostOpt = _DEFAULT.host,
    model: Annotated[str | None, _option("model", "--model", "-m")] = _DEFAULT.model,
    adapter: Annotated[str | None, _option("adapter", "--adapter")] = _DEFAULT.adapter,
    max_models: Annotated[int, _option("max_models", "--max-models", min=1)] = _DEFAULT.max_models,
    max_queue: Annotated[int, _option("max_queue", "--max-queue", min=0)] = _DEFAULT.max_queue,
    max_batch: Annotated[int, _option("max_batch", "--max-batch", min=1, max=256)] = _DEFAULT.max_batch,
    prefill_chunk: Annotated[
        int, _option("prefill_chunk", "--prefill-chunk", min=16, max=8192)
    ] = _DEFAULT.prefill_chunk,
    max_tokens: Annotated[int | None, _option("max_tokens", "--max-tokens", min=1)] = _DEFAULT.max_tokens,
    max_tokens_default: Annotated[
        int, _option("max_tokens_default", "--max-tokens-default", min=1)
    ] = _DEFAULT.max_tokens_default,
    max_client_requests: Annotated[
        int, _option("max_client_requests", "--max-client-requests", min=1)
    ] = _DEFAULT.max_client_requests,
    header_timeout: Annotated[
        float, _option("header_timeout", "--header-timeout", min=0.1)
    ] = _DEFAULT.header_timeout,
    timeout: Annotated[float, _option("timeout", "--timeout", min=1)] = _DEFAULT.timeout,
    max_body_mb: Annotated[float, _option("max_body_mb", "--max-body-mb", min=0.01)] = _DEFAULT.max_body_mb,
    cors_origins: Annotated[list[str] | None, _option("cors_origins", "--cors-origin")] = None,
    log_prompts: Annotated[bool, _option("log_prompts", "--log-prompts")] = _DEFAULT.log_prompts,
    keep_quantized: Annotated[bool, _option("keep_quantized", "--keep-quantized")] = _DEFAULT.keep_quantized,
) -> None:
    """Serve base models and tuned runs over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    opts = serving.ServeOptions.model_validate(command_args(ctx))
    serving.serve(get_workspace(ctx), opts, on_listening=_banner)
