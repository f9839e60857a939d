"""The worker processes of `cluster=local`, kept apart from the rest of the cluster code: no torch
import here, so train.py starts them before it imports torch (macfleet.run)."""

from __future__ import annotations

import logging
import os
import signal

from macfleet.config import ClusterConfig, redact_token

log = logging.getLogger("macfleet")


FLEET_TMP_PREFIX = "macfleet-fleet-"


def local_master(cfg) -> None:
    """A local fleet's master listens on 127.0.0.1 only (every process is on this machine), on
    `master_port` or a free one. `cfg`: a ClusterConfig or the composed `cluster` node."""
    from macfleet.comm.launch import free_ports

    cfg.host = "127.0.0.1"
    if not cfg.master_port:
        cfg.master_port = free_ports(1)[0]


class LocalFleet:
    """The worker processes of `cluster=local`: ranks 1..N-1 of the master's own run, on this
    machine, started from the resolved config (`python -m macfleet.run`), their output prefixed.

    The config goes into a temp dir named after the master's pid (`macfleet-fleet-<pid>-*`); one
    whose master is dead (killed: no cleanup ran) is removed when the next fleet starts.
    Workers share the terminal's process group, so a Ctrl-C reaches them as well: each stops at
    the step its master stops at and says so in one line (exit code 130, not reported as a failure).
    """

    _early: "LocalFleet | None" = None

    def __init__(self, cfg: ClusterConfig, config_dict: dict):
        self.cfg = cfg
        self.config_dict = config_dict
        self.procs: list = []
        self._tmp = None

    @classmethod
    def start_early(cls, cfg: ClusterConfig, config_dict: dict) -> "LocalFleet":
        """Start the workers before this process imports torch and builds its model (train.py):
        their start-up (interpreter, imports, dataset, model) runs beside the master's instead of
        after it, seconds on every local run. `connect` takes them; `abandon` stops them when
        the master fails before it gets there."""
        fleet = cls(cfg, config_dict)
        fleet.start()
        cls._early = fleet
        return fleet

    @classmethod
    def take_early(cls, cfg: ClusterConfig) -> "LocalFleet | None":
        fleet, cls._early = cls._early, None
        if fleet is not None and (fleet.cfg.master_port, fleet.cfg.nodes) != (cfg.master_port, cfg.nodes):
            fleet.abandon()  # started for another config: not this fleet's workers
            return None
        return fleet

    def abandon(self) -> None:
        """Kill workers started early that no master took (it failed first): they have not
        joined anything, and would otherwise wait for it up to cluster.wait_timeout."""
        if LocalFleet._early is self:
            LocalFleet._early = None
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()  # killed on purpose: no "worker(s) exited with" warning after the master's error
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def start(self) -> None:
        import subprocess
        import sys
        import tempfile
        import threading

        from omegaconf import OmegaConf

        from macfleet.comm.launch import free_ports

        _remove_dead_fleet_dirs(tempfile.gettempdir())
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{FLEET_TMP_PREFIX}{os.getpid()}-")
        path = os.path.join(self._tmp.name, "config.yaml")
        OmegaConf.save(OmegaConf.create(redact_token(self.config_dict)), path)
        ports = free_ports(self.cfg.nodes - 1)
        for rank in range(1, self.cfg.nodes):
            overrides = ["cluster.role=worker", "cluster.master_addr=127.0.0.1",
                         f"cluster.master_port={self.cfg.master_port}", f"cluster.tensor_port={ports[rank - 1]}",
                         "trainer.progress=false", "logger.name=none"]
            env = dict(os.environ, MACFLEET_RANK=str(rank), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            if self.cfg.token:
                env["MACFLEET_TOKEN"] = self.cfg.token  # the config file written above holds none
            proc = subprocess.Popen([sys.executable, "-m", "macfleet.run", "--config", path, "--log-level", "WARNING",
                                     *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            threading.Thread(target=self._relay, args=(rank, proc), daemon=True).start()
            self.procs.append(proc)
        log.info("local fleet: started %d worker process(es) on 127.0.0.1", len(self.procs))

    @staticmethod
    def _relay(rank: int, proc) -> None:
        for line in proc.stdout:
            print(f"[rank {rank}] {line.rstrip()}", flush=True)

    def stop(self, timeout: float = 30.0, members: set | None = None) -> None:
        """Wait for the workers to end. `members`: the pids still in the run (its heartbeats
        decide, not these child processes); one that is not, e.g. frozen and dropped, is killed
        at once instead of waited for."""
        import subprocess

        for proc in self.procs:
            if members is not None and proc.pid not in members and proc.poll() is None:
                log.info("local fleet: worker pid %d is no longer in the run (dropped); stopping it", proc.pid)
                proc.kill()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # 130: stopped by Ctrl-C, which the worker said itself; -SIGINT: a Ctrl-C came while its
        # interpreter was still starting, before it could say anything.
        bad = [(r + 1, p.returncode) for r, p in enumerate(self.procs)
               if p.returncode not in (0, 130, -signal.SIGINT, None)]
        if bad:
            log.warning("local fleet: worker(s) exited with %s", bad)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _remove_dead_fleet_dirs(tmp_root: str) -> None:
    """Remove the temp dirs of local fleets whose master process is gone."""
    import shutil

    import psutil

    for entry in os.scandir(tmp_root):
        pid = entry.name[len(FLEET_TMP_PREFIX):].split("-", 1)[0]
        if not (entry.name.startswith(FLEET_TMP_PREFIX) and pid.isdigit() and entry.is_dir()):
            continue
        if not psutil.pid_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.exists(entry.path):  # another user's is not ours to remove
                log.info("local fleet: removed %s, left by a killed run (pid %s)", entry.path, pid)
