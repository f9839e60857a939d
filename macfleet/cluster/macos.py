"""Mac care: keep a Mac awake during a run, read its thermal pressure, check the route to a peer.

- `keep_awake()`: a context manager that runs `caffeinate -i -w <pid>` for as long as it is open
  (no idle sleep while the training process lives); a no-op off macOS.
- `thermal()` / `thermal_cached()`: {"level": nominal|moderate|heavy|trapping|sleeping|unknown,
  "cpu_speed_limit": int|None}, from `notifyutil -g com.apple.system.thermalpressurelevel` and
  `pmset -g therm` (neither needs root). `thermal_level()` is what heartbeats carry, and
  `thermal_change` the line the master logs when a node enters or leaves heavy-or-worse.
- `check_route(addr)`: one warning line when traffic to a peer does not cross the Thunderbolt
  cable (`route -n get`, `networksetup -listallhardwareports`), None when it does.

Each reader has a parser that takes the command's text, so tests run them on recorded outputs
(tests/unit/fixtures/macos/); the live functions run the commands on macOS only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from macfleet.cluster.facts import run_command
from macfleet.cluster.info import parse_hardware_ports, parse_ifconfig

log = logging.getLogger("macfleet")

# ---------------------------------------------------------------------------------------------
# Keep awake

CAFFEINATE = ("caffeinate", "-i")


@contextmanager
def keep_awake(pid: Optional[int] = None, command: Optional[Sequence[str]] = None,
               grace: float = 2.0) -> Iterator[Optional[subprocess.Popen]]:
    """Keep this Mac from idle sleep while the block runs; yields the helper process (or None).

    Starts `command + ["-w", pid]` (default `caffeinate -i`, macOS only; pid: this process). It
    is stopped when the block exits, by return or exception (SIGTERM, SIGKILL after `grace` s).
    If this process is killed outright, `-w` makes caffeinate exit by itself when the pid dies,
    so it is never left running. Off macOS with no `command`, it does nothing. A helper that
    cannot start is logged and the run goes on. One log line says what was done.
    """
    pid = os.getpid() if pid is None else pid
    if command is None:
        if sys.platform != "darwin":
            log.debug("keep awake: not macOS (%s), nothing to do", sys.platform)
            yield None
            return
        command = CAFFEINATE
    argv = [*command, "-w", str(pid)]
    try:
        # A session of its own: Ctrl-C in the terminal must not stop it while the run saves
        # its state; it is stopped below, or by -w when the run's process is gone.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.warning("keep awake: could not start `%s` (%s); the Mac may sleep during the run: "
                    "keep it on power with the lid open", " ".join(argv), exc)
        yield None
        return
    log.info("keep awake: started `%s` (pid %d): no idle sleep until this run ends",
             " ".join(argv), proc.pid)
    try:
        yield proc
    finally:
        _stop(proc, grace)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# Thermal pressure

# OSThermalPressureLevel on macOS (<libkern/OSThermalNotification.h>): 0..4 in this order.
PRESSURE_LEVELS = ("nominal", "moderate", "heavy", "trapping", "sleeping")
PRESSURE_KEY = "com.apple.system.thermalpressurelevel"
UNKNOWN = {"level": "unknown", "cpu_speed_limit": None}


def parse_pressure_level(text: str) -> str:
    """`notifyutil -g com.apple.system.thermalpressurelevel` ("<key> 2") -> "heavy"."""
    m = re.search(re.escape(PRESSURE_KEY) + r"\s+(\d+)", text)
    if not m:
        return "unknown"
    n = int(m.group(1))
    return PRESSURE_LEVELS[n] if n < len(PRESSURE_LEVELS) else "unknown"


def parse_pmset_therm(text: str) -> dict:
    """`pmset -g therm` -> {thermal_warning, performance_warning, cpu_speed_limit, ...}.

    Warning levels are None when pmset says none has been recorded ("Note: No thermal warning
    level has been recorded"), else the number of "Thermal warning level set to N.". The CPU
    limits come from the "CPU Power notify" block (`CPU_Speed_Limit = 62`, a percentage), absent
    when pmset prints "Note: No CPU power status has been recorded"; the last block wins.
    """
    out: dict = {"thermal_warning": None, "performance_warning": None, "cpu_speed_limit": None,
                 "cpu_scheduler_limit": None, "cpu_available_cpus": None}
    for kind in ("thermal", "performance"):
        m = re.search(kind + r" warning level set to (\d+)", text, re.IGNORECASE)
        if m:
            out[f"{kind}_warning"] = int(m.group(1))
    for key in ("Speed_Limit", "Scheduler_Limit", "Available_CPUs"):
        values = re.findall(r"CPU_" + key + r"\s*=\s*(\d+)", text)
        if values:
            out["cpu_" + key.lower()] = int(values[-1])
    return out


def parse_thermal(pmset_text: str, pressure_text: str = "") -> dict:
    """{"level", "cpu_speed_limit"} from `pmset -g therm` and `notifyutil -g <pressure key>`.

    The level is the kernel's thermal pressure level (notifyutil). Without it, a pmset output
    that records no warning and no speed limit below 100 reads as nominal; anything else stays
    unknown rather than guessed from the speed limit, which is reported as it is.
    """
    pm = parse_pmset_therm(pmset_text)
    level = parse_pressure_level(pressure_text)
    limit = pm["cpu_speed_limit"]
    quiet = pm["thermal_warning"] == 0 or "no thermal warning level has been recorded" in pmset_text.lower()
    if level == "unknown" and quiet and not pm["performance_warning"] and (limit is None or limit >= 100):
        level = "nominal"
    return {"level": level, "cpu_speed_limit": limit}


def thermal() -> dict:
    """This Mac's thermal state now: two short commands (~10-30 ms); UNKNOWN off macOS."""
    if sys.platform != "darwin":
        return dict(UNKNOWN)
    return parse_thermal(run_command(["pmset", "-g", "therm"]), run_command(["notifyutil", "-g", PRESSURE_KEY]))


def describe_thermal(value: Optional[dict]) -> str:
    """One line for a table: "heavy, CPU speed limit 62% (throttled: ...)"."""
    value = value or UNKNOWN
    text = value.get("level", "unknown")
    limit = value.get("cpu_speed_limit")
    if limit is not None:
        text += f", CPU speed limit {limit}%"
    if is_throttled(value):
        text += " (throttled: this Mac's steps run slower until it cools)"
    return text


def is_throttled(value: dict) -> bool:
    """Pressure above nominal, or a CPU speed limit below 100%."""
    limit = value.get("cpu_speed_limit")
    return value.get("level") in PRESSURE_LEVELS[1:] or (limit is not None and limit < 100)


class ThermalCache:
    """The last reading of `read`, refreshed in a background thread at most every `max_age` s.

    `get()` never waits on a command (heartbeat threads call it): it returns the last reading
    (UNKNOWN before the first one lands) and, when that is older than `max_age` and no refresh
    is running, starts one; so a reading is at most `max_age` plus one call interval old.
    """

    def __init__(self, read=thermal, max_age: float = 5.0):
        self.read, self.max_age = read, max_age
        self._lock = threading.Lock()
        self._value, self._at, self._busy = dict(UNKNOWN), float("-inf"), False

    def get(self) -> dict:
        with self._lock:
            value = dict(self._value)
            if self._busy or time.monotonic() - self._at < self.max_age:
                return value
            self._busy = True
        threading.Thread(target=self._refresh, name="macfleet-thermal", daemon=True).start()
        return value

    def refresh(self) -> dict:
        """Read now, in this thread (for `macfleet status` or a first value); returns it."""
        with self._lock:
            self._busy = True
        return self._refresh()

    def _refresh(self) -> dict:
        try:
            value = self.read()
        except Exception:  # a reading must never break a heartbeat
            log.debug("thermal reading failed", exc_info=True)
            value = dict(UNKNOWN)
        with self._lock:
            self._value, self._at, self._busy = dict(value), time.monotonic(), False
        return dict(value)

    def _after_fork(self) -> None:
        # A child forked mid-refresh has the lock or the busy flag but not the thread.
        self._lock, self._busy = threading.Lock(), False


_THERMAL = ThermalCache()
os.register_at_fork(after_in_child=_THERMAL._after_fork)


def thermal_cached() -> dict:
    """This Mac's thermal state, refreshed in the background once 5 s old; microseconds, never
    blocks on a command (UNKNOWN until the first reading lands, and off macOS)."""
    if sys.platform != "darwin":
        return dict(UNKNOWN)
    return _THERMAL.get()


def thermal_level() -> str:
    """This Mac's thermal pressure level for a heartbeat or a status row ("unknown" off macOS);
    never waits on a command (see `thermal_cached`)."""
    return thermal_cached().get("level", "unknown")


SEVERE = ("heavy", "trapping", "sleeping")
"""Levels at which macOS slows the CPU and GPU hard: a node there holds every other node back."""


def thermal_change(who: str, before: Optional[str], now: str) -> Optional[str]:
    """The log line for `who`'s level going from `before` (None: no reading yet) to `now`, when
    it enters, leaves or moves within heavy-or-worse; None for any other change."""
    if before == now or (before not in SEVERE and now not in SEVERE):
        return None
    if now in SEVERE:
        was = f" (was {before})" if before is not None else ""
        return (f"thermal: {who} is {now}{was}: macOS is slowing it down, and its share of every batch "
                f"holds the other nodes back until it cools (keep it on power, lid open, off soft surfaces)")
    return f"thermal: {who} is back to {now} (was {before})"


# ---------------------------------------------------------------------------------------------
# Route to a peer

def parse_route_get(text: str) -> dict:
    """`route -n get ADDR` ("  interface: en0" lines) -> {"interface", "gateway", "destination"}."""
    out: dict = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in ("interface", "gateway", "destination", "route to"):
            out[key.replace(" ", "_")] = value.strip()
    return out


def route_warning(addr: str, route_text: str, ports_text: str, ifconfig_text: str = "") -> Optional[str]:
    """The warning `check_route` gives for these command outputs, None when the route is fine.

    Fine: an interface whose hardware port is the Thunderbolt Bridge or a Thunderbolt port, or
    loopback (the peer is this Mac).
    """
    iface = parse_route_get(route_text).get("interface")
    ports = parse_hardware_ports(ports_text)
    bridge = next((dev for dev, port in ports.items() if port == "Thunderbolt Bridge"), None)
    setup = "System Settings > Network > Thunderbolt Bridge"
    if iface is None:
        return (f"no route to {addr} from this Mac: connect the Thunderbolt cable and give the "
                f"Thunderbolt Bridge an address in the peer's subnet ({setup})")
    port = ports.get(iface)
    if iface.startswith("lo") or (port or "").startswith("Thunderbolt"):
        return None
    if port is None:
        over = f"{iface} (no hardware port: a VPN or tunnel?)"
    else:  # "Ethernet Adapter (en3)" names its device already
        over = port if port.endswith(f"({iface})") else f"{port} ({iface})"
    if bridge is None:
        return (f"traffic to {addr} goes over {over}: this Mac has no Thunderbolt Bridge; connect the "
                f"cable and set the bridge up ({setup}), then use the peer's bridge address")
    mine = next((i["ipv4"] for i in parse_ifconfig(ifconfig_text) if i["name"] == bridge), [])
    ours = f"{', '.join(mine)} on this Mac" if mine else "no address on this Mac"
    return (f"traffic to {addr} goes over {over}, not the Thunderbolt Bridge ({bridge}, {ours}): give "
            f"the bridge an address in the peer's subnet ({setup}), or use the peer's bridge "
            f"address; as it is, every gradient crosses {port or iface}, typically ten or more "
            f"times slower than the cable")


def check_route(addr: str) -> Optional[str]:
    """One warning line when traffic to `addr` does not go over Thunderbolt; None when it does,
    off macOS, for a loopback address, or when `addr` does not resolve (the join reports that).

    Runs `route -n get`, `networksetup -listallhardwareports` and `ifconfig`: ~50 ms, once at join.
    """
    if sys.platform != "darwin":
        return None
    try:
        ip = socket.gethostbyname(addr)
    except OSError:
        return None
    if ipaddress.ip_address(ip).is_loopback:
        return None
    return route_warning(addr if addr == ip else f"{addr} ({ip})", run_command(["route", "-n", "get", ip]),
                         run_command(["networksetup", "-listallhardwareports"], timeout=5.0), run_command(["ifconfig"]))
