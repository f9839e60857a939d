"""Step profile: where a training step's time goes, on the host and on the device.

`trainer.profile_steps=N` records N training steps with torch.profiler, right after the timing
warm-up (`trainer.timing_warmup_steps`); those N steps are then left out of samples_per_s, since
the profiler slows them. Every rank writes into its run folder

    profile/rank<R>.json   a trace: open it in https://ui.perfetto.dev or chrome://tracing
    profile/rank<R>.txt    the summary line, then the ops by host time

and logs one line, e.g.

    profile, rank 0, 5 steps on cuda: 40.1 ms a step: data 0.3, forward 9.1, backward 27.2
    (the gradient exchange included), optimizer 1.9, between steps 1.6; device busy 23.9 ms (60%);
    1,512 kernel launches a step, 6.1 us each

Rank 0's figures go into metrics.json as `profile` (what `macfleet benchmark --type scaling
--profile N` prints per run). "device busy" is the union of the device's kernels and copies over
the window: the rest of the step the device sat idle, waiting for the host to launch work or for
the gradients to come back. On MPS and the CPU only host times are recorded (torch.profiler
has no MPS activity).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

from macfleet.comm.threads import tracing

log = logging.getLogger("macfleet")

PHASES = ("data", "forward", "backward", "exchange", "optimizer")
"""A step's parts as train_step times them. "backward" includes the gradient exchange where
PyTorch DDP waits for it inside backward; the flat path's wait is "exchange"."""

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel")
_NOTHING = contextlib.nullcontext()


