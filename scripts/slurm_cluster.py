#!/usr/bin/env python3
"""Start or stop a real one-machine Slurm cluster (Debian's slurmctld + slurmd + munge) for tests.

Why a real cluster: sbatch option parsing, `--signal`, `--requeue`, `scontrol requeue` and the
environment Slurm gives a job are exactly what the submission code must get right, and none of it
can be faked convincingly. Everything lives under one folder (config, state, logs, a private munge
socket, fake GPU device files); the daemons are stopped by the PIDs they wrote there.

    python scripts/slurm_cluster.py start DIR [--nodes 2] [--cpus 2] [--gpus 2]
    export SLURM_CONF=DIR/slurm.conf        # printed by start; every Slurm command needs it
    python scripts/slurm_cluster.py stop DIR

Needs root and `apt-get install slurmctld slurmd slurm-client munge` (see .ci/run). Node names
(n1, n2, ...) are added to /etc/hosts as one marked line and removed by `stop`.
Standard library only, so it runs before the package is installed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HOSTS_FILE = Path("/etc/hosts")
REQUIRED = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


class ClusterError(RuntimeError):
    """The cluster could not start; the message says which daemon and quotes its log."""


def missing_tools() -> list[str]:
    """Names of the programs this script needs that are not installed (empty when all are)."""
    extra = ("/usr/sbin",)  # daemons live in sbin, which a non-login PATH may lack
    path = os.pathsep.join([os.environ.get("PATH", ""), *extra])
    return [tool for tool in REQUIRED if shutil.which(tool, path=path) is None]


def _which(tool: str) -> str:
    found = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if found is None:
        raise ClusterError(f"{tool} not found; install with: apt-get install slurmctld slurmd slurm-client munge")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} not written)"


def _wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    detail = f"; last lines of {log}:\n{_tail(log)}" if log is not None else ""
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s{detail}")


@dataclass
class SlurmCluster:
    """A cluster rooted at `root`: `start()`, use with `env()`, `stop()` (idempotent)."""

    root: Path
    nodes: int = 2
    cpus: int = 2
    gpus: int = 2
    memory_mb: int = 4096

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes)]

    @property
    def hosts_marker(self) -> str:
        return f"# ngdiff-slurm {self.root}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment in which sbatch/scontrol/squeue talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ------------------------------------------------------------------ files
    def write_files(self) -> None:
        for sub in ("state", "run", "log", *(f"spool/{n}" for n in self.node_names)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (its own user) must traverse to its socket
        munge = self.root / "munge"
        munge.mkdir(exist_ok=True)
        key = munge / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        os.chmod(munge, 0o755)
        os.chmod(key, 0o600)
        host = socket.gethostname().split(".")[0]
        gres_lines = []
        for name in self.node_names:
            dev = self.root / "dev" / name
            dev.mkdir(parents=True, exist_ok=True)
            for i in range(self.gpus):
                link = dev / f"nvidia{i}"
                if not link.is_symlink():
                    link.symlink_to("/dev/null")  # gres needs device files; regular files make the node INVAL
            if self.gpus:
                gres_lines.append(f"NodeName={name} Name=gpu File={dev}/nvidia[0-{self.gpus - 1}]")
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        node_lines = [
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} "
            f"Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mb}{gres} State=UNKNOWN"
            for name in self.node_names
        ]
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=ngdiff",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={munge / 'munge.socket'}",
                    "MpiDefault=none",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MailProg=/bin/true",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SlurmdParameters=config_overrides",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    "KillWait=5",
                    "MinJobAge=300",
                    # job ids (and the rendezvous ports derived from them) differ between clusters
                    # that run side by side, e.g. two test sessions on one machine
                    f"FirstJobId={random.randrange(1000, 60000)}",
                    *(["GresTypes=gpu"] if self.gpus else []),
                    f"StateSaveLocation={r}/state",
                    f"SlurmdSpoolDir={r}/spool/%n",
                    f"SlurmctldPidFile={r}/run/slurmctld.pid",
                    f"SlurmdPidFile={r}/run/slurmd-%n.pid",
                    f"SlurmctldLogFile={r}/log/slurmctld.log",
                    f"SlurmdLogFile={r}/log/slurmd-%n.log",
                    *node_lines,
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (self.root / "gres.conf").write_text("\n".join([*gres_lines, ""]))

    def _add_hosts_line(self) -> None:
        text = HOSTS_FILE.read_text()
        if self.hosts_marker in text:
            return
        if not text.endswith("\n"):
            text += "\n"
        HOSTS_FILE.write_text(text + f"127.0.0.1 {' '.join(self.node_names)} {self.hosts_marker}\n")

    def _remove_hosts_line(self) -> None:
        try:
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return
        kept = [line for line in lines if not line.rstrip("\n").endswith(self.hosts_marker)]
        if kept != lines:
            HOSTS_FILE.write_text("".join(kept))

    # ------------------------------------------------------------------ daemons
    def _run(self, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False)

    def pid_files(self) -> list[Path]:
        run = self.root / "run"
        return [run / f"slurmd-{n}.pid" for n in self.node_names] + [run / "slurmctld.pid", self.root / "munge/pid"]

    def start(self, timeout: float = 30) -> SlurmCluster:
        if os.geteuid() != 0:
            raise ClusterError("starting the test cluster needs root (daemons run as root/munge)")
        missing = missing_tools()
        if missing:
            raise ClusterError(f"missing {', '.join(missing)}; apt-get install slurmctld slurmd slurm-client munge")
        self.write_files()
        self._add_hosts_line()
        munge = self.root / "munge"
        sock = str(munge / "munge.socket")
        try:
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "munge",
                    "--",
                    _which("munged"),
                    f"--socket={sock}",
                    f"--key-file={munge / 'munge.key'}",
                    f"--pid-file={munge / 'pid'}",
                    f"--log-file={munge / 'munged.log'}",
                    f"--seed-file={munge / 'seed'}",
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=20,
            )

            def munge_ok() -> bool:
                enc = subprocess.run(["munge", "-n", "-S", sock], capture_output=True, timeout=5, check=False)
                if enc.returncode != 0:
                    return False
                dec = subprocess.run(["unmunge", "-S", sock], input=enc.stdout, capture_output=True, timeout=5)
                return dec.returncode == 0

            _wait_for("munged", munge_ok, timeout, munge / "munged.log")
            env = self.env()
            subprocess.run([_which("slurmctld"), "-f", str(self.conf)], env=env, check=True, timeout=20)
            _wait_for(
                "slurmctld",
                lambda: "UP" in self._run("scontrol", "ping").stdout,
                timeout,
                self.root / "log/slurmctld.log",
            )
            for name in self.node_names:
                subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", name], env=env, check=True, timeout=20)

            def all_idle() -> bool:
                out = self._run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
                states = dict(line.split() for line in out if line.strip())
                return all(states.get(n) == "idle" for n in self.node_names)

            _wait_for("slurmd on every node", all_idle, timeout, self.root / f"log/slurmd-{self.node_names[-1]}.log")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ClusterError) as err:
            self.stop()
            detail = getattr(err, "stderr", None) or ""
            raise ClusterError(f"{err} {detail}".strip()) from err
        return self

    def stop(self, timeout: float = 15) -> None:
        """Stop every daemon by its PID file (TERM, then KILL), then drop the /etc/hosts line."""
        pids = []
        for pid_file in self.pid_files():
            try:
                pids.append(int(pid_file.read_text().strip()))
            except (FileNotFoundError, ValueError):
                continue
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._remove_hosts_line()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="write the config under DIR and start munged, slurmctld, slurmd")
    start.add_argument("dir", nargs="?", help="cluster folder (default: a new one under /tmp)")
    start.add_argument("--nodes", type=int, default=2)
    start.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs per node")
    start.add_argument("--gpus", type=int, default=2, help="fake GPUs per node (/dev/null symlinks)")
    stop = sub.add_parser("stop", help="stop the daemons started in DIR")
    stop.add_argument("dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.action == "start":
        root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ngdiff-slurm-"))
        if args.nodes < 1 or args.cpus < 1 or args.gpus < 0:
            print("slurm_cluster: --nodes and --cpus must be positive, --gpus not negative", file=sys.stderr)
            return 2
        try:
            SlurmCluster(root.resolve(), nodes=args.nodes, cpus=args.cpus, gpus=args.gpus).start()
        except ClusterError as err:
            print(f"slurm_cluster: {err}", file=sys.stderr)
            return 1
        print(f"export SLURM_CONF={root.resolve() / 'slurm.conf'}")
        return 0
    conf = Path(args.dir) / "slurm.conf"
    nodes = conf.read_text().count("\nNodeName=") if conf.is_file() else 0
    SlurmCluster(Path(args.dir).resolve(), nodes=max(nodes, 1)).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
