"""`macfleet <command> --help` as a user reads it, and --repeats taken as given."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "macfleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command, default", [
    ("launch", "(default: 50051)"),
    ("status", "(default: 5.0)"),
    ("cancel", "(default: 15.0)"),
    ("benchmark", "(default: 1MB,10MB,100MB)"),
    ("info", None),  # its one option is a flag: nothing to default
])
def test_every_command_has_a_description_an_example_and_its_defaults(command, default):
    res = _cli(command, "--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    usage, description = text.split("\n\n")[:2]
    assert usage.startswith(f"usage: macfleet {command}") and len(description) > 20
    examples = text.split("examples:\n", 1)[1]
    assert f"  macfleet {command}" in examples
    if default:
        assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_launch_help_says_it_advertises_with_zeroconf_and_how_to_stop_it():
    text = _cli("launch", "--help").stdout
    description = text.split("options:")[0]
    assert "zeroconf" in description and "advertises" in description and "--no-discovery" in description


def test_top_level_help_has_examples():
    text = _cli("--help").stdout
    assert "examples:" in text and "macfleet launch --role master" in text


def test_benchmark_repeats_is_honoured_as_given(tmp_path):
    out = tmp_path / "bench.json"
    res = _cli("benchmark", "--type", "bandwidth", "--sizes", "64KB", "--repeats", "3", "--json", str(out), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "median of 3 runs" in res.stdout
    assert json.loads(out.read_text())
    res = _cli("benchmark", "--type", "compression", "--models", "4096", "--codecs", "none", "--repeats", "3",
               "--nodes", "1", timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "median of 3" in res.stdout and "median of 5" not in res.stdout


def test_benchmark_repeats_below_one_is_a_clear_error():
    res = _cli("benchmark", "--type", "allreduce", "--repeats", "0")
    assert res.returncode == 1
    assert res.stderr.strip() == ("macfleet benchmark: error: --repeats 0: give at least 1 timed run per figure "
                                  "(default 7)")
