"""Stage processes forked from one interpreter that has already imported the stages' libraries.

Each DVC stage runs as a new `python -m stages NAME` process, and importing torch, diffusers,
peft and pandas takes about 5 s of it (BENCHMARKS.md, "Pipeline overhead"). A stage server
imports those libraries once. For each stage command it forks a process that starts with them
loaded and runs the stage as a new process would. The same goes for the MLflow tracking worker
of each stage (`pgdpo.tracking_worker`), whose import of mlflow the server also does once.

A command finds the server through PGDPO_STAGE_SERVER, the path of the server's Unix socket.
`python -m stages NAME` sends its module, arguments, working folder, environment and its stdin,
stdout and stderr (as file descriptors) to the server. It then forwards SIGINT, SIGTERM and
SIGHUP to the forked process and exits with that process's exit status. When the variable is
unset, or the server is gone or rejects it, the command runs in its own process as before.

The Prefect flow starts a server when it runs more than one stage (flow parameter
`use_stage_server`). Around any other command, for example plain DVC:

    python -m pgdpo.stage_server dvc repro

What keeps a forked process equal to a new one:
- The server imports every stage module, then drops pgdpo's and the stages' own modules from
  `sys.modules`. Each fork imports the project's code again from its working folder, so an edit
  made during a run is picked up as a new process would pick it up. Only third-party modules stay.
- The server rejects a request whose Python executable, interpreter flags or environment differ
  from its own, except for variables read at run time (`DVC_*`, `PGDPO_*` and shell bookkeeping,
  RUNTIME_VARIABLES). A different OMP_NUM_THREADS, PYTHONPATH or torchrun rank therefore runs
  the command in its own process. Variables that the imports set (torch sets
  TORCHINDUCTOR_CACHE_DIR, for example) are set in each fork as its own imports would set them.
- stdin, stdout and stderr are the command's own, rebuilt the way the interpreter builds them.
  Python's `random` and numpy's global generator are reseeded from the OS.

NOTE: every fork shares the server's str hash seed (PYTHONHASHSEED), which a new process would
draw again. No pgdpo output depends on it (tests/test_determinism.py).
NOTE: a process that has initialized CUDA cannot pass it on to forks, so the server stops if the
imports initialized it. Forking stages that then use CUDA has not been run on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import logging
import os
import pkgutil
import random
import runpy
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pgdpo.process import stop_process

# Named, not __name__: the server runs as __main__.
logger = logging.getLogger("pgdpo.stage_server")

SERVER_ENV = "PGDPO_STAGE_SERVER"
# Set in each fork to its own pid, so that the command it runs does not hand itself over again.
FORK_ENV = "PGDPO_STAGE_SERVER_FORK"

# Top-level packages of this repository: the server never keeps them imported.
OWN_PACKAGES = ("pgdpo", "stages", "flows", "bench", "tests")

# Third-party modules that the stages import inside functions, so importing `stages.*` misses
# them (open_clip takes about 2 s, for the reward model and the CLIP scorers).
LAZY_IMPORTS = ("open_clip",)

# Environment variables that may differ between the server and a request: read at run time.
RUNTIME_PREFIXES = ("DVC_", "PGDPO_")
RUNTIME_VARIABLES = ("SHLVL", "PWD", "OLDPWD", "_")

# SIGHUP is missing on Windows, where `python -m stages` must still import this module.
FORWARDED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
HEADER = struct.Struct("!I")
MAX_REQUEST_BYTES = 4 << 20
REQUEST_TIMEOUT_S = 10.0


@dataclass
class Request:
    """A command's request: run `module` as `python -m module *args` in `cwd` with `env`."""

    module: str
    args: list[str]
    cwd: str
    env: dict[str, str]
    executable: str
    flags: list[int]

    @classmethod
    def of_this_process(cls, module: str, args: list[str]) -> Request:
        return cls(module, list(args), os.getcwd(), dict(os.environ), sys.executable, list(sys.flags))


