"""Mac care (macfleet/cluster/macos.py): thermal and route parsers on recorded command outputs, and
keep_awake with a real stand-in process for caffeinate (macOS only, so on Linux the command is a
script written here that records its argv and sleeps)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from macfleet.cluster.macos import (UNKNOWN, ThermalCache, check_route, describe_thermal, is_throttled,
                                    keep_awake, parse_pmset_therm, parse_pressure_level, parse_route_get,
                                    parse_thermal, route_warning, thermal_cached)

FIXTURES = Path(__file__).parent / "fixtures" / "macos"
not_mac = pytest.mark.skipif(sys.platform == "darwin", reason="checks the behaviour off macOS")


def _read(mac: str, name: str) -> str:
    return (FIXTURES / mac / name).read_text()


def _thermal(mac: str, variant: str = "") -> dict:
    return parse_thermal(_read(mac, f"pmset_therm{variant}.txt"), _read(mac, f"notifyutil_thermal{variant}.txt"))


# --- thermal ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mac, variant, level, limit, pmset_only", [
    ("m1air", "", "nominal", None, "nominal"),
    ("m1air", "_throttled", "heavy", 62, "unknown"),  # without notifyutil the level is not guessed
    ("m2pro", "", "nominal", 100, "nominal"),
])
def test_thermal_fixtures(mac, variant, level, limit, pmset_only):
    assert _thermal(mac, variant) == {"level": level, "cpu_speed_limit": limit}
    assert parse_thermal(_read(mac, f"pmset_therm{variant}.txt")) == {"level": pmset_only, "cpu_speed_limit": limit}
    assert is_throttled(_thermal(mac, variant)) == (variant == "_throttled")


def test_thermal_parsers_edge_cases():
    hot = parse_pmset_therm(_read("m1air", "pmset_therm_throttled.txt"))
    assert (hot["cpu_speed_limit"], hot["cpu_scheduler_limit"], hot["cpu_available_cpus"]) == (62, 100, 8)
    assert hot["thermal_warning"] is None and hot["performance_warning"] is None
    warned = "Thermal warning level set to 5.\nPerformance warning level set to 0.\n"
    assert parse_pmset_therm(warned)["thermal_warning"] == 5 and parse_pmset_therm(warned)["performance_warning"] == 0
    assert parse_thermal(warned) == {"level": "unknown", "cpu_speed_limit": None}
    assert parse_thermal("Thermal warning level set to 0.\n")["level"] == "nominal"
    two_blocks = "CPU_Speed_Limit \t= 70\nCPU_Speed_Limit \t= 85\n"  # the last block is the current one
    assert parse_pmset_therm(two_blocks)["cpu_speed_limit"] == 85
    assert [parse_pressure_level(f"com.apple.system.thermalpressurelevel {n}\n") for n in range(6)] == [
        "nominal", "moderate", "heavy", "trapping", "sleeping", "unknown"]
    assert parse_pressure_level("") == "unknown" and parse_thermal("", "") == UNKNOWN


def test_describe_thermal():
    assert describe_thermal(_thermal("m2pro")) == "nominal, CPU speed limit 100%"
    assert describe_thermal(_thermal("m1air")) == "nominal"
    hot = describe_thermal(_thermal("m1air", "_throttled"))
    assert hot.startswith("heavy, CPU speed limit 62% (throttled")
    assert describe_thermal(None) == "unknown"


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_thermal_cache_reads_in_the_background_at_most_every_max_age():
    reads = []

    def read():
        reads.append(time.monotonic())
        return _thermal("m1air", "_throttled")

    cache = ThermalCache(read, max_age=60.0)
    assert cache.get() == UNKNOWN  # the first reading is on its way, get() does not wait for it
    _wait(lambda: cache.get()["level"] == "heavy")
    for _ in range(100):
        assert cache.get() == {"level": "heavy", "cpu_speed_limit": 62}
    assert len(reads) == 1
    cache.max_age = 0.0
    cache.get()
    _wait(lambda: len(reads) == 2)
    assert cache.refresh() == {"level": "heavy", "cpu_speed_limit": 62} and len(reads) == 3


def test_thermal_cache_survives_a_failing_read():
    def read():
        raise RuntimeError("pmset vanished")

    cache = ThermalCache(read, max_age=0.0)
    assert cache.refresh() == UNKNOWN and cache.get() == UNKNOWN


def test_a_child_forked_mid_refresh_can_refresh_again():
    from macfleet.cluster import macos

    with macos._THERMAL._lock:  # as when the reading thread holds it at fork time
        macos._THERMAL._busy = True
        pid = os.fork()
        if pid == 0:  # the child: the lock and the flag must be free again
            ok = macos._THERMAL._lock.acquire(timeout=1) and not macos._THERMAL._busy
            os._exit(0 if ok else 1)
    macos._THERMAL._busy = False
    assert os.waitpid(pid, 0)[1] == 0


@not_mac
def test_thermal_cached_off_macos_is_unknown_and_instant():
    t0 = time.perf_counter()
    assert thermal_cached() == UNKNOWN
    assert time.perf_counter() - t0 < 0.01


# --- route to a peer ----------------------------------------------------------------------------

@pytest.mark.parametrize("mac, peer, iface", [("m1air", "10.0.0.1", "bridge0"), ("m2pro", "10.0.0.2", "bridge0")])
def test_route_over_the_bridge_is_fine(mac, peer, iface):
    text = _read(mac, "route_get_bridge.txt")
    assert parse_route_get(text)["interface"] == iface and parse_route_get(text)["route_to"] == peer
    assert route_warning(peer, text, _read(mac, "networksetup.txt"), _read(mac, "ifconfig.txt")) is None


def test_route_over_wifi_warns_with_what_to_do():
    text = _read("m2pro", "route_get_wifi.txt")
    assert parse_route_get(text) == {"route_to": "10.0.1.2", "destination": "default", "gateway": "192.168.1.1",
                                     "interface": "en0"}
    msg = route_warning("10.0.1.2", text, _read("m2pro", "networksetup.txt"), _read("m2pro", "ifconfig.txt"))
    assert msg.startswith("traffic to 10.0.1.2 goes over Wi-Fi (en0), not the Thunderbolt Bridge "
                          "(bridge0, 10.0.0.1 on this Mac): give the bridge an address in the peer's subnet "
                          "(System Settings > Network > Thunderbolt Bridge), or use the peer's bridge address")
    assert "\n" not in msg
    air = route_warning("192.168.1.23", _read("m1air", "route_get_wifi.txt"), _read("m1air", "networksetup.txt"),
                        _read("m1air", "ifconfig.txt"))
    assert air.startswith("traffic to 192.168.1.23 goes over Wi-Fi (en0), not the Thunderbolt Bridge (bridge0, "
                          "10.0.0.2 on this Mac)")


def test_route_warning_other_cases():
    ports = _read("m2pro", "networksetup.txt")
    over = "   route to: {0}\ndestination: {0}\n  interface: {1}\n"
    assert route_warning("10.0.0.2", over.format("10.0.0.2", "en1"), ports) is None  # Thunderbolt 1, no bridge
    assert route_warning("10.0.0.1", over.format("10.0.0.1", "lo0"), ports) is None  # the peer is this Mac
    vpn = route_warning("10.0.0.2", over.format("10.0.0.2", "utun3"), ports)
    assert vpn.startswith("traffic to 10.0.0.2 goes over utun3 (no hardware port: a VPN or tunnel?)")
    assert "bridge0, no address on this Mac" in vpn  # no ifconfig text: the bridge's address is not known
    eth = route_warning("10.0.0.2", over.format("10.0.0.2", "en3"), ports)
    assert eth.startswith("traffic to 10.0.0.2 goes over Ethernet Adapter (en3), not the Thunderbolt Bridge")
    no_bridge = "\n".join(line for line in ports.splitlines() if "bridge0" not in line and "Bridge" not in line)
    msg = route_warning("10.0.0.2", _read("m2pro", "route_get_wifi.txt"), no_bridge)
    assert "this Mac has no Thunderbolt Bridge" in msg
    assert route_warning("10.9.9.9", "", ports).startswith("no route to 10.9.9.9 from this Mac")


@not_mac
def test_check_route_off_macos_says_nothing():
    assert check_route("10.0.0.2") is None and check_route("127.0.0.1") is None


# --- keep awake ---------------------------------------------------------------------------------

@pytest.fixture
def helpers():
    """Processes a test started; any still running when it ends (a failure) are killed."""
    procs: list = []
    yield procs
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def _stand_in(tmp_path: Path, ignore_term: bool = False) -> Path:
    """An executable that records its argv and pid, then sleeps: what caffeinate does, minus -w."""
    script = tmp_path / "caffeinate"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, signal, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        + "json.dump({'argv': sys.argv[1:], 'pid': os.getpid()}, open(sys.argv[0] + '.json.tmp', 'w'))\n"
        "os.rename(sys.argv[0] + '.json.tmp', sys.argv[0] + '.json')\n"
        "time.sleep(60)\n")
    script.chmod(0o755)
    return script


def _started(script: Path) -> dict:
    done = Path(str(script) + ".json")
    _wait(done.exists)
    return json.loads(done.read_text())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_keep_awake_starts_and_stops_the_helper(tmp_path, caplog, helpers):
    caplog.set_level(logging.INFO, logger="macfleet")
    script = _stand_in(tmp_path)
    with keep_awake(command=[str(script), "-i"]) as proc:
        helpers.append(proc)
        seen = _started(script)
        assert seen == {"argv": ["-i", "-w", str(os.getpid())], "pid": proc.pid}
        assert proc.poll() is None
    assert proc.returncode == -signal.SIGTERM and _gone(proc.pid)
    lines = [r.getMessage() for r in caplog.records if r.name == "macfleet"]
    assert lines == [f"keep awake: started `{script} -i -w {os.getpid()}` (pid {proc.pid}): "
                     "no idle sleep until this run ends"]


def test_keep_awake_stops_the_helper_after_an_exception(tmp_path, helpers):
    script = _stand_in(tmp_path)
    with pytest.raises(RuntimeError, match="step failed"):
        with keep_awake(pid=4242, command=[str(script)]) as proc:
            helpers.append(proc)
            assert _started(script)["argv"] == ["-w", "4242"]
            raise RuntimeError("step failed")
    assert proc.returncode is not None and _gone(proc.pid)


def test_keep_awake_kills_a_helper_that_ignores_sigterm(tmp_path, helpers):
    script = _stand_in(tmp_path, ignore_term=True)
    t0 = time.monotonic()
    with keep_awake(command=[str(script)], grace=0.3) as proc:
        helpers.append(proc)
        _started(script)  # the SIGTERM handler is in place once it has written its argv
    assert proc.returncode == -signal.SIGKILL and _gone(proc.pid)
    assert time.monotonic() - t0 < 10


def test_keep_awake_without_the_helper_goes_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="macfleet")
    with keep_awake(command=[str(tmp_path / "no-such-caffeinate")]) as proc:
        assert proc is None
    (record,) = [r for r in caplog.records if r.name == "macfleet"]
    assert record.levelno == logging.WARNING and "could not start" in record.getMessage()


@not_mac
def test_keep_awake_is_a_no_op_off_macos(caplog):
    caplog.set_level(logging.DEBUG, logger="macfleet")
    with keep_awake() as proc:
        assert proc is None
    assert [r.getMessage() for r in caplog.records if r.name == "macfleet"] == [
        f"keep awake: not macOS ({sys.platform}), nothing to do"]
