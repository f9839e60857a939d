"""Errors a user can cause or meet. Each message says what to do next."""


class MacFleetError(Exception):
    """Base class: something the user can fix (config, network, data, peers)."""


class ConfigError(MacFleetError):
    """A config value is invalid or inconsistent."""


class DatasetMissingError(MacFleetError):
    """The dataset is not on disk and cannot be downloaded."""


class FrameError(MacFleetError):
    """A frame from the network failed validation (version, size, dtype, shape, sender, step)."""


class PeerLostError(MacFleetError):
    """A peer died or went silent past the deadline."""

    def __init__(self, message: str, rank: int | None = None, address: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.address = address


class PeerLeftError(PeerLostError):
    """A peer left the run on purpose (Ctrl-C, an error of its own, or the end of its run) and
    said so; `reason` is what it gave."""

    def __init__(self, message: str, rank: int | None = None, address: str | None = None, reason: str = ""):
        super().__init__(message, rank=rank, address=address)
        self.reason = reason


class JoinRefusedError(MacFleetError):
    """The coordinator refused a node (token, protocol version or config mismatch)."""


class CheckpointError(MacFleetError):
    """A checkpoint could not be written or read."""


class NodeDroppedError(PeerLostError):
    """The master dropped this node from an elastic run (it was silent past the deadline: frozen,
    asleep or cut off) and the others went on without it."""