def environment_differences(server: dict[str, str], request: dict[str, str]) -> list[str]:
    """Return the names of variables that differ and are not read at run time."""
    names = set(server) | set(request)
    return sorted(
        name for name in names
        if server.get(name) != request.get(name)
        and not name.startswith(RUNTIME_PREFIXES) and name not in RUNTIME_VARIABLES
    )


# ---------------------------------------------------------------------------------------------
# Client: the command side.


def hand_over(module: str) -> None:
    """Run this command (`python -m module ...`) in a fork of the stage server and exit with its status.

    Returns without doing anything when no server is set, this process is itself a fork, or the
    server cannot take the command: the caller then runs the command itself.
    """
    returncode = run_in_server(module, sys.argv[1:])
    if returncode is not None:
        exit_like(returncode)


def run_in_server(module: str, args: list[str]) -> int | None:
    """Run `python -m module *args` in a process forked by the stage server; return its exit status.

    Returns None when no server is set or it cannot take the command, so the caller runs it
    itself. A negative status means the process died of that signal, as in `subprocess`.
    """
    path = os.environ.get(SERVER_ENV)
    if not path or os.environ.get(FORK_ENV) == str(os.getpid()):
        return None

    request = Request.of_this_process(module, args)
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(path)
    except OSError as error:
        logger.warning("stage server at %s=%s is unreachable (%s); running `python -m %s` in this process",
                       SERVER_ENV, path, error, module)
        return None

    with connection, connection.makefile("rb") as replies:
        payload = json.dumps(request.__dict__).encode()
        message = HEADER.pack(len(payload)) + payload
        try:
            sent = socket.send_fds(connection, [message], [0, 1, 2])
            connection.sendall(message[sent:])
            reply = _read_reply(replies)
        except OSError as error:
            reply = {"rejected": f"sending the request failed: {error}"}
        if reply is None or "rejected" in reply:
            reason = "it closed the connection" if reply is None else reply["rejected"]
            logger.warning("stage server %s did not run `python -m %s`: %s; running it in this process",
                           path, module, reason)
            return None

        pid = reply["pid"]
        for number in FORWARDED_SIGNALS:
            signal.signal(number, lambda received, frame: _forward(pid, received))
        result = _read_reply(replies)
    if result is None:
        logger.error("stage server %s closed the connection while process %d ran `python -m %s`; "
                     "see the server's log for why", path, pid, module)
        return 1
    return result["returncode"]


def _forward(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)


def _read_reply(replies) -> dict | None:
    line = replies.readline()
    return json.loads(line) if line else None


def exit_like(returncode: int) -> None:
    """Exit this process with `returncode`; a negative one dies of the same signal."""
    if returncode < 0:
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    sys.exit(returncode if returncode >= 0 else 128 - returncode)


# ---------------------------------------------------------------------------------------------
# Server.


def preload(folder: Path) -> int:
    """Import every stage module of `folder`, LAZY_IMPORTS and the tracking worker, then drop the project's own modules.

    Returns how many third-party modules stay imported. A module that fails to import is logged
    and skipped: its stage then imports it in the fork, as a new process would.
    """
    stages = sorted(module.name for module in pkgutil.iter_modules([str(folder / "stages")]) if module.name != "__main__")
    for name in [*(f"stages.{stage}" for stage in stages), *LAZY_IMPORTS, "pgdpo.tracking_worker"]:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any import error: the fork meets it again and reports it
            logger.warning("stage server: could not import %s (%s: %s); its stage imports it itself",
                           name, type(error).__name__, error)
    # What a tracking worker imports before it opens a run: mlflow, its SQL store and DVC.
    if "pgdpo.tracking_worker" in sys.modules:
        sys.modules["pgdpo.tracking_worker"].import_ahead()

    for name in [name for name in sys.modules if name.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]
    return len(sys.modules)


@dataclass
class _Child:
    connection: socket.socket | None
    label: str
    started: float


