"""The terminal belongs to the trainer: unless run.verbose, third-party output goes to a log file in the run folder.

Routed to the file: vLLM (in this process and in the engine-core / worker processes it spawns), megatron,
transformers, torch's C++ warnings, Python warnings, anything a library prints from a child process. Left on the
terminal: the trainer's own `print`s, tracebacks and the progress bar (metrics.py).

How: file descriptors 1 and 2, which every child process inherits and C/C++ code writes to, point at the log
file; Python's sys.stdout / sys.stderr become new streams on duplicates of the terminal's descriptors, so `print`,
tracebacks and rich keep reaching the person. Python code that writes through logging or through the original
streams is pointed at the file: the root logger gets a handler on descriptor 2, warnings are logged, vLLM's
handler writes to sys.__stdout__ (VLLM_LOGGING_STREAM, inherited by its processes too) and transformers' loggers
propagate to the root instead of keeping their own stderr handler.

The run folder must not be written before the config and the data pass their checks (train.setup), so the output
is buffered in a temporary file first and moved into RUN_DIR/logs by `move_to_run_dir` once the folder exists.
File descriptors are process-wide, hence one module-level `_active` routing per process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOG_DIR = "logs"

_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def log_name(rank: int) -> str:
    """The third-party log of global rank `rank` under RUN_DIR/logs (each rank's engines write their own)."""
    return "third_party.log" if rank == 0 else f"third_party.rank{rank}.log"


class ThirdPartyLog:
    """The routing of one process while it is active (`start` .. `stop`); `path` is where the output goes now."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="dynamo-mega-", suffix=".log")
        self.path = Path(name)  # a temporary buffer until `move_to`
        self.moved = False
        self._buffer_fd = fd
        self._undo: list = []  # callables restoring what `start` changed, run in reverse order by `stop`

    def start(self) -> None:
        _flush_all()
        terminal = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self._buffer_fd, fd)
        saved_streams = sys.stdout, sys.stderr
        mine = _terminal_stream(terminal[0], sys.stdout), _terminal_stream(terminal[1], sys.stderr)
        sys.stdout, sys.stderr = mine

        def restore_terminal() -> None:
            _flush_all()
            for fd, dup in zip((1, 2), terminal, strict=True):
                os.dup2(dup, fd)
            for stream in mine:
                stream.close()  # and the duplicates with them
            sys.stdout, sys.stderr = saved_streams

        self._undo.append(restore_terminal)
        self._route_logging()
        self._route_vllm()
        self._route_transformers()

    def _route_logging(self) -> None:
        # A stream on descriptor 2 itself (not a duplicate), so it follows `move_to`'s dup2.
        stream = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(_FORMAT))
        root = logging.getLogger()
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)  # the file may hold what the terminal never showed
        logging.captureWarnings(True)

        def restore() -> None:
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(level)
            stream.close()

        self._undo.append(restore)

    def _route_vllm(self) -> None:
        # vLLM resolves its handler's stream when it configures logging (at import, in this process and in each
        # of its spawned processes): the original stdout, i.e. descriptor 1, wherever sys.stdout points by then.
        old = os.environ.get("VLLM_LOGGING_STREAM")
        os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.__stdout__"

        def restore() -> None:
            if old is None:
                os.environ.pop("VLLM_LOGGING_STREAM", None)
            else:
                os.environ["VLLM_LOGGING_STREAM"] = old

        self._undo.append(restore)

    def _route_transformers(self) -> None:
        # transformers gives its loggers a StreamHandler bound to sys.stderr when it is first imported, which
        # may be after `start`, i.e. the terminal: use the root logger's handler instead.
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()

        def restore() -> None:
            hf_logging.disable_propagation()
            hf_logging.enable_default_handler()

        self._undo.append(restore)

    def move_to(self, log_dir: Path, rank: int, command: str) -> Path:
        """Continue in LOG_DIR/third_party[.rankN].log (appended: a resumed run keeps its history), with what
        was buffered so far copied first. Processes spawned from now on write there too."""
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / log_name(rank)
        _flush_all()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, f"===== dynamo-mega {command}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        with open(self.path, "rb") as buffered:
            while chunk := buffered.read(1 << 20):
                os.write(fd, chunk)
        for target in (1, 2):
            os.dup2(fd, target)
        os.close(fd)
        os.close(self._buffer_fd)
        self.path.unlink(missing_ok=True)
        self.path, self.moved, self._buffer_fd = path, True, None
        return path

    def stop(self, *, keep_buffer: bool) -> None:
        """Undo `start`. An unmoved buffer is deleted unless `keep_buffer` (a crash before the run folder
        existed: the person is told its path)."""
        while self._undo:
            self._undo.pop()()
        if self._buffer_fd is not None:
            os.close(self._buffer_fd)
            self._buffer_fd = None
            if not keep_buffer:
                self.path.unlink(missing_ok=True)


_active: ThirdPartyLog | None = None


@contextlib.contextmanager
def third_party_to_log(enabled: bool) -> Iterator[ThirdPartyLog | None]:
    """Route third-party output to a log file while the block runs (enabled), or change nothing (run.verbose).
    Yields the routing, or None. On an exception the buffer of a run that never reached its folder is kept."""
    global _active
    if not enabled:
        yield None
        return
    assert _active is None, "third-party output is already routed"
    routing = ThirdPartyLog()
    routing.start()
    _active = routing
    failed = False
    try:
        yield routing
    except BaseException:
        failed = True
        raise
    finally:
        _active = None
        routing.stop(keep_buffer=failed)


def move_to_run_dir(run_dir: Path, rank: int, command: str = "train") -> None:
    """Called once RUN_DIR may be written for this rank (train.setup, eval.runner.run_eval): the routed output
    continues in RUN_DIR/logs. Does nothing when output is not routed (run.verbose, or called from Python)."""
    if _active is not None and not _active.moved:
        _active.move_to(Path(run_dir) / LOG_DIR, rank, command)


def _terminal_stream(fd: int, like):
    """A text stream on descriptor `fd` (a duplicate of the terminal) encoding like the stream it replaces."""
    encoding = getattr(like, "encoding", None) or "utf-8"
    errors = getattr(like, "errors", None) or "backslashreplace"
    return open(fd, "w", buffering=1, encoding=encoding, errors=errors)  # noqa: SIM115 - closed by `stop`


def _flush_all() -> None:
    """Python-level buffers go out before a descriptor changes target, so nothing lands in the wrong place."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
