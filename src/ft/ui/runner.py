"""`python -m ft.ui.runner JOB_DIR`: run one queued `ft` command of the dashboard, detached from `ft ui`.

The runner is the leader of its own session (``ft ui`` starts it with ``start_new_session``), so closing
the page or restarting ``ft ui`` leaves it running. It starts ``python -m ft --workspace WS ARGS --json``,
writes the child's pid to ``child.pid`` (the registry records the same pid for a training run, which is how
the dashboard finds a job's run), its stdout to ``stdout.json``, its stderr to ``output.log``, and at the
end ``exit.json`` (exit code and time) atomically. SIGINT/SIGTERM to the session reach the child (``ft
train`` then saves and stops); the runner itself waits for the child either way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from ft.workspace.atomic import atomic_write_json, atomic_write_text


def main(job_dir: str) -> int:
    folder = Path(job_dir)
    spec = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    # A handler (not SIG_IGN, which the child would inherit): the child gets its default handlers back.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    cmd = [sys.executable, "-m", "ft", "--workspace", spec["workspace"], *spec["args"], "--json"]
    with (folder / "stdout.json").open("wb") as out, (folder / "output.log").open("wb") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        atomic_write_text(folder / "child.pid", str(child.pid))
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                time.sleep(0.1)
    atomic_write_json(folder / "exit.json", {"exit_code": rc, "finished_at": datetime.now(UTC).isoformat()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