class StageServer:
    """Accept requests on `listener` and fork one process per request; one thread, driven by select."""

    def __init__(self, listener: socket.socket, environment: dict[str, str]):
        self.listener = listener
        # The environment the server started with. Imports change some variables (torch sets
        # TORCHINDUCTOR_CACHE_DIR, for example), and each fork gets those changes on top of its
        # command's environment, as if its own imports had made them.
        self.environment = environment
        self.import_changes = {
            name: os.environ.get(name) for name in set(environment) | set(os.environ)
            if environment.get(name) != os.environ.get(name)
        }
        self.flags = list(sys.flags)
        self.children: dict[int, _Child] = {}
        self.stopping = False
        self.parent = os.getppid()
        self.selector = selectors.DefaultSelector()
        # Signals wake the select call through this pair (signal.set_wakeup_fd).
        self.wake_read, self.wake_write = socket.socketpair()

    def rejection(self, request: Request) -> str | None:
        """Return why the server cannot run `request` like a new process would, or None."""
        if request.executable != sys.executable:
            return f"its Python is {request.executable}, the server's is {sys.executable}"
        if request.flags != self.flags:
            return f"its interpreter flags {request.flags} differ from the server's {self.flags}"
        # A command started by a fork (a stage's tracking worker) carries the import changes.
        differences = [
            name for name in environment_differences(self.environment, request.env)
            if name not in self.import_changes or request.env.get(name) != self.import_changes[name]
        ]
        if differences:
            return f"environment variables differ from the server's: {', '.join(differences)}"
        return None

    def serve(self) -> tuple[Request, list[int]] | None:
        """Serve until SIGTERM. Returns None in the server, and the request with its descriptors in a fork."""
        for descriptor in (self.wake_read, self.wake_write):
            descriptor.setblocking(False)
        signal.set_wakeup_fd(self.wake_write.fileno())
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_read, selectors.EVENT_READ)

        while not self.stopping:
            for key, _ in self.selector.select(timeout=1.0):
                if key.fileobj is self.listener:
                    forked = self._accept()
                    if forked is not None:
                        return forked
                elif key.fileobj is self.wake_read:
                    with contextlib.suppress(BlockingIOError):
                        self.wake_read.recv(4096)
                else:
                    self._client_readable(key.data)
            self._reap()
            if os.getppid() != self.parent:
                logger.warning("stage server: the process that started it exited; stopping")
                self.stopping = True

        self._stop_children()
        return None

    def _stop(self, number, frame) -> None:
        self.stopping = True

    def _accept(self) -> tuple[Request, list[int]] | None:
        connection, _ = self.listener.accept()
        try:
            request, descriptors = self._receive(connection)
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.error("stage server: dropped a request it could not read: %s", error)
            connection.close()
            return None

        reason = self.rejection(request)
        if reason is not None:
            logger.info("stage server: rejected `python -m %s` from %s: %s", request.module, request.cwd, reason)
            with contextlib.suppress(OSError):
                connection.sendall(_line({"rejected": reason}))
            _close_all(descriptors)
            connection.close()
            return None

        if _closed(connection):
            # The command was killed while it waited for the server, as when a flow's timeout
            # stops a stage before the server has finished its imports.
            logger.info("stage server: the command `python -m %s` went away before it started", request.module)
            _close_all(descriptors)
            connection.close()
            return None

        label = " ".join(["python -m", request.module, *request.args])
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:
            self._become_child(connection)
            request.env = self.fork_environment(request.env)
            return request, descriptors

        _close_all(descriptors)
        self.children[pid] = _Child(connection, label, time.monotonic())
        logger.info("stage server: process %d runs `%s` in %s", pid, label, request.cwd)
        try:
            connection.sendall(_line({"pid": pid}))
        except OSError:
            self._client_gone(pid)
            return None
        self.selector.register(connection, selectors.EVENT_READ, pid)
        return None

    def fork_environment(self, env: dict[str, str]) -> dict[str, str]:
        """Return a command's environment `env` with the changes the server's imports made to its own."""
        changed = {**env, **{name: value for name, value in self.import_changes.items() if value is not None}}
        return {name: value for name, value in changed.items() if self.import_changes.get(name, "") is not None}

    def _receive(self, connection: socket.socket) -> tuple[Request, list[int]]:
        connection.settimeout(REQUEST_TIMEOUT_S)
        data, descriptors, _, _ = socket.recv_fds(connection, 65536, 3)
        if len(descriptors) != 3:
            _close_all(descriptors)
            raise ValueError(f"expected stdin, stdout and stderr as 3 file descriptors, got {len(descriptors)}")
        if len(data) < HEADER.size:
            _close_all(descriptors)
            raise ValueError(f"request shorter than its {HEADER.size}-byte header")
        (size,) = HEADER.unpack_from(data)
        if size > MAX_REQUEST_BYTES:
            _close_all(descriptors)
            raise ValueError(f"request of {size} bytes is over the limit of {MAX_REQUEST_BYTES}")
        payload = data[HEADER.size:]
        while len(payload) < size:
            chunk = connection.recv(size - len(payload))
            if not chunk:
                _close_all(descriptors)
                raise ValueError(f"request ended after {len(payload)} of {size} bytes")
            payload += chunk
        connection.settimeout(None)
        return Request(**json.loads(payload)), descriptors

    def _client_readable(self, pid: int) -> None:
        # A command sends nothing after its request, so readable means it closed the connection.
        child = self.children.get(pid)
        if child is None or child.connection is None:
            return
        with contextlib.suppress(OSError):
            if child.connection.recv(1):
                return
        self._client_gone(pid)

    def _client_gone(self, pid: int) -> None:
        """Kill process `pid`, whose command died without waiting for it (the command was killed)."""
        child = self.children[pid]
        logger.warning("stage server: the command of process %d (`%s`) went away; killing the process",
                       pid, child.label)
        self._close_connection(child)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _close_connection(self, child: _Child) -> None:
        if child.connection is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.connection)
            child.connection.close()
            child.connection = None

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            returncode = os.waitstatus_to_exitcode(status)
            logger.info("stage server: process %d (`%s`) exited with %d after %.1f s",
                        pid, child.label, returncode, time.monotonic() - child.started)
            if child.connection is not None:
                with contextlib.suppress(OSError):
                    child.connection.sendall(_line({"returncode": returncode}))
                self._close_connection(child)

    def _stop_children(self) -> None:
        for pid, child in self.children.items():
            logger.warning("stage server: stopping; killing process %d (`%s`)", pid, child.label)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            pid, _ = os.waitpid(-1, 0)
            child = self.children.pop(pid, None)
            if child is not None:
                self._close_connection(child)

    def _become_child(self, connection: socket.socket) -> None:
        """In the fork: drop the server's signal handlers, sockets and the other commands' connections."""
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        for child in self.children.values():
            if child.connection is not None:
                child.connection.close()
        for descriptor in (self.listener, self.wake_read, self.wake_write, connection):
            descriptor.close()


