"""Network namespaces joined by veth links, for tests and benchmarks on one Linux host (root).

`NetnsPair` makes two namespaces with their own addresses (10.0.0.1 and 10.0.0.2 by default),
loopback up, multicast on and a 224.0.0.0/4 route on the link, so ZeroMQ traffic and zeroconf's
mDNS stay inside them and never touch the host's real interfaces. Names carry a prefix and the
creating pid (``mf-cl-<pid>-<n>``) so parallel runs do not collide; leaving the context deletes
the namespaces, which also deletes the veth pair.
"""

from __future__ import annotations

import itertools
import os
import subprocess

_counter = itertools.count()


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class NetnsPair:
    """Two namespaces `names[0]`, `names[1]` with addresses `addrs[0]`, `addrs[1]` on one veth link."""

    def __init__(self, prefix: str = "mf-cl", addrs: tuple = ("10.0.0.1", "10.0.0.2")):
        n = next(_counter)
        tag = f"{os.getpid()}-{n}"
        self.names = (f"{prefix}-{tag}-a", f"{prefix}-{tag}-b")
        # Interface names are limited to 15 characters.
        short = f"{os.getpid() % 100000}{n}"
        self.links = (f"mfa{short}"[:15], f"mfb{short}"[:15])
        self.addrs = addrs

    def __enter__(self) -> "NetnsPair":
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
            _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
            for ns, link, addr in zip(self.names, self.links, self.addrs):
                _ip("link", "set", link, "netns", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("addr", "add", f"{addr}/24", "dev", link, ns=ns)
                _ip("link", "set", link, "multicast", "on", ns=ns)
                _ip("link", "set", link, "up", ns=ns)
                _ip("route", "add", "224.0.0.0/4", "dev", link, ns=ns)
        except subprocess.CalledProcessError as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"could not build namespaces: {exc.cmd}: {exc.stderr}") from None
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside namespace i."""
        return ["ip", "netns", "exec", self.names[i]]

    def set_link(self, i: int, up: bool) -> None:
        """Take namespace i's end of the link down (a pulled cable) or up again."""
        _ip("link", "set", self.links[i], "up" if up else "down", ns=self.names[i])
