"""`macfleet info`: a full description of this machine, with the Thunderbolt bridge marked.

On macOS it reads `sw_vers`, `sysctl` (chip, performance/efficiency cores, memory),
`system_profiler SPDisplaysDataType` (GPU cores), `networksetup -listallhardwareports` and
`ifconfig` (interfaces; the "Thunderbolt Bridge" port is marked), and `pmset -g therm` with
`notifyutil` (thermal pressure, parsed in macos.py). Each parser takes the command's text, so
tests run them on recorded outputs (tests/unit/fixtures/macos/). Elsewhere it reports what psutil
and /proc give. `describe()` returns a JSON-safe dict; `info_main` prints it.
"""

from __future__ import annotations

import json
import platform
import re
import socket
import sys
from typing import Optional

from macfleet.cluster.facts import run_command

SYSCTL_KEYS = ("machdep.cpu.brand_string", "hw.ncpu", "hw.perflevel0.physicalcpu",
               "hw.perflevel1.physicalcpu", "hw.memsize", "hw.model")


def parse_sysctl(text: str) -> dict:
    """`sysctl KEY...` lines ("key: value") -> {key: value}, numbers as int."""
    out: dict = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        out[key.strip()] = int(value) if value.isdigit() else value
    return out


def parse_sw_vers(text: str) -> str:
    """`sw_vers` -> "macOS 14.4.1 (23E224)"."""
    fields = parse_sysctl(text)
    name, version, build = fields.get("ProductName", "macOS"), fields.get("ProductVersion", "?"), fields.get("BuildVersion")
    return f"{name} {version}" + (f" ({build})" if build else "")


def parse_gpu_cores(text: str) -> Optional[int]:
    """`system_profiler SPDisplaysDataType` -> the "Total Number of Cores" of the GPU."""
    m = re.search(r"Total Number of Cores:\s*(\d+)", text)
    return int(m.group(1)) if m else None


def parse_ioreg_gpu_cores(text: str) -> Optional[int]:
    """`ioreg -rc AGXAccelerator` -> "gpu-core-count" (fast path used by node_facts)."""
    m = re.search(r'"gpu-core-count"\s*=\s*(\d+)', text)
    return int(m.group(1)) if m else None


def parse_hardware_ports(text: str) -> dict[str, str]:
    """`networksetup -listallhardwareports` -> {device: hardware port name}."""
    ports: dict[str, str] = {}
    port = None
    for line in text.splitlines():
        if line.startswith("Hardware Port:"):
            port = line.split(":", 1)[1].strip()
        elif line.startswith("Device:") and port is not None:
            ports[line.split(":", 1)[1].strip()] = port
            port = None
    return ports


def parse_ifconfig(text: str) -> list[dict]:
    """`ifconfig` -> [{name, up, ipv4: [..], mac, members: [..], status}] in output order."""
    out: list[dict] = []
    cur: Optional[dict] = None
    for line in text.splitlines():
        m = re.match(r"^(\S+): flags=\w+<([^>]*)>", line)
        if m:
            cur = {"name": m.group(1), "up": "UP" in m.group(2).split(","), "ipv4": [], "mac": None,
                   "members": [], "status": None}
            out.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("inet "):
            cur["ipv4"].append(s.split()[1])
        elif s.startswith("ether "):
            cur["mac"] = s.split()[1]
        elif s.startswith("member:"):
            cur["members"].append(s.split()[1])
        elif s.startswith("status:"):
            cur["status"] = s.split(":", 1)[1].strip()
    return out


def interfaces_macos(ifconfig_text: str, ports_text: str) -> list[dict]:
    """Interfaces with their hardware port name; the Thunderbolt bridge has thunderbolt_bridge."""
    ports = parse_hardware_ports(ports_text)
    rows = []
    for iface in parse_ifconfig(ifconfig_text):
        port = ports.get(iface["name"])
        iface["port"] = port
        iface["thunderbolt_bridge"] = port == "Thunderbolt Bridge"
        iface["thunderbolt"] = bool(port and port.startswith("Thunderbolt"))
        rows.append(iface)
    return rows


def describe_macos(sysctl_text: str, sw_vers_text: str, displays_text: str, ifconfig_text: str,
                   ports_text: str, pmset_therm_text: str = "", pressure_text: str = "") -> dict:
    """Everything `macfleet info` shows on a Mac, from the commands' outputs."""
    from macfleet.cluster.macos import parse_thermal

    sc = parse_sysctl(sysctl_text)
    return {
        "os": parse_sw_vers(sw_vers_text),
        "model": sc.get("hw.model"),
        "chip": sc.get("machdep.cpu.brand_string"),
        "cpu_cores": sc.get("hw.ncpu"),
        "performance_cores": sc.get("hw.perflevel0.physicalcpu"),
        "efficiency_cores": sc.get("hw.perflevel1.physicalcpu"),
        "gpu_cores": parse_gpu_cores(displays_text),
        "memory_bytes": sc.get("hw.memsize"),
        "interfaces": interfaces_macos(ifconfig_text, ports_text),
        "thermal": parse_thermal(pmset_therm_text, pressure_text),
    }


def describe_linux() -> dict:
    from macfleet.cluster.facts import chip_name, memory_bytes
    from macfleet.cluster.macos import thermal

    interfaces = []
    try:
        import psutil

        stats = psutil.net_if_stats()
        for name, addrs in psutil.net_if_addrs().items():
            interfaces.append({
                "name": name, "up": bool(stats.get(name) and stats[name].isup),
                "ipv4": [a.address for a in addrs if a.family == socket.AF_INET],
                "mac": next((a.address for a in addrs if a.family == getattr(psutil, "AF_LINK", -1)), None),
                "port": None, "thunderbolt_bridge": False, "thunderbolt": False})
    except ImportError:
        pass
    return {"os": f"{platform.system()} {platform.release()}", "model": platform.machine(), "chip": chip_name(),
            "cpu_cores": __import__("os").cpu_count(), "performance_cores": None, "efficiency_cores": None,
            "gpu_cores": None, "memory_bytes": memory_bytes(), "interfaces": interfaces, "thermal": thermal()}


def torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"torch": None, "devices": ["cpu"]}
    devices = []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    if torch.cuda.is_available():
        devices.extend(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count()))
    devices.append("cpu")
    return {"torch": torch.__version__, "devices": devices}


def bytecode_note(module: str = "torch") -> Optional[str]:
    """A warning when each process start compiles `module`'s Python again: bytecode writing is
    off (PYTHONDONTWRITEBYTECODE or -B) without a cache prefix, and the package has no compiled
    file. Some container images and CI hosts are set up so; a pip install writes .pyc files. On
    a 16-core Linux host, `import torch` and the first optimizer took 9 s so against 2.5 s with
    a bytecode cache, and a rejoining node's start-up doubled (README, "Elastic")."""
    import importlib.util
    from pathlib import Path

    if not sys.dont_write_bytecode or sys.pycache_prefix:
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    if Path(importlib.util.cache_from_source(spec.origin)).exists():
        return None
    return (f"Python writes no bytecode here (PYTHONDONTWRITEBYTECODE or -B) and {module} has no compiled "
            f"files, so every process compiles {module} again (seconds of each start); set "
            f"PYTHONPYCACHEPREFIX=/tmp/pycache, or unset PYTHONDONTWRITEBYTECODE")


def _run(cmd: list[str]) -> str:
    return run_command(cmd, timeout=15)


def describe() -> dict:
    """This machine, from live commands (macOS) or psutil (elsewhere), plus torch."""
    if sys.platform == "darwin":
        from macfleet.cluster.macos import PRESSURE_KEY

        info = describe_macos(_run(["sysctl", *SYSCTL_KEYS]), _run(["sw_vers"]),
                              _run(["system_profiler", "SPDisplaysDataType"]), _run(["ifconfig"]),
                              _run(["networksetup", "-listallhardwareports"]), _run(["pmset", "-g", "therm"]),
                              _run(["notifyutil", "-g", PRESSURE_KEY]))
    else:
        info = describe_linux()
    info["host"] = socket.gethostname()
    info["python"] = platform.python_version()
    info.update(torch_info())
    info["bytecode_note"] = bytecode_note()
    info["comm"] = comm_defaults()
    return info


def comm_defaults() -> dict:
    """The data plane a group started here gets by default (MACFLEET_TRANSPORT, MACFLEET_LANES,
    the cores this process may use); a malformed setting is reported, not raised."""
    from macfleet.errors import MacFleetError

    try:
        from macfleet.comm.group import default_lanes
        from macfleet.comm.tcp import default_transport

        return {"transport": default_transport(), "lanes": default_lanes(), "error": None}
    except MacFleetError as exc:
        return {"transport": None, "lanes": None, "error": str(exc)}


def render(info: dict) -> str:
    """Plain-text report (what `macfleet info` prints)."""
    from macfleet.cluster.macos import describe_thermal

    gib = info.get("memory_bytes")
    cores = str(info.get("cpu_cores"))
    if info.get("performance_cores"):
        cores += f" ({info['performance_cores']} performance + {info.get('efficiency_cores') or 0} efficiency)"
    lines = [
        f"host:      {info.get('host', '?')}",
        f"os:        {info.get('os')}" + (f" on {info['model']}" if info.get("model") else ""),
        f"chip:      {info.get('chip')}",
        f"cpu cores: {cores}",
        f"gpu cores: {info.get('gpu_cores') if info.get('gpu_cores') is not None else '-'}",
        f"memory:    {gib / 2**30:.1f} GiB" if gib else "memory:    ?",
        f"thermal:   {describe_thermal(info.get('thermal'))}",
        f"torch:     {info.get('torch')}  devices: {', '.join(info.get('devices', []))}",
        f"comm:      {_describe_comm(info.get('comm'))}",
        "interfaces:",
    ]
    if info.get("bytecode_note"):
        lines.insert(-1, f"start-up:  {info['bytecode_note']}")
    for iface in info.get("interfaces", []):
        mark = "  <- Thunderbolt Bridge (use this address for cluster.master_addr)" if iface.get("thunderbolt_bridge") else ""
        port = f" [{iface['port']}]" if iface.get("port") else ""
        addrs = ", ".join(iface.get("ipv4") or []) or "-"
        state = "up" if iface.get("up") else "down"
        lines.append(f"  {iface['name']:<10}{port:<22} {state:<5} {addrs}{mark}")
    return "\n".join(lines)


def _describe_comm(comm: Optional[dict]) -> str:
    if not comm:
        return "?"
    if comm.get("error"):
        return comm["error"]
    if comm["lanes"] > 1:
        return (f"{comm['transport']}, with {comm['lanes']} tcp data lanes for all_reduces of 1 MB or more "
                "(MACFLEET_LANES; default one per 4 cores, at most 4; a fleet uses the fewest any node offers)")
    return f"{comm['transport']}, one lane (MACFLEET_LANES; default one per 4 cores, at most 4)"


def format_info(info: dict, as_json: bool = False) -> str:
    """What `macfleet info` prints: the table, or JSON with --json."""
    return json.dumps(info, indent=2) if as_json else render(info)


def info_main(args) -> int:
    print(format_info(describe(), getattr(args, "json", False)))
    return 0
