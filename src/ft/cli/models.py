"""`ft models list|pull|info|rm`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ft.cli.common import confirm_delete, emit, err_console, get_workspace
from ft.cli.options import JsonOpt, NameOpt, SetOpt, YesOpt
from ft.services import models as svc

app = typer.Typer(no_args_is_help=True)

ModelName = Annotated[str, typer.Argument(help="Model name (see `ft models list`).")]


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _quant(q: str) -> str:
    return "not quantized" if q == "none" else f"{q} quantized"


# ------------------------------------------------------------------------------------------ list
def _render_list(con: Console, r: svc.ModelList) -> None:
    t = Table(title="models in this workspace", title_justify="left")
    for col in ("name", "architecture", "parameters", "quantization", "size on disk", "source"):
        t.add_column(col, overflow="fold")
    for m in r.models:
        src = m.source + (f"@{m.commit[:10]}" if m.commit and m.commit != "offline" else "")
        t.add_row(m.name, m.architecture, _params(m.parameters), m.quantization, _size(m.size_bytes), src)
    if r.models:
        con.print(t)
    else:
        con.print("no models pulled yet: [bold]ft models pull smollm2-135m-instruct[/]")
    c = Table(title="catalog (ft models pull NAME)", title_justify="left")
    for col in ("name", "architecture", "parameters", "as published", "download", "source", ""):
        c.add_column(col, overflow="fold")
    for e in r.catalog:
        mark = "[green]pulled[/]" if e.pulled else ("gated" if e.gated else "")
        c.add_row(
            e.name,
            e.architecture,
            _params(e.parameters),
            e.quantization,
            _size(e.download_bytes),
            "built in" if e.source == "embedded" else e.source,
            mark,
        )
    con.print(c)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Models pulled into this workspace, and the built-in catalog."""
    emit(svc.list_models(get_workspace(ctx)), as_json, _render_list)


# ------------------------------------------------------------------------------------------ pull
def _render_pull(con: Console, r: svc.PullResult) -> None:
    m = r.model
    head = "already pulled" if r.already_present else "pulled"
    con.print(
        f"[bold green]{head}[/] [bold]{m.name}[/]: {m.architecture}, {_params(m.parameters)} parameters, "
        f"{_quant(m.quantization)}, {_size(m.size_bytes)} at {m.path}"
    )
    con.print(
        f"next: [bold]ft dataset prepare data.jsonl[/] with model.name: {m.name} in train.yml",
        highlight=False,
    )


@app.command()
def pull(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(help="Catalog name, Hugging Face repo id (owner/name), model folder or .gguf file."),
    ],
    name: NameOpt = None,
    revision: Annotated[
        str | None, typer.Option("--revision", "-r", help="Branch, tag or commit to pin (Hugging Face).")
    ] = None,
    quantize: Annotated[
        int | None, typer.Option("--quantize", "-q", help="Write an MLX-quantized copy: 4 or 8 bits.")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Store float weights as float16, bfloat16 or float32.")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow the repository's own model code to run.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download or import a model into the workspace (resumable; pulling again is a no-op)."""
    ws = get_workspace(ctx)
    con = err_console()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=con,
        transient=True,
        disable=as_json,
    )
    task = progress.add_task(f"downloading {source}", total=None, visible=False)

    def on_bytes(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total or None, visible=True)

    with progress:
        result = svc.pull(
            ws,
            source,
            name=name,
            revision=revision,
            quantize=quantize,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            tqdm_class=svc.download_progress(on_bytes),
            on_step=None if as_json else (lambda s: progress.console.print(f"[dim]{s}[/]", highlight=False)),
        )
    emit(result, as_json, _render_pull)


# ------------------------------------------------------------------------------------------ info
def _render_info(con: Console, r: svc.ModelInfo) -> None:
    m = r.model
    t = Table(title=f"model {m.name}", title_justify="left", show_header=False)
    t.add_column("")
    t.add_column("", overflow="fold")
    src = (
        m.source
        + (f" (revision {m.revision})" if m.revision else "")
        + (f", commit {m.commit}" if m.commit else "")
    )
    rows = [
        ("path", m.path),
        ("source", src),
        ("architecture", m.architecture),
        ("parameters", f"{m.parameters:,} ({_params(m.parameters)})"),
        ("quantization", m.quantization),
        ("float dtype", m.dtype),
        ("size on disk", _size(m.size_bytes)),
        ("pulled", m.pulled_at or "-"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    f = Table(title="files", title_justify="left")
    for col in ("file", "size", "sha256"):
        f.add_column(col, overflow="fold")
    for row in r.files:
        f.add_row(row.name, _size(row.size_bytes), row.sha256 or "")
    con.print(f)
    if r.verified is not None:
        con.print(
            "[green]weights match their recorded sha256[/]"
            if r.verified
            else "[red]weights CHANGED since the pull[/]"
        )
    mem = r.memory
    if mem is None:
        con.print(f"[yellow]memory estimate unavailable:[/] {r.memory_error}", highlight=False)
        return
    a = mem.assumptions
    e = Table(
        title=f"training memory estimate ({a['method']}, batch {a['batch_size']} x {a['max_seq_length']} tokens, "
        f"{a['compute_dtype']} on {a['device']}; from {mem.config_path or 'defaults'})",
        title_justify="left",
    )
    e.add_column("part")
    e.add_column("memory", justify="right")
    e.add_row(f"weights ({mem.weights_precision})", _size(mem.weights_bytes))
    e.add_row(f"adapters + gradients ({mem.trainable_parameters:,} trainable)", _size(mem.adapter_bytes))
    e.add_row("optimizer state", _size(mem.optimizer_bytes))
    e.add_row("activations", _size(mem.activation_bytes))
    e.add_row("[bold]total[/]", f"[bold]{_size(mem.total_bytes)}[/]")
    e.add_row("available", _size(mem.available_bytes))
    con.print(e)
    con.print(("[bold green]" if mem.fits else "[bold red]") + mem.verdict + "[/]", highlight=False)
    for tip in mem.advice:
        con.print(f"  - {tip}", highlight=False)


@app.command()
def info(
    ctx: typer.Context,
    name: ModelName,
    verify: Annotated[
        bool, typer.Option("--verify", help="Recompute the sha256 of every weights file.")
    ] = False,
    overrides: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Parameters, files with sha256, and whether training fits in memory with the current train.yml."""
    r = svc.info(get_workspace(ctx), name, verify=verify, overrides=overrides or [])
    emit(r, as_json, _render_info)
    if r.verified is False:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------ rm
def _render_rm(con: Console, r: svc.RemoveResult) -> None:
    con.print(f"removed [bold]{r.name}[/] ({_size(r.freed_bytes)} freed)")
    if r.runs_using:
        con.print(
            f"[yellow]note:[/] runs {', '.join(r.runs_using)} were trained on it; pull it again to use them"
        )


@app.command()
def rm(
    ctx: typer.Context,
    name: ModelName,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a pulled model's folder and its registry row."""
    ws = get_workspace(ctx)
    if not yes:
        rec = svc.get_model(ws, name)
        confirm_delete(f"model {rec.name} ({_size(rec.size_bytes)} at {rec.path})", yes, as_json)
    emit(svc.remove(ws, name), as_json, _render_rm)
