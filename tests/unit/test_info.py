"""`macfleet info`: macOS parsers on recorded command outputs, and the live command on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from macfleet.cluster.info import (describe_macos, format_info, parse_hardware_ports, parse_ioreg_gpu_cores,
                                   parse_sysctl, render)

FIXTURES = Path(__file__).parent / "fixtures" / "macos"


def _mac(name: str, thermal: str = "") -> dict:
    d = FIXTURES / name
    return describe_macos(*(d.joinpath(f).read_text() for f in (
        "sysctl.txt", "sw_vers.txt", "system_profiler_displays.txt", "ifconfig.txt", "networksetup.txt",
        f"pmset_therm{thermal}.txt", f"notifyutil_thermal{thermal}.txt")))


@pytest.mark.parametrize("name, chip, perf, eff, gpu, mem_gib, bridge_ip, os_name", [
    ("m2pro", "Apple M2 Pro", 8, 4, 19, 32, "10.0.0.1", "macOS 14.4.1 (23E224)"),
    ("m1air", "Apple M1", 4, 4, 7, 8, "10.0.0.2", "macOS 13.6.3 (22G436)"),
])
def test_recorded_macs(name, chip, perf, eff, gpu, mem_gib, bridge_ip, os_name):
    info = _mac(name)
    assert (info["chip"], info["performance_cores"], info["efficiency_cores"], info["gpu_cores"]) == (chip, perf, eff, gpu)
    assert info["memory_bytes"] == mem_gib * 2**30 and info["os"] == os_name
    bridges = [i for i in info["interfaces"] if i["thunderbolt_bridge"]]
    assert [(b["name"], b["ipv4"], b["members"][:1]) for b in bridges] == [("bridge0", [bridge_ip], ["en1"])]
    wifi = next(i for i in info["interfaces"] if i["name"] == "en0")
    assert wifi["port"] == "Wi-Fi" and not wifi["thunderbolt_bridge"] and wifi["ipv4"]
    text = render(dict(info, host="mac", torch="2.3.0", devices=["mps", "cpu"]))
    bridge_line = next(line for line in text.splitlines() if "bridge0" in line)
    assert bridge_ip in bridge_line and "<- Thunderbolt Bridge" in bridge_line
    assert f"{perf} performance + {eff} efficiency" in text and f"gpu cores: {gpu}" in text
    assert sum("<- Thunderbolt Bridge" in line for line in text.splitlines()) == 1
    assert info["thermal"]["level"] == "nominal" and "thermal:   nominal" in text


def test_info_json_and_table_show_thermal_pressure():
    hot = _mac("m1air", "_throttled")
    shown = json.loads(format_info(dict(hot, host="air", torch="2.3.0", devices=["mps", "cpu"]), as_json=True))
    assert shown["thermal"] == {"level": "heavy", "cpu_speed_limit": 62}
    assert shown["chip"] == "Apple M1" and shown["interfaces"] == hot["interfaces"]
    table = format_info(hot)
    assert "thermal:   heavy, CPU speed limit 62% (throttled" in table
    pro = json.loads(format_info(_mac("m2pro"), as_json=True))
    assert pro["thermal"] == {"level": "nominal", "cpu_speed_limit": 100}


def test_parsers_edge_cases():
    assert parse_ioreg_gpu_cores((FIXTURES / "m2pro" / "ioreg_agx.txt").read_text()) == 19
    assert parse_ioreg_gpu_cores("") is None
    ports = parse_hardware_ports((FIXTURES / "m2pro" / "networksetup.txt").read_text())
    assert ports["bridge0"] == "Thunderbolt Bridge" and ports["en1"] == "Thunderbolt 1" and len(ports) == 6
    assert parse_sysctl("hw.ncpu: 12\nnot a pair\n") == {"hw.ncpu": 12}


def test_info_command_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "macfleet.cli", "info", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["cpu_cores"] >= 1 and info["memory_bytes"] > 0 and info["torch"]
    assert "cpu" in info["devices"] and any(i["name"] == "lo" or i["name"] == "lo0" for i in info["interfaces"])
    assert set(info["thermal"]) == {"level", "cpu_speed_limit"}
    if sys.platform != "darwin":
        assert info["thermal"] == {"level": "unknown", "cpu_speed_limit": None}
    assert info["comm"]["transport"] in ("zmq", "tcp") and 1 <= info["comm"]["lanes"] <= 4


def test_info_says_which_data_plane_a_group_gets():
    env = {**os.environ, "MACFLEET_LANES": "3"}
    out = subprocess.run([sys.executable, "-m", "macfleet.cli", "info"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "with 3 tcp data lanes for all_reduces of 1 MB or more" in " ".join(out.stdout.split())
    env["MACFLEET_LANES"] = "lots"
    out = subprocess.run([sys.executable, "-m", "macfleet.cli", "info"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr  # reported on its line, not a crash
    assert "MACFLEET_LANES='lots': give a whole number" in out.stdout
