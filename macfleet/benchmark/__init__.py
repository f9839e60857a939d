"""`macfleet benchmark`: each figure beside its reference, measured in the same run."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a `timeout` around a long benchmark, a job scheduler) interrupts like Ctrl-C, so
    the benchmark cleans up as it does on Ctrl-C: its network namespaces, CPU quotas, processes
    and temporary folders (killed outright, it left its namespaces behind)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held():
    """Holds Ctrl-C and SIGTERM while a block starts processes, then raises KeyboardInterrupt if
    either came: an interrupt inside `subprocess.Popen`, after its fork, would leave a child
    running that the caller never got a handle to kill. (Main thread only; elsewhere a no-op.)"""
    came: list[int] = []

    def hold(signum, frame):
        came.append(signum)

    try:
        previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if came:
        raise KeyboardInterrupt


def benchmark_main(args) -> int:
    with sigterm_interrupts():
        return _benchmark(args)


def _benchmark(args) -> int:
    from macfleet.errors import ConfigError

    if args.repeats < 1:
        # Honoured as given for every type (a median of 3 is still a median); only nonsense is refused.
        raise ConfigError(f"--repeats {args.repeats}: give at least 1 timed run per figure (default 7)")
    if getattr(args, "throttle", None) and args.type != "scaling":
        raise ConfigError("--throttle is for --type scaling only: drop it or use --type scaling")
    if getattr(args, "runs", None) is not None and args.type != "scaling":
        raise ConfigError(f"--runs is for --type scaling only (rounds of its runs); --type {args.type} repeats its "
                          f"figures with --repeats")
    if args.type == "elastic":
        from macfleet.benchmark.elastic import run_elastic_benchmark

        args.nodes = args.nodes or [2, 3]
        return run_elastic_benchmark(args)
    if args.nodes is not None and len(args.nodes) > 1:
        raise ConfigError(f"--nodes {' '.join(map(str, args.nodes))}: several fleet sizes are for --type elastic; "
                          f"give one number")
    args.nodes = args.nodes[0] if args.nodes else 2
    if args.type == "scaling":
        from macfleet.benchmark.scaling import run_scaling_benchmark

        return run_scaling_benchmark(args)
    if args.type == "convergence":
        from macfleet.benchmark.convergence import run_convergence_benchmark

        return run_convergence_benchmark(args)
    if args.overrides:
        raise ConfigError(f"Hydra overrides ({' '.join(args.overrides)}) are for --type scaling, convergence and elastic only")
    if args.type in ("bandwidth", "allreduce"):
        from macfleet.benchmark.comm import run_comm_benchmark

        return run_comm_benchmark(args)
    if args.type == "loader":
        from macfleet.benchmark.loader import run_loader_benchmark

        return run_loader_benchmark(args)
    if args.type == "ddp":
        from macfleet.benchmark.ddp import run_ddp_benchmark

        return run_ddp_benchmark(args)
    from macfleet.benchmark.compression import run_compression_benchmark

    return run_compression_benchmark(args)
