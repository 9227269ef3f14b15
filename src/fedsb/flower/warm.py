"""A warm SuperExec for a SuperNode in process isolation: Flower's own task loop, ClientApps forked.

Flower 1.42 runs every ClientApp message in a fresh `flwr-clientapp` process (Python start-up, then torch,
transformers, the model's modules and ours imported again). Here one long-lived process per SuperNode
imports all of that once (`PRELOAD`), then runs Flower's SuperExec loop (`run_superexec`: AcquireTask on
the SuperNode's Runtime API, its plugin, auth, health server, signal handling) with `ForkExecutor`, whose
`launch` forks a child that calls Flower's `run_clientapp(address, token, ...)`: each message is still one
fresh Flower ClientApp execution (Flower's protocol, context and state handling, exit codes), minus the
process start and the imports. Other task types fall back to Flower's `SubprocessExecutor`.

Fork safety: the parent never runs a torch op (no OpenMP team, no CUDA context exist before a fork; the
child sets its own thread count from the run's config); the child drops the parent's exit handlers and
signal handlers, re-creates the Flower locks a parent thread could have held, reseeds numpy's global RNG,
and gets SIGTERM when the parent dies (PR_SET_PDEATHSIG, and Flower's own parent monitor). It also gets
longer than Flower's 5 s to push its context after the reply (`EXIT_TIMEOUT_S`): under load a push cut
short by that timer silently loses the node's state for the run. The parent
reaps every child (`reconcile`, each poll), logs a non-zero exit code with the task id, and stops its
children when it stops (`close`).

    python -m fedsb.flower.warm --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid <supernode>
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

log = logging.getLogger("fedsb.flower.warm")

#: imported once by the launcher: what a train message of any fedsb run imports (the model families the
#: presets use: Llama for SmolLM2 and the tiny model, BERT for MiniLM)
PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.models.bert.modeling_bert",
    "flwr.supernode.runtime.run_clientapp",
    "fedsb.flower.client_app",
    "fedsb.flower.client",
    "fedsb.flower.secagg",
)
#: set in a forked ClientApp: the launcher's PID (`fedsb.flower.timing` reports it)
FORKED_FROM: list[int] = []
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's: seconds between AcquireTask polls
#: seconds a ClientApp may take to push its context (node state) after its reply before it is killed:
#: Flower's `flwr_exit` allows 5 s, and on a loaded machine the push can take longer, so the node loses
#: the message's `context.state` (a setup that never arrived, `[push-task-output] ClientDisconnect`)
EXIT_TIMEOUT_ENV = "FEDSB_CLIENTAPP_EXIT_TIMEOUT"
EXIT_TIMEOUT_S = 120.0


def preload(modules: Sequence[str] = PRELOAD) -> float:
    """Import `modules` (no torch op is run); return the seconds it took."""
    t0 = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - t0


class ForkExecutor:
    """Flower's `Executor` interface; a ClientApp task runs in a fork of this process."""

    def __init__(self) -> None:
        self.children: dict[int, int] = {}  # pid -> Flower task id
        self.exit_codes: dict[int, int] = {}  # task id -> exit status of its process (reaped)
        self._fallback = SubprocessExecutor()

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, **_: object) -> None:
        del task_type

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns here
            os._exit(_run_child(spec))
        self.children[pid] = spec.task_id
        log.debug("task %d: forked ClientApp process %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children; log the task id of any that failed."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._reaped(pid, os.waitstatus_to_exitcode(status))

    def close(self, timeout: float = 10.0) -> None:
        """SIGTERM every live child, SIGKILL what is left after `timeout`, reap them all."""
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in list(self.children):
            _signal(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._reaped(pid, -signal.SIGKILL)

    def _reaped(self, pid: int, code: int) -> None:
        task = self.children.pop(pid)
        self.exit_codes[task] = code
        if code != 0:
            log.warning("task %d: ClientApp process %d exited with %d", task, pid, code)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _run_child(spec: ExecutionSpec) -> int:
    """In the fork: become a clean ClientApp process and run Flower's `run_clientapp`; its exit status."""
    try:
        _reset_after_fork(spec)
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends every run_clientapp with sys.exit(0 | 1)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything, never return into the parent's loop
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _reset_after_fork(spec: ExecutionSpec) -> None:
    """Drop what belongs to the parent: its signal and exit handlers, locks its threads may have held."""
    FORKED_FROM[:] = [os.getppid()]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent()
    from flwr.supercore import object_ref, telemetry
    from flwr.supercore.exit import exit_handler

    exit_handler.registered_exit_handlers.clear()  # the parent's: close its client, stop its children
    exit_handler._lock_handlers = threading.Lock()
    telemetry.state_lock = threading.Lock()  # a telemetry thread of the parent may have held it
    object_ref._import_lock = threading.Lock()
    exit_module = importlib.import_module("flwr.supercore.exit.exit")  # the module, not its function
    exit_module.FORCE_EXIT_TIMEOUT_SECONDS = float(os.environ.get(EXIT_TIMEOUT_ENV, EXIT_TIMEOUT_S))
    import numpy as np

    np.random.seed()  # fresh entropy, like a fresh process (random reseeds itself at fork)
    if spec.suppress_output:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)


def _die_with_parent() -> None:
    """SIGTERM this process when its parent exits, even by SIGKILL, and name it `flwr-clientapp` (`ps -o
    comm`, /proc/<pid>/comm) (Linux prctl; elsewhere Flower's own parent monitor, started by
    `run_clientapp`, still ends it within 0.2 s)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(b"flwr-clientapp"), 0, 0, 0)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != FORKED_FROM[0]:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def serve(argv: Sequence[str] | None = None) -> None:
    """`flower-superexec`'s options; preload, then Flower's SuperExec loop with `ForkExecutor`."""
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.superexec import run_superexec as flower_loop

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per AcquireTask poll otherwise
    os.environ.setdefault(POLL_ENV, "0.2")  # Flower polls every 1 s: up to 1 s more latency per message
    seconds = preload()
    log.info(
        "fedsb warm SuperExec %d: preloaded %d modules in %.1f s (%d OS threads, no torch op run)",
        os.getpid(),
        len(PRELOAD),
        seconds,
        len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1,
    )
    secret = None
    if args.superexec_auth_secret_file:
        secret = load_superexec_auth_secret(secret_file=args.superexec_auth_secret_file)
    executor = ForkExecutor()
    flower_loop.get_executor = lambda *_a, **_k: executor  # Flower 1.42's one seam for the executor
    flower_loop.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
        health_server_address=args.health_server_address,
        runtime_dependency_install=False,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedsb.flower.warm",
        description="SuperExec for a SuperNode started with --isolation process: imports torch, "
        "transformers and fedsb once, then forks each ClientApp task (Flower's run_clientapp) from itself.",
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    p.add_argument("--insecure", action="store_true", help="Runtime API without TLS (loopback only)")
    p.add_argument("--root-certificates", default=None, help="CA of the Runtime API's TLS certificate")
    p.add_argument("--superexec-auth-secret-file", default=None, help="the SuperNode's SuperExec secret")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) does")
    p.add_argument("--health-server-address", default=None, help="gRPC health server address (no TLS)")
    return p


if __name__ == "__main__":  # run the module proper, so that the ClientApp finds `FORKED_FROM` there
    from fedsb.flower import warm

    warm.serve()
