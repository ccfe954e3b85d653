"""`ft export [RUN] --format gguf|mlx|hf|peft [--quant ...] [--checkpoint ...] [--out PATH]`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ft.cli.common import emit, err_console, get_workspace
from ft.cli.options import CheckpointOpt, JsonOpt, RunArg, command_args
from ft.services import export as svc


def _render(con: Console, r: svc.ExportResult) -> None:
    what = f"{r.run_id} / {r.checkpoint}" if r.run_id else r.base_model
    con.print(
        f"[bold green]exported[/] {what} as [bold]{r.format}[/] ({r.quant}) in {r.seconds:.1f}s",
        highlight=False,
    )
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("folder", r.path)
    if r.main_file:
        t.add_row("file", r.main_file)
    t.add_row(
        "base", f"{r.base_model}" + (" (quantized; dequantized before merging)" if r.base_quantized else "")
    )
    if r.method:
        t.add_row("adapters", f"{r.method}, fused")
    t.add_row("size", f"{r.bytes / 1e6:,.1f} MB in {len(r.files)} files")
    if r.timings:
        t.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    if r.tune_kept is not None:
        t.add_row(
            "tune kept",
            f"{r.tune_kept:.1%} of the tune's effect on the logits"
            + (
                " [bold red](below the required share: written with --allow-drift)[/]"
                if r.drift_allowed
                else ""
            ),
        )
    con.print(t)
    checks = Table(title="verification", title_justify="left", show_header=False)
    checks.add_column()
    checks.add_column(overflow="fold")
    for c in r.checks:
        checks.add_row(
            Text("ok" if c.ok else "FAIL", style="green" if c.ok else "red"), f"[bold]{c.name}[/]: {c.detail}"
        )
    con.print(checks)
    if r.reused:
        con.print("[dim]an earlier export at this destination (pass --force to make it again)[/]")
    if r.pushed:
        p = r.pushed
        con.print(
            f"[bold green]pushed[/] to {p['url']}: {len(p['uploaded'])} files uploaded"
            + (f", {len(p['unchanged'])} already there" if p["unchanged"] else ""),
            highlight=False,
        )
    for tool, cmd in r.commands.items():
        con.print(f"[bold]{tool}:[/] {cmd}", highlight=False, soft_wrap=True)


def _push(ws, result: svc.ExportResult, repo: str, private: bool, progress) -> dict:
    from ft.services.export_push import push_export

    p = push_export(ws, result, repo, private=private, progress=progress)
    return {
        "repo": p.repo_id,
        "url": p.url,
        "commit": p.commit,
        "uploaded": p.uploaded,
        "unchanged": p.unchanged,
    }


def export(
    ctx: typer.Context,
    run: RunArg = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="gguf (llama.cpp, Ollama), mlx (mlx-lm folder), hf (transformers), peft (adapter only).",
        ),
    ] = "gguf",
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            "-q",
            help="f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m | q4_0 (default: q4_k_m for gguf, "
            "made by llama.cpp's quantizer; f16 for mlx and hf; f32 for peft). hf takes float only.",
        ),
    ] = None,
    checkpoint: CheckpointOpt = "best",
    model: Annotated[
        str | None, typer.Option("--model", help="Export a pulled base model (no run, no adapters) instead.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Destination folder (default: runs/<id>/export/<format>-<quant>)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing export at the destination.")
    ] = False,
    push: Annotated[
        str | None,
        typer.Option(
            "--push",
            help="Upload the export and a model card to this Hugging Face repository (OWNER/NAME), "
            "with hf_token from passwords.yml. An existing export at the destination is pushed as it is; "
            "re-running an interrupted push sends only what is missing.",
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the --push repository as private.")
    ] = False,
    imatrix: Annotated[
        bool,
        typer.Option(
            "--imatrix",
            help="Guide llama.cpp's quantizer with an importance matrix measured on the run's own "
            "training data (GGUF at a quantized type).",
        ),
    ] = False,
    allow_drift: Annotated[
        bool,
        typer.Option(
            "--allow-drift",
            help="Write the file even when less of the tune survives than the precision requires "
            "(the measured share goes into the summary and ft_export.json).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a tuned model (adapters fused into the base) for llama.cpp, Ollama, mlx-lm, transformers or PEFT.

    Every export is read back and checked against the MLX model (tensor shapes, logits on a few
    prompts, the tune surviving quantization) before it is reported done; a failed check leaves
    nothing behind.
    """
    ws = get_workspace(ctx)
    # One call either way: a live status line for people, nothing extra on stdout with --json.
    status_cm = contextlib.nullcontext(None) if as_json else err_console().status("exporting…")
    with status_cm as status:
        say = (lambda msg: status.update(msg)) if status is not None else None
        result = svc.export(
            ws,
            **command_args(ctx, "as_json", "push", "private"),
            reuse_existing=push is not None,
            progress=say,
        )
        if push:
            result.pushed = _push(ws, result, push, private, say)
    emit(result, as_json, _render)
