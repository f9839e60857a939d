"""Zero-config discovery: the master advertises ``_macfleet._tcp.local.``; nodes browse for it.

`advertise(cfg, port, kind)` is a context manager that registers the service with
python-zeroconf (TXT properties: cluster name, protocol version, control and tensor ports, kind
= coordinator | agent, host); `browse(name, timeout)` returns the services of that cluster name
as plain dicts ``{"name", "cluster", "proto", "kind", "host", "addresses", "port",
"tensor_port"}``, returning early once one has answered. zeroconf is imported lazily, so a
machine without it (or without multicast) only loses discovery, and only when it is asked for.
IPv4 only: the Thunderbolt bridge is addressed over IPv4 and so are the test namespaces.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Optional

from macfleet.config import PROTOCOL_VERSION, ClusterConfig
from macfleet.errors import MacFleetError

SERVICE_TYPE = "_macfleet._tcp.local."


def _zeroconf():
    try:
        import zeroconf
    except ImportError:
        raise MacFleetError(
            "cluster.discovery_enabled needs the zeroconf package: pip install zeroconf, or give "
            "cluster.master_addr instead") from None
    return zeroconf


def local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine (or network namespace)."""
    try:
        import psutil

        out = []
        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family == socket.AF_INET and not a.address.startswith("127."):
                    out.append(a.address)
        return out
    except Exception:  # psutil missing: fall back to the address on the default route
        from macfleet.cluster.protocol import route_address

        addr = route_address("10.255.255.255")
        return [] if addr.startswith("127.") else [addr]


class advertise:
    """Context manager: advertise this master under cfg.name while the block runs."""

    def __init__(self, cfg: ClusterConfig, port: int, kind: str = "coordinator",
                 addresses: Optional[list[str]] = None):
        self.cfg = cfg
        self.port = int(port)
        self.kind = kind
        if addresses is None:
            addresses = [cfg.host] if cfg.host not in ("0.0.0.0", "", "*") else local_ipv4_addresses()
        self.addresses = addresses
        self._zc = None
        self._info = None

    def __enter__(self) -> "advertise":
        zc_mod = _zeroconf()
        if not self.addresses:
            raise MacFleetError("discovery found no network address to advertise; connect the "
                                "Thunderbolt bridge (or give workers cluster.master_addr)")
        host = socket.gethostname().split(".")[0]
        instance = f"{self.cfg.name}-{self.kind}-{host}-{self.port}"
        self._info = zc_mod.ServiceInfo(
            SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses], port=self.port,
            properties={"cluster": self.cfg.name, "proto": str(PROTOCOL_VERSION), "kind": self.kind,
                        "host": host, "tensor_port": str(self.cfg.tensor_port)},
            server=f"{instance}.local.")
        self._zc = zc_mod.Zeroconf(ip_version=zc_mod.IPVersion.V4Only)
        self._zc.register_service(self._info)
        return self

    def __exit__(self, *exc) -> None:
        if self._zc is not None:
            try:
                self._zc.unregister_service(self._info)
            finally:
                self._zc.close()
                self._zc = None


def _decode_props(props: dict) -> dict:
    out = {}
    for k, v in (props or {}).items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v.decode() if isinstance(v, bytes) else v
    return out


def browse(name: str, timeout: float = 3.0, kind: Optional[str] = None) -> list[dict]:
    """Services of cluster `name` (optionally of one kind) found within `timeout` seconds."""
    zc_mod = _zeroconf()
    zc = zc_mod.Zeroconf(ip_version=zc_mod.IPVersion.V4Only)
    names: list[str] = []
    seen = threading.Event()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is zc_mod.ServiceStateChange.Added:
            names.append(name)
            seen.set()

    found: dict[str, dict] = {}
    browser = None
    try:
        browser = zc_mod.ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.wait(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            seen.clear()
            for svc_name in list(names):
                if svc_name in found:
                    continue
                info = zc.get_service_info(SERVICE_TYPE, svc_name, timeout=int(max(0.1, min(1.0, deadline - time.monotonic())) * 1000))
                if info is None:
                    continue
                props = _decode_props(info.properties)
                found[svc_name] = {
                    "name": svc_name, "cluster": props.get("cluster"), "proto": props.get("proto"),
                    "kind": props.get("kind"), "host": props.get("host"),
                    "addresses": [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4],
                    "port": int(info.port), "tensor_port": int(props.get("tensor_port") or 0)}
            wanted = [s for s in found.values() if s["cluster"] == name and (kind is None or s["kind"] == kind)]
            if wanted:
                return wanted
        return []
    finally:
        if browser is not None:
            browser.cancel()
        zc.close()
