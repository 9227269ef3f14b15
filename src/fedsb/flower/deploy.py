"""A loopback deployment: one SuperLink and N SuperNodes as separate processes, TLS and node auth on.

Used by the deployment tests and the benchmark, and runnable by hand (`python -m fedsb.flower.deploy
--help`). Every process is started here, its PID recorded at spawn, and stopped by that PID (with the
ServerApp/ClientApp processes they spawned, found through /proc); nothing is ever killed by name.

`main` refuses a config the Flower path cannot honour before any process starts, stops everything it
started on SIGINT, SIGTERM, SIGHUP or any error, and exits non-zero (printing the ServerApp's error) unless
Flower reports the run `finished:completed`: `flwr run --stream` itself exits 0 when the ServerApp fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsb.flower.certs import make_node_keys, make_tls

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "fedsb-local"
ACTIVATED = "SuperNode ID: "  # what a SuperNode logs once the SuperLink let it in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, *, own_local_superlink: bool = False) -> dict[str, str]:
    """Environment for flwr commands: our venv first on PATH, a private FLWR_HOME, nothing downloaded.

    `own_local_superlink`: give `flwr run ... local` free ports for its managed SuperLink. By default it
    uses 127.0.0.1:39091/39093 and silently reuses ANY SuperLink already answering there (another user's,
    another test's), so concurrent runs would share one.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    if own_local_superlink:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    return env


def descendants(pid: int) -> list[int]:
    """PIDs of a process's children, grandchildren, ... (Linux /proc), deepest first."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out.extend(descendants(kid))
            out.append(kid)
    return out


def adopted(pid: int) -> list[int]:
    """Processes started with `--parent-pid <pid>` (Flower's SuperExec and app processes) and their
    descendants: when their parent exits first they are re-parented to init and no longer its descendants."""
    out: list[int] = []
    for p in pids_mentioning(f"--parent-pid\0{pid}\0"):
        out.extend([*descendants(p), p])
    return out


def stop_pid(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (e.g. a private FLWR_HOME: `flwr run` starts its local
    SuperLink detached, with --database and --log-file under FLWR_HOME)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text.encode() in (proc / "cmdline").read_bytes():
                out.append(int(proc.name))
        except OSError:
            continue
    return out


def stop_local_superlink(flwr_home: Path, timeout: float = 15.0) -> list[int]:
    """Stop what `flwr run ... local` left running under `flwr_home`, by PID; return the PIDs stopped."""
    roots = pids_mentioning(str(flwr_home))
    targets = [*roots, *(kid for pid in roots for kid in [*descendants(pid), *adopted(pid)])]
    for pid in roots:
        stop_pid(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        Path(f"/proc/{p}").exists() and not is_zombie(p) for p in targets
    ):
        time.sleep(0.2)
    for pid in targets:
        if Path(f"/proc/{pid}").exists() and not is_zombie(pid):
            stop_pid(pid, signal.SIGKILL)
    return targets


def wait_gone(pids: Sequence[int], timeout: float = 10.0) -> None:
    """Wait until every PID has exited (gone, or a zombie awaiting its parent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not is_zombie(p) for p in pids):
        time.sleep(0.1)


def process_tree(pids: Sequence[int]) -> list[int]:
    """`pids`, their descendants and the processes started with `--parent-pid` of any of them, transitively
    (Flower's SuperExec, ServerApp and ClientApp processes outlive their parents as orphans of init)."""
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(p for p in [*descendants(pid), *adopted(pid)] if p not in seen)
    return seen


def is_zombie(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


class LocalDeployment:
    """SuperLink (TLS, SuperNode auth) + `num_nodes` SuperNodes on 127.0.0.1; a context manager."""

    def __init__(
        self,
        num_nodes: int,
        workdir: Path | None = None,
        *,
        node_ready_timeout: float = 60.0,
        node_env: Mapping[int, Mapping[str, str]] | None = None,
        warm: bool = True,
    ) -> None:
        self.num_nodes = num_nodes
        #: SuperNodes in process isolation, each served by a warm SuperExec (`fedsb.flower.warm`: torch and
        #: fedsb imported once, every ClientApp a fork); False: Flower's default (a fresh process a message)
        self.warm = warm
        self.node_env = {i: dict(env) for i, env in (node_env or {}).items()}  # extra env of SuperNode i
        self.node_keys: dict[int, Path] = {}  # SuperNode i -> its registered private key
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fedsb-flower-")
        self.root = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.env = flower_env(self.home)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # name -> process (PID recorded at spawn)
        self.node_ready_timeout = node_ready_timeout
        self.last_status: dict[str, Any] = {}  # Flower's record of the last run_app's run (run_status)

    # ---- start ----------------------------------------------------------------------------------------------
    def _spawn(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None, *, log_name: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` as process `name`, its output appended to logs/<log_name or name>.log."""
        log = open(self.logs / f"{log_name or name}.log", "ab")  # noqa: SIM115 - kept open for the process's life
        env = {**self.env, **(env or {})}
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        self.procs[name] = proc
        return proc

    def _flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> LocalDeployment:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        tls = make_tls(self.root / "tls")
        self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile", str(tls.ca_cert),
                "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.port),
            ],
        )  # fmt: skip
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{tls.ca_cert}"\n'
        )
        self._wait_port(self.port, "superlink")
        for i in range(self.num_nodes):
            private, public = make_node_keys(self.root / "keys", f"node{i}")
            self._register(public)
            self.node_keys[i] = private
            self.add_supernode(f"supernode{i}", private, partition_id=i)
        return self

    def add_supernode(self, name: str, private_key: Path, *, partition_id: int) -> subprocess.Popen[bytes]:
        """Start a SuperNode that authenticates with `private_key` (registered beforehand, or refused);
        SuperNode i gets `node_env[i]` on top of the deployment's environment. With `warm`, the SuperNode
        runs in process isolation and its warm SuperExec (`<name>-superexec`) is started beside it."""
        env = self.node_env.get(partition_id) if name.startswith("supernode") else None
        runtime_port = free_port()
        cmd = [
            "flower-supernode",
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.root / "tls" / "ca.crt"),
            "--auth-supernode-private-key", str(private_key),
            "--node-config", f"partition-id={partition_id} num-partitions={self.num_nodes}",
            "--port", str(runtime_port),
        ]  # fmt: skip
        if not self.warm:
            return self._spawn(name, cmd, env=env)
        previous = self.procs.get(f"{name}-superexec")  # of a SuperNode that exited (refused, killed)
        if previous is not None and previous.poll() is None:
            stop_pid(previous.pid)
            previous.wait(timeout=10)
        secret = self.root / "keys" / f"{name}-superexec.secret"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        auth = ["--superexec-auth-secret-file", str(secret)]
        node = self._spawn(name, [*cmd, "--isolation", "process", *auth], env=env)
        self._spawn(
            f"{name}-superexec",
            [
                sys.executable, "-m", "fedsb.flower.warm",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                "--insecure", "--parent-pid", str(node.pid), *auth,
            ],
            env=env,
            log_name=name,  # its ClientApps' output in the SuperNode's log, as with Flower's own SuperExec
        )  # fmt: skip
        return node

    def superexec_pids(self) -> dict[int, int]:
        """Partition id -> PID of its SuperNode's live warm SuperExec (empty without `warm`)."""
        out = {}
        for name, proc in self.procs.items():
            if name.endswith("-superexec") and proc.poll() is None:
                out[int(name.removeprefix("supernode").removesuffix("-superexec"))] = proc.pid
        return out

    def _wait_port(self, port: int, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {self.procs[name].returncode}: {self.log(name)[-2000:]}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not open port {port} within {timeout:g} s")

    def _register(self, public_key: Path) -> None:
        deadline = time.monotonic() + 30
        while True:
            res = self._flwr("supernode", "register", str(public_key), CONNECTION)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")
            time.sleep(0.5)

    # ---- use ------------------------------------------------------------------------------------------------
    def start_app(self, run_config: Mapping[str, Any], *, app: Path = APP_DIR) -> subprocess.Popen[str]:
        """Start `flwr run <app> fedsb-local --stream` with `run_config` (TOML values); output to a pipe."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        proc = subprocess.Popen(
            ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", items],
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs[f"flwr-run-{len(self.procs)}"] = proc  # type: ignore[assignment]
        return proc

    def run_app(
        self, run_config: Mapping[str, Any], *, app: Path = APP_DIR, timeout: float = 600.0
    ) -> tuple[int, str]:
        """Run the app to completion: (exit code, streamed log). The exit code is `flwr run`'s unless the
        run did not finish `completed` (Flower's own status, `flwr ls`): then 1, or `flwr run`'s if non-zero."""
        proc = self.start_app(run_config, app=app)
        out, _ = proc.communicate(timeout=timeout)
        status, deadline = self.run_status(out), time.monotonic() + 30
        while status.get("status") in ("pending", "starting", "running") and time.monotonic() < deadline:
            time.sleep(0.5)  # the log stream can end a moment before the run's status is final
            status = self.run_status(out)
        self.last_status = status
        if proc.returncode == 0 and status.get("status") != "finished:completed":
            return 1, out
        return proc.returncode, out

    def run_status(self, log: str) -> dict[str, Any]:
        """Flower's record of the run whose id `flwr run` printed in `log` (`flwr ls --format json`):
        status (`finished:completed`, `finished:failed`, ...) and status-details; {} if none is found."""
        found = re.search(r"Successfully started run (\d+)", log)
        if not found:
            return {}
        res = self._flwr("ls", CONNECTION, "--run-id", found.group(1), "--format", "json", timeout=60)
        try:
            runs = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
        except (ValueError, KeyError):
            return {"status": "unknown", "status-details": (res.stdout + res.stderr)[-500:]}
        return runs[0] if runs else {}

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode i, its warm SuperExec and whatever they spawned (a dead machine, not a clean
        shutdown)."""
        procs = [p for p in (self.procs.get(f"supernode{i}"), self.procs.get(f"supernode{i}-superexec")) if p]
        pids = [pid for proc in procs for pid in [*descendants(proc.pid), proc.pid]]
        for pid in pids:
            stop_pid(pid, signal.SIGKILL)
        for proc in procs:
            proc.wait(timeout=10)
        wait_gone(pids)

    def restart_node(self, i: int, timeout: float = 180.0) -> subprocess.Popen[bytes]:
        """SIGKILL SuperNode i, then start it again with its own key and partition (a machine that died and
        came back). The SuperLink lets its key in again only once it has marked the dead node offline (no
        heartbeat for 2 x 30 s in Flower 1.42): until then each start is refused, and retried here; it
        returns once the SuperNode logged its node id (activated)."""
        self.kill_node(i)
        name, deadline = f"supernode{i}", time.monotonic() + timeout
        activated = self.log(name).count(ACTIVATED)
        while time.monotonic() < deadline:
            proc = self.add_supernode(name, self.node_keys[i], partition_id=i)
            while proc.poll() is None and time.monotonic() < deadline:
                if self.log(name).count(ACTIVATED) > activated:
                    return proc
                time.sleep(0.5)
            time.sleep(2)  # refused ("Failed to activate SuperNode"): the old node is still online
        raise RuntimeError(f"{name} could not rejoin within {timeout:g} s: {self.log(name)[-2000:]}")

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def pids(self) -> list[int]:
        """Every live process of this deployment: those started here, their descendants, and the orphans
        they left (found by `--parent-pid`)."""
        out = []
        for proc in self.procs.values():
            if proc.poll() is None:
                out.extend([*descendants(proc.pid), proc.pid])
            out.extend(adopted(proc.pid))
        return out

    # ---- stop -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM every process started here (SuperNodes first), SIGKILL their descendants and orphans and
        anything still running after 10 s; return once all are gone. Signals are held off meanwhile, so
        a second Ctrl-C cannot cut the cleanup short."""
        with _signals_held():
            order = [n for n in self.procs if n != "superlink"] + ["superlink"]
            everything = process_tree([p.pid for p in self.procs.values()])  # before parents exit
            for name in order:
                proc = self.procs.get(name)
                if proc is None:
                    continue
                kids = process_tree([proc.pid])[1:]
                if proc.poll() is None:
                    stop_pid(proc.pid)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        stop_pid(proc.pid, signal.SIGKILL)
                        proc.wait(timeout=10)
                kids += adopted(proc.pid)
                for kid in kids:
                    stop_pid(kid, signal.SIGKILL)
                wait_gone(kids)
            left = [p for p in everything if Path(f"/proc/{p}").exists() and not is_zombie(p)]
            for pid in left:  # orphans whose parent exited before they were found through it
                stop_pid(pid, signal.SIGKILL)
            wait_gone(left)
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM or SIGHUP (SIGINT raises KeyboardInterrupt), so that every
    `with LocalDeployment` block stops its processes on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Stopped` inside the block (default handlers would end the process
    at once, leaving every child running; SIGINT is handled here too because a process started in the
    background by a shell inherits SIGINT ignored, and Python then raises no KeyboardInterrupt); the
    previous handlers are restored afterwards."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, _raise_stopped) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM/SIGHUP inside the block (main thread only; elsewhere a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_deployment(config: str, overrides: str, output: str, nodes: int) -> None:
    """Everything the ServerApp would refuse, refused here before any Flower process starts: the config
    (validation, settings the Flower app cannot honour), the output directory, the node count."""
    from fedsb.config import resolve_config
    from fedsb.errors import ConfigError
    from fedsb.flower.client import check_flower_config
    from fedsb.paths import check_output_dir

    if nodes < 1:
        raise ConfigError(field="--nodes", value=nodes, fix="use at least 1 SuperNode")
    cfg = resolve_config(config or None, overrides.split())
    check_flower_config(cfg)
    if output:
        check_output_dir(output, field="--output")


def main(argv: list[str] | None = None) -> int:
    from fedsb.errors import FedsbError

    p = argparse.ArgumentParser(
        prog="python -m fedsb.flower.deploy",
        description="Run the fedsb Flower app on a loopback deployment: SuperLink + N SuperNodes, TLS and "
        "node authentication with throw-away credentials; everything is stopped at the end, on SIGINT, "
        "SIGTERM or any error. Exit status: 0 only if the run finished and completed.",
    )
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes (= partition.num_clients)")
    p.add_argument("--config", default="", help="fedsb YAML preset")
    p.add_argument("--overrides", default="", help='"section.key=value ..." overrides')
    p.add_argument("--output", default="", help="results directory")
    p.add_argument("--workdir", default=None, help="keep certificates, keys and logs here")
    args = p.parse_args(argv)
    overrides = f"partition.num_clients={args.nodes} {args.overrides}".strip()
    try:
        check_deployment(args.config, overrides, args.output, args.nodes)
    except FedsbError as exc:
        print(f"fedsb: error: {exc}", file=sys.stderr)
        return 2
    run_config = {"config": str(Path(args.config).resolve()) if args.config else "", "overrides": overrides}
    if args.output:
        run_config["output-dir"] = str(Path(args.output).resolve())
    try:
        with (
            stop_on_signals(),
            LocalDeployment(args.nodes, Path(args.workdir) if args.workdir else None) as dep,
        ):
            code, log = dep.run_app(run_config)
            print(log)
            if code != 0:
                print(f"fedsb: error: {failure_summary(log, dep.last_status)}", file=sys.stderr)
            return code
    except (Stopped, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(
            f"fedsb: deployment {exc or 'interrupted'}; every process it started was stopped", file=sys.stderr
        )
        return 128 + int(signum)


def failure_summary(log: str, status: Mapping[str, Any]) -> str:
    """Why a run failed: the ServerApp's `fedsb: error:` line, else Flower's status details, else its last
    exception line; with Flower's status of the run."""
    ours = [line.split("fedsb: error: ", 1)[1] for line in log.splitlines() if "fedsb: error: " in line]
    raised = [line.strip() for line in log.splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
    details = str(status.get("status-details") or "")
    what = (ours or ([details] if details else []) or raised or ["no error message (see the log above)"])[-1]
    state = status.get("status") or "unknown: no run id in the log"
    return f"the Flower run did not complete (status {state}): {what}"


if __name__ == "__main__":
    raise SystemExit(main())
