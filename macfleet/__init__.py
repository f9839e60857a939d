"""MacFleet: data-parallel PyTorch training across a few Macs, on a ZeroMQ AllReduce engine."""

__version__ = "0.1.0"

from macfleet.config import ClusterConfig, CompressionConfig, NodeRole, TrainingConfig  # noqa: E402
from macfleet.errors import MacFleetError  # noqa: E402
from macfleet.comm.registration import install as _install_backend  # noqa: E402

# `dist.init_process_group("macfleet")` works after `import macfleet`; this imports neither torch
# nor pyzmq (comm/registration.py says how).
_install_backend()


def __getattr__(name):
    # Trainer pulls in torch; import it lazily so `macfleet info` and config code stay light.
    if name == "Trainer":
        from macfleet.trainer import Trainer

        return Trainer
    if name == "DatasetBundle":
        from macfleet.data import DatasetBundle

        return DatasetBundle
    if name == "run":
        from macfleet.run import run

        return run
    raise AttributeError(name)


__all__ = ["Trainer", "TrainingConfig", "ClusterConfig", "CompressionConfig", "NodeRole", "MacFleetError", "DatasetBundle", "run"]