class StepProfiler:
    """Records `steps` training steps of this rank; `phase(name)` marks a part of a step."""

    def __init__(self, steps: int, device: torch.device, out_dir: Path, rank: int):
        self.steps = int(steps)
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.active = False
        self.done = False
        self.summary: dict | None = None
        self._prof = None
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        self._step_s = 0.0
        self._counted = 0
        self._t0 = 0.0
        self._window = 0.0

    # -- the trainer's calls --------------------------------------------------------------------
    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        from macfleet.device import synchronize

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        else:
            # A CUDA build of torch on a machine without a GPU: kineto would log "ERROR ...
            # gpuGetDeviceCount failed" although nothing is wrong (a user's own setting wins).
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        synchronize(self.device)
        self._prof = profile(activities=activities, **_all_threads())
        self._prof.__enter__()
        tracing(True)  # the comm threads' spans (staging, each collective, landing) join the trace
        self.active = True
        self._t0 = time.perf_counter()

    def phase(self, name: str):
        """A context timing part `name` of a step while profiling; a shared no-op otherwise (it is
        entered five times every training step)."""
        return self._timed(name) if self.active else _NOTHING

    @contextlib.contextmanager
    def _timed(self, name: str):
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"macfleet.{name}"):
            yield
        self._phase_s[name] += time.perf_counter() - t0

    def step_done(self, seconds: float) -> bool:
        """One profiled step took `seconds` (train_step's wall time); True once the last is in
        (the recording then stops; `finish` reads it)."""
        if not self.active:
            return False
        self._step_s += seconds
        self._counted += 1
        if self._counted < self.steps:
            return False
        self.stop()
        return True

    def stop(self) -> None:
        """End the recording. Its events are read and its files written by `finish`, once the
        run's steps are over: reading and writing a trace takes long, and while one rank did it
        between its last profiled step and its first timed one, the other ranks' first timed step
        waited for it."""
        from macfleet.device import synchronize

        tracing(False)  # first: a failing synchronize (a device error ending the run) must not leave it on
        synchronize(self.device)
        self._window = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self.active, self.done = False, True

    def finish(self) -> dict | None:
        """The figures of the recorded steps (None if none were recorded); the first call reads
        the events and writes profile/rank<R>.json and .txt."""
        if self.active:
            self.stop()
        if not self.done or self.summary is not None:
            return self.summary
        window = self._window
        n = max(1, self._counted)
        try:
            events = self._prof.events()
        except Exception as exc:  # noqa: BLE001 - never lose the run (or hide its error) over its profile
            log.warning("profile: could not read the recorded steps: %s", exc)
            return None
        busy, launches, launch_s = _device_figures(events, self.device)
        comm = {k: v / n for k, v in _comm_figures(events).items()}
        phases = {k: v / n for k, v in self._phase_s.items() if v > 0}
        self.summary = {
            "steps": self._counted, "device": self.device.type, "window_s": window,
            "step_s": window / n, "train_step_s": self._step_s / n, "phases_s": phases,
            "between_steps_s": max(0.0, (window - self._step_s) / n),
            "device_busy_s": None if busy is None else busy / n,
            "device_busy": None if busy is None else busy / window if window > 0 else 0.0,
            "launches_per_step": None if launches is None else launches / n,
            "launch_us": None if not launches else 1e6 * launch_s / launches,
            "comm_s": comm,
        }
        self._write()
        return self.summary

    # -- output ---------------------------------------------------------------------------------
    def line(self) -> str:
        s = self.summary or {}
        parts = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in s.get("phases_s", {}).items())
        text = (f"profile, rank {self.rank}, {s['steps']} steps on {s['device']}: {1e3 * s['step_s']:.1f} ms a step: "
                f"{parts}, between steps {1e3 * s['between_steps_s']:.1f}")
        if s.get("device_busy_s") is not None:
            text += f"; device busy {1e3 * s['device_busy_s']:.1f} ms ({100 * s['device_busy']:.0f}%)"
        if s.get("launches_per_step"):
            text += f"; {s['launches_per_step']:,.0f} kernel launches a step, {s['launch_us']:.1f} us each"
        if s.get("comm_s"):
            text += "; comm threads: " + ", ".join(f"{k[5:]} {1e3 * v:.1f}" for k, v in s["comm_s"].items())
        return text

    def _write(self) -> None:
        folder = self.out_dir / "profile"
        trace = folder / f"rank{self.rank}.json"
        try:  # a full disk or a read-only folder: the figures still reach the log and metrics.json
            folder.mkdir(parents=True, exist_ok=True)
            self._prof.export_chrome_trace(str(trace))
            table = self._prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (folder / f"rank{self.rank}.txt").write_text(self.line() + "\n\n" + table + "\n")
        except Exception as exc:  # noqa: BLE001 - never lose the run over its profile
            log.warning("profile: could not write its files under %s: %s", folder, exc)
        log.info("%s (trace: %s)", self.line(), trace)


def _all_threads() -> dict:
    """torch.profiler's option to record every thread (the comm threads were started before the
    profile), where this torch has it."""
    try:
        from torch._C._profiler import _ExperimentalConfig

        return {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        return {}


def _comm_figures(events) -> dict[str, float]:
    """Seconds the comm threads spent in each of their spans (`comm.<collective>`, with
    `comm.staging_wait` inside it, `comm.landing`, and `comm.encode` on the encoder thread)
    over `events`, largest first."""
    total: dict[str, float] = {}
    for e in events:
        if e.name.startswith("comm."):
            total[e.name] = total.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e6
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _device_figures(events, device: torch.device):
    """(seconds the device was busy, kernel launches, host seconds in launch calls) over
    `events`; the device figures are None where nothing ran on a device."""
    from torch.autograd import DeviceType

    spans, launches, launch_us = [], 0, 0.0
    for e in events:
        if e.device_type == DeviceType.CUDA:
            if not getattr(e, "is_user_annotation", False):  # record_function ranges mirrored on the device
                spans.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith(_LAUNCHES):
            launches += 1
            launch_us += e.time_range.end - e.time_range.start
    if device.type != "cuda":
        return None, None, 0.0
    return _union_us(spans) / 1e6, launches, launch_us / 1e6


def _union_us(spans: list[tuple[float, float]]) -> float:
    """The length covered by a set of [start, end) intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
