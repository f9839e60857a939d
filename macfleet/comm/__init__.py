"""The engine: ZeroMQ tensor transport, collectives, and a torch.distributed backend.

`Group` (group.py) is the API the rest of MacFleet uses; framing.py owns the wire format,
transport.py the sockets, collectives.py the algorithms, launch.py local/netns rank start-up,
backend.py the "macfleet" torch.distributed backend.
"""

from macfleet.comm.framing import random_session, session_id
from macfleet.comm.group import Group

__all__ = ["Group", "random_session", "session_id"]