def _closed(connection: socket.socket) -> bool:
    """Return True when the other end has closed `connection` (it sends nothing after its request)."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _line(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _close_all(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            os.close(descriptor)


def run_forked(request: Request, descriptors: list[int]) -> None:
    """In the fork: take over the command's streams, folder and environment, then run its module."""
    for target, descriptor in enumerate(descriptors):
        os.dup2(descriptor, target)
    _close_all([descriptor for descriptor in descriptors if descriptor > 2])
    _rebuild_standard_streams()

    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    os.environ[FORK_ENV] = str(os.getpid())
    sys.argv = ["-m", *request.args]
    # `python -m` puts the working folder first on sys.path.
    sys.path[0] = request.cwd
    importlib.invalidate_caches()

    # The stage sets up logging itself; basicConfig does nothing while the root logger has handlers.
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()

    runpy.run_module(request.module, run_name="__main__", alter_sys=True)


def _rebuild_standard_streams() -> None:
    """Make sys.stdin, stdout and stderr wrap descriptors 0 to 2 the way a new interpreter would."""
    encoding, errors = sys.stdout.encoding, sys.stdout.errors

    def text(descriptor: int, mode: str, line_buffering: bool, stream_errors: str) -> io.TextIOWrapper:
        raw = io.FileIO(descriptor, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, errors=stream_errors, line_buffering=line_buffering)

    sys.stdin = text(0, "r", False, errors)
    sys.stdout = text(1, "w", os.isatty(1), errors)
    # As in a new interpreter, stderr is line buffered and escapes characters it cannot encode.
    sys.stderr = text(2, "w", True, "backslashreplace")


