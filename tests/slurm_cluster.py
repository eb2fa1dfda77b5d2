"""A real one-node Slurm cluster on this machine for the Slurm tests: munged, slurmctld and slurmd
on loopback, configuration and state in a temporary directory; installed from Debian's slurm-wlm
and munge packages when missing (root only), torn down afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")


def _run(*cmd, check=True, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, **kw)


def ensure_installed() -> str | None:
    """None when Slurm is usable, else why not (the tests skip with that reason)."""
    if all(shutil.which(c) for c in ("sbatch", "slurmctld", "slurmd", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this user cannot install it (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            return f"apt-get install slurm-wlm munge failed: {(update.stderr + proc.stderr)[-500:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []
        self.started_munged = False

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        self.conf.write_text(f"""ClusterName=stagtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        if _run("pgrep", "-x", "munged", check=False).returncode != 0:
            _run("munged", "--force")
            self.started_munged = True
        for daemon in ("slurmctld", "slurmd"):
            args = [daemon, "-D"] + (["-c"] if daemon == "slurmctld" else [])
            self.procs.append(subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = _run("sinfo", "-h", "-o", "%T", env=self.env, check=False).stdout.strip()
            if out.startswith("idle"):
                return
            time.sleep(1)
        raise RuntimeError(f"the test cluster did not come up: sinfo says {out!r}; logs in {r}/log")

    def stop(self) -> None:
        _run("scancel", "--full", "-u", "root", env=self.env, check=False)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.started_munged:
            _run("pkill", "-x", "munged", check=False)

    # ------------------------------------------------------------------ job helpers
    def job_state(self, job: str) -> str:
        out = _run("scontrol", "show", "job", job, env=self.env, check=False).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout}s")
