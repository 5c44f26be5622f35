"""How the client shows progress: byte transfers (uploads, downloads) and jobs.

`progress=True` picks a rich progress bar when the stream (stderr unless told) is a terminal and plain lines
otherwise; `False` shows nothing; a `Reporter` instance (e.g. `Lines(sys.stdout)`) is used as given.
"""

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from api.schemas import JobOut


class Transfer:
    """One transfer of `total` bytes (None when unknown)."""

    def advance(self, size: int) -> None:
        """`size` more bytes went through."""

    def update(self, completed: int) -> None:
        """`completed` bytes are through (a resumed transfer starts at its offset, a restart at 0)."""

    def close(self) -> None:
        """The transfer ended (done or given up)."""


class Reporter:
    """Shows transfers and job updates; the base class shows nothing. Use as a context manager, or call close()."""

    def transfer(self, description: str, total: int | None) -> Transfer:
        return Transfer()

    def job(self, job: "JobOut") -> None:
        """A new snapshot of a job being watched."""

    def note(self, text: str) -> None:
        """A line of information (which upload id resumes, where a file went)."""

    def close(self) -> None:
        """Stop showing anything (a later call starts again)."""

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


Silent = Reporter
ProgressArg = bool | Reporter


def job_line(job: "JobOut") -> str:
    return f"  {job.status:<9} {job.progress * 100:5.1f}%  {job.message or ''}"


class _LineTransfer(Transfer):
    def __init__(self, stream: TextIO, description: str, total: int | None) -> None:
        self.stream, self.description, self.total = stream, description, total
        self.completed, self.shown = 0, -1
        self._show()

    def advance(self, size: int) -> None:
        self.update(self.completed + size)

    def update(self, completed: int) -> None:
        self.completed = completed
        self._show()

    def _show(self) -> None:
        if not self.total:
            return
        decile = min(10, self.completed * 10 // self.total)
        if decile != self.shown:
            self.shown = decile
            print(f"{self.description}: {decile * 10:3d}% ({_size(self.completed)} of {_size(self.total)})",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if not self.total:
            print(f"{self.description}: {_size(self.completed)}", file=self.stream, flush=True)


class Lines(Reporter):
    """Plain lines, for logs and pipes: a transfer every 10 %, a job whenever its status, progress or message
    changes (`  running    42.0%  step 1/2 quantize`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.last: str | None = None

    def transfer(self, description: str, total: int | None) -> Transfer:
        return _LineTransfer(self.stream, description, total)

    def job(self, job: "JobOut") -> None:
        line = job_line(job)
        if line != self.last:
            print(line, file=self.stream, flush=True)
            self.last = line

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class _RichTransfer(Transfer):
    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, size: int) -> None:
        self.progress.update(self.task, advance=size)

    def update(self, completed: int) -> None:
        self.progress.update(self.task, completed=completed)

    def close(self) -> None:
        self.progress.stop_task(self.task)


class Rich(Reporter):
    """Progress bars on a terminal (rich): bytes, speed and time left for transfers; percent, step and elapsed
    time for a job."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr)
        self.transfers: Any = None
        self.jobs: Any = None
        self.job_tasks: dict[str, Any] = {}

    def _transfers(self) -> Any:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if self.transfers is None:
            self._stop_jobs()  # rich draws one live display at a time
            self.transfers = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self.transfers.start()
        return self.transfers

    def _jobs(self) -> Any:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        if self.jobs is None:
            self._stop_transfers()
            self.jobs = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[message]}"), console=self.console)
            self.jobs.start()
        return self.jobs

    def transfer(self, description: str, total: int | None) -> Transfer:
        progress = self._transfers()
        return _RichTransfer(progress, progress.add_task(description, total=total))

    def job(self, job: "JobOut") -> None:
        progress = self._jobs()
        description = f"{job.id} {job.status}"
        if job.id not in self.job_tasks:
            self.job_tasks[job.id] = progress.add_task(description, total=1.0, message="")
        progress.update(self.job_tasks[job.id], description=description, completed=job.progress,
                        message=job.message or "")

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def _stop_transfers(self) -> None:
        if self.transfers is not None:
            self.transfers.stop()
            self.transfers = None

    def _stop_jobs(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()
            self.jobs = None
            self.job_tasks = {}

    def close(self) -> None:
        self._stop_transfers()
        self._stop_jobs()


def reporter(progress: "ProgressArg", stream: TextIO | None = None) -> Reporter:
    """The reporter for a `progress` argument: a Reporter as given; True: rich on a terminal, lines otherwise;
    False: nothing."""
    if isinstance(progress, Reporter):
        return progress
    if not progress:
        return Silent()
    stream = stream or sys.stderr
    return Rich(stream) if stream.isatty() else Lines(stream)


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"