def serve_on(descriptor: int, folder: Path) -> tuple[Request, list[int]] | None:
    """Run a server on the listening socket `descriptor`: preload, then serve until SIGTERM."""
    listener = socket.socket(fileno=descriptor)
    environment = dict(os.environ)
    started = time.perf_counter()
    modules = preload(folder)

    # Keep the preloaded objects out of every collection, so forks neither scan nor copy them.
    gc.collect()
    gc.freeze()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        logger.error("stage server: the imports initialized CUDA, which forks cannot use; stopping")
        return None
    threads = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    if threads:
        logger.error("stage server: the imports started threads %s, which a fork would not have; stopping", threads)
        return None
    logger.info("stage server: %d modules imported in %.1f s, serving on %s",
                modules, time.perf_counter() - started, listener.getsockname())
    return StageServer(listener, environment).serve()


@contextlib.contextmanager
def stage_server(folder: str | Path = ".", env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Run a stage server for the project in `folder` while the block runs.

    Yields the variables that point commands at it ({PGDPO_STAGE_SERVER: socket path}); add them
    to the environment of the commands. `env` is the environment of those commands, which the
    server must share (default: this process's).
    """
    socket_folder = tempfile.mkdtemp(prefix="pgdpo-stage-server-")
    path = os.path.join(socket_folder, "socket")
    # The socket listens before the server starts, so a command that connects early waits in
    # the backlog while the server imports.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    server_env = {name: value for name, value in (env or os.environ).items() if name != SERVER_ENV}
    command = [sys.executable, "-m", "pgdpo.stage_server", "--serve-fd", str(listener.fileno())]
    # Its own session: a Ctrl-C in the terminal reaches the forks only through their commands.
    process = subprocess.Popen(command, cwd=folder, env=server_env, stdin=subprocess.DEVNULL,
                               pass_fds=[listener.fileno()], start_new_session=True)
    listener.close()
    try:
        yield {SERVER_ENV: path}
    finally:
        stop_process(process, grace_s=30)
        shutil.rmtree(socket_folder, ignore_errors=True)


def run_command(command: list[str]) -> int:
    """Run `command` with a stage server for the current folder; return its exit status."""
    with stage_server() as variables:
        process = subprocess.Popen(command, env={**os.environ, **variables})
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                # The command got the same Ctrl-C and decides when to stop.
                continue


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pgdpo.stage_server",
        description="Run COMMAND (for example `dvc repro`) with a stage server: each `python -m stages NAME` "
                    "it starts runs in a process forked from an interpreter that has already imported "
                    "torch, diffusers and mlflow.",
    )
    parser.add_argument("--serve-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, for example: dvc repro")
    args = parser.parse_args()

    if args.serve_fd is None:
        if not args.command:
            parser.error("give the command to run, for example: python -m pgdpo.stage_server dvc repro")
        exit_like(run_command(args.command))
        return

    from pgdpo.logs import setup_logging

    setup_logging()
    forked = serve_on(args.serve_fd, Path.cwd())
    if forked is not None:
        run_forked(*forked)


if __name__ == "__main__":
    main()
