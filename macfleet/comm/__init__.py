"""The engine: ZeroMQ tensor transport, collectives, and a torch.distributed backend.

`Group` (group.py) is the API the rest of MacFleet uses; framing.py owns the wire format,
transport.py the sockets, collectives.py the algorithms, launch.py local/netns rank start-up,
backend.py the "macfleet" torch.distributed backend, registration.py its registration.
"""


def __getattr__(name):
    # Lazy, so `import macfleet` can register the backend (registration.py) without loading pyzmq.
    if name == "Group":
        from macfleet.comm.group import Group

        return Group
    if name in ("random_session", "session_id"):
        from macfleet.comm import framing

        return getattr(framing, name)
    raise AttributeError(name)


__all__ = ["Group", "random_session", "session_id"]
