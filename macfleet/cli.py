"""The `macfleet` command: launch, status, cancel, benchmark, info.

Training options come from conf/ (Hydra); this parser only covers the CLI's own commands.
Each subcommand lives in the module that owns it and is imported lazily, so `macfleet info`
does not pay for torch.distributed set-up.
"""

from __future__ import annotations

import argparse
import sys

from macfleet.errors import MacFleetError


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; descriptions and examples keep their lines."""

    def _get_help_string(self, action) -> str:
        # No "(default: None/False)", and none where the help already says what the default is.
        if action.default in (None, False) or action.required or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _parser(sub, name: str, summary: str, description: str, examples: str):
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.\n\n{description}",
                          epilog="examples:\n" + examples, formatter_class=_Help)


def _add_launch(sub) -> None:
    p = _parser(sub, "launch", "start a long-lived agent (master or worker)",
                "The master agent takes jobs from `python train.py` (which finds it on the control port) and runs\n"
                "them on every idle worker agent. Unless --no-discovery is given, the master advertises itself on\n"
                "the local network with zeroconf (Bonjour, _macfleet._tcp.local.) and a worker without --master\n"
                "finds it that way; with --no-discovery nothing is advertised or browsed, and a worker needs\n"
                "--master ADDR. The join token comes from --token, $MACFLEET_TOKEN or conf/local/secrets.yaml.\n"
                "Stop an agent with Ctrl-C or SIGTERM: a worker stops its job and says goodbye, and the master\n"
                "drops it at once; one killed with -9 is dropped when its heartbeats stop (1.75 x\n"
                "--heartbeat-interval). The master logs every refused agent or request (wrong token, another\n"
                "protocol version or cluster name) with its address, never the token.",
                "  macfleet launch --role master                                    # on the Pro\n"
                "  macfleet launch --role worker --master 10.0.0.1                  # on the Air\n"
                "  macfleet launch --role worker --master 10.0.0.1 --no-discovery   # no zeroconf at all")
    p.add_argument("--role", choices=["master", "worker"], required=True, help="master or worker agent")
    p.add_argument("--master", default=None, help="master address (default: discover with zeroconf)")
    p.add_argument("--master-port", type=int, default=50051, help="control-plane port")
    p.add_argument("--tensor-port", type=int, default=50052, help="data-plane port")
    p.add_argument("--name", default="macfleet", help="cluster name")
    p.add_argument("--token", default=None, help="join token (default: $MACFLEET_TOKEN)")
    p.add_argument("--weight", default="auto", help="compute weight, or 'auto' to calibrate")
    p.add_argument("--no-discovery", action="store_true",
                   help="do not advertise (master) or browse for (worker) the master with zeroconf")
    p.add_argument("--host", default="0.0.0.0", help="interface the master binds to")
    p.add_argument("--heartbeat-interval", type=float, default=1.0,
                   help="seconds between an agent's heartbeats; one silent for 1.75x this is dropped")


def _add_status(sub) -> None:
    p = _parser(sub, "status", "show the nodes of a running cluster",
                "Asks the master (found with zeroconf unless --master is given) for every node's host, chip,\n"
                "device, weight, state, last heartbeat, step, samples/s and thermal pressure (nominal, moderate,\n"
                "heavy, trapping, sleeping; '-' off macOS). A master agent lists its worker\n"
                "agents (idle or running; a stopped agent is gone from the list), or the running job's ranks.",
                "  macfleet status\n"
                "  macfleet status --master 10.0.0.1 --json")
    _add_master_options(p, 5.0, "seconds to wait for the master")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_master_options(p, timeout: float, timeout_help: str) -> None:
    """How `status` and `cancel` reach the master: address (or zeroconf), port, token, patience."""
    p.add_argument("--master", default=None, help="master address (default: discover with zeroconf)")
    p.add_argument("--master-port", type=int, default=50051, help="control-plane port")
    p.add_argument("--token", default=None, help="join token (default: $MACFLEET_TOKEN)")
    p.add_argument("--name", default="macfleet", help="cluster name (for discovery)")
    p.add_argument("--timeout", type=float, default=timeout, help=timeout_help)


def _add_cancel(sub) -> None:
    p = _parser(sub, "cancel", "cancel the job the master agent is running",
                "Stops the job that `python train.py` submitted to the master agent, on every node: each rank's\n"
                "process gets SIGTERM, then SIGKILL after 5 s. Returns once they stopped; the submitter exits with\n"
                "an error saying the job was cancelled, and the agents take the next job. Ctrl-C on the\n"
                "submitter does the same. The master agent is found with zeroconf unless --master is given.",
                "  macfleet cancel\n"
                "  macfleet cancel --master 10.0.0.1 --master-port 50051")
    _add_master_options(p, 15.0, "seconds to wait for the master agent and for the job's processes to stop")


def _add_benchmark(sub) -> None:
    p = _parser(sub, "benchmark", "measure bandwidth, all_reduce, compression, plain DDP, training scaling or "
                                  "time to accuracy against references from the same run",
                "Each figure is printed beside its reference, measured in the same run, as a table (and JSON\n"
                "rows with --json). Options name the types they apply to.",
                "  macfleet benchmark --type bandwidth --sizes 1MB,100MB\n"
                "  macfleet benchmark --type allreduce --nodes 4 --algorithm ring --repeats 9\n"
                "  macfleet benchmark --type allreduce --nodes 2 --stripes 1,2,4 --cores-per-node 16\n"
                "  macfleet benchmark --type compression --models resnet50 --codecs none,topk_fp16\n"
                "  macfleet benchmark --type scaling --nodes 2 --plot scaling.png model=resnet18\n"
                "  macfleet benchmark --type scaling --device cuda --backends nccl,gloo model=resnet50 dataset=cifar10\n"
                "  macfleet benchmark --type scaling --nodes 2 --codecs none --throttle 1:0.6@20   # as root\n"
                "  macfleet benchmark --type convergence --target 0.95 --plot accuracy.png trainer.epochs=10\n"
                "  macfleet benchmark --type ddp --nodes 2 --train-py\n"
                "  macfleet benchmark --type elastic --nodes 2 3 --trials 10 --cases kill stop ctrl-c master rejoin\n"
                "  macfleet benchmark --type elastic --cases hostile --fuzz 10000 --trials 3\n"
                "  macfleet benchmark --type loader --model resnet18 --workers 0,2")
    p.add_argument("--type", choices=["bandwidth", "allreduce", "compression", "ddp", "scaling", "convergence", "loader",
                                      "elastic"],
                   required=True,
                   help="scaling: training samples/s of a fleet vs each node alone, per codec; convergence: a fleet's "
                        "wall time to a target test accuracy, per codec; ddp: a plain DDP "
                        "script under torchrun per backend vs one process; loader: train.py's samples/s per DataLoader "
                        "worker count; elastic: a fleet's recovery from a lost, stopped, cut-off or departing worker, "
                        "a lost master and a rejoin, the state transfer a rejoin costs, and a master that keeps "
                        "training and answering under a flood of malformed messages")
    p.add_argument("--nodes", type=int, nargs="+", default=None,
                   help="local ranks / emulated nodes to start (default 2); elastic: the fleet sizes to measure "
                        "(default 2 3)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="elastic: kill stop cable ctrl-c master rejoin hostile state-transfer (default: all)")
    p.add_argument("--trials", type=int, default=10, help="elastic: trials per case and fleet size")
    p.add_argument("--fuzz", type=int, default=10000,
                   help="elastic, hostile: malformed messages sent to each of the training master's ports (control "
                        "and heartbeat) while it trains")
    p.add_argument("--heartbeat", type=float, default=1.0, help="elastic: cluster.heartbeat_interval in seconds")
    p.add_argument("--target", type=float, default=0.95, help="convergence: the test accuracy to reach")
    p.add_argument("--sizes", default="1MB,10MB,100MB", help="bandwidth, allreduce: comma list of payload sizes")
    p.add_argument("--repeats", type=int, default=7,
                   help="bandwidth, allreduce, compression, ddp, loader: timed runs per figure, >= 1 (the median is reported)")
    p.add_argument("--json", default=None, help="write JSON rows to this file")
    p.add_argument("--netns", action="store_true", help="as root: put ranks in network namespaces (10.0.0.x over veth)")
    p.add_argument("--rate", default=None, help="with --netns: shape links with tbf, e.g. 1gbit")
    p.add_argument("--algorithm", choices=["auto", "ring", "direct"], default="auto",
                   help="allreduce: the engine's algorithm (3+ ranks, auto: direct up to 4, then ring; 2 ranks: direct "
                        "exchanges whole tensors, auto and ring exchange halves)")
    p.add_argument("--models", default="resnet50,vit_base,gpt2", help="compression: parameter counts to use")
    p.add_argument("--codecs", default=None,
                   help="codecs to measure (default: compression none,fp16,int8,topk,topk_fp16; scaling none,fp16,topk_fp16; "
                        "convergence none,fp16,topk_fp16,auto); scaling and convergence: a codec may carry compression "
                        "settings after colons, e.g. topk_fp16,topk_fp16:granularity=element:ratio=0.05")
    p.add_argument("--ratio", type=float, default=0.1, help="compression: top-k ratio")
    p.add_argument("--device", default="cpu",
                   help="compression: device for codec timing; scaling, convergence, ddp and loader: the device every run trains on: cpu, "
                        "cuda or mps")
    p.add_argument("--steps", type=int, default=30, help="scaling, ddp, loader: timed training steps per run")
    p.add_argument("--runs", default=None, metavar="N",
                   help="scaling: rounds of every peer and codec run, interleaved (default 1); the table gives each "
                        "row's median run and the range, the JSON every run's samples/s. Runs on one host can move "
                        "by 10%% or more from one to the next")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="scaling: timed steps of each node's single-node reference runs (default: --steps); fewer "
                        "than --steps where the fleet run must be long, e.g. to watch a --throttle")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="scaling, ddp: steps run first and left out of the timing (default 5 for scaling, 10 for ddp)")
    p.add_argument("--cores-per-node", type=int, default=None,
                   help="scaling, convergence, ddp, bandwidth, allreduce: cores pinned to each node, OMP_NUM_THREADS "
                        "(torch threads) alike (default for scaling and convergence: this machine's cores split evenly "
                        "across --nodes; otherwise no pinning, and one torch thread per rank for bandwidth and allreduce)")
    p.add_argument("--cores", default=None,
                   help="scaling, convergence: each node's own number of cores, a comma list for unequal Macs, e.g. 8,4 "
                        "(pinned one after another, OMP_NUM_THREADS alike; instead of --cores-per-node)")
    p.add_argument("--stripes", default=None,
                   help="bandwidth, allreduce: comma list of TCP connections per peer to measure the engine with, "
                        "interleaved in one run, e.g. 1,2,4 (default: MACFLEET_STRIPES, else 1)")
    p.add_argument("--cpu-quota", default=None,
                   help="scaling, convergence, as root: per node, the fraction of its cores it may use, e.g. 1.0,0.6 for a slower "
                        "second Mac (a cgroup CPU quota; default: no quota)")
    p.add_argument("--throttle", default=None, metavar="NODE:QUOTA@WHEN",
                   help="scaling, as root: play a throttling Mac: NODE's cgroup CPU quota drops to QUOTA of its cores "
                        "WHEN seconds after each fleet run's first step (1:0.6@20), or at a step (1:0.6@step100); "
                        "reports the fleet's samples/s before, the ideal after (NODE alone at QUOTA measured too) and "
                        "the steps until it is back within 5%% of it (fleet runs log every step)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="scaling: record N steps of every run with torch.profiler after the warm-up "
                        "(trainer.profile_steps) and print where a step goes: each part's host time, the device's busy "
                        "time and kernel launches (rank 0's; every rank's trace and table in its run folder)")
    p.add_argument("--plot", default=None, help="scaling: write a bar chart of samples/s per codec to this PNG (with --throttle: "
                                                "samples/s against step); "
                                                "convergence: test accuracy against wall time per codec; "
                                                "elastic: each trial's time per case against its goal")
    p.add_argument("--backends", default=None,
                   help="ddp: torch.distributed backends (default nccl,gloo,macfleet on cuda, gloo,macfleet on cpu); engine "
                        "settings make more backends of the same run: macfleet:stripes=2, macfleet:allreduce=direct; "
                        "scaling and convergence: the peers, the same job as train.py cluster=torchrun on each "
                        "backend on the same nodes (default gloo, nccl,gloo on cuda; none with --throttle or on mps; "
                        "none: no peer)")
    p.add_argument("--model", default="resnet50", help="ddp, loader: resnet18 or resnet50 (CIFAR stem, 32x32 synthetic images)")
    p.add_argument("--batch", type=int, default=128, help="ddp: samples per rank per step; loader: the batch")
    p.add_argument("--timeout", type=float, default=600.0, help="ddp: seconds one torchrun may take")
    p.add_argument("--workers", default=None, help="loader: DataLoader worker counts to compare (default 0,2)")
    p.add_argument("--train-py", action="store_true",
                   help="ddp: also run train.py cluster=torchrun per backend (same model, global batch and steps; "
                        "synthetic CIFAR-format data through the trainer's DataLoader)")
    p.add_argument("overrides", nargs="*",
                   help="scaling, convergence, elastic: Hydra overrides for every run, e.g. model=resnet50 dataset=cifar10 "
                        "trainer.batch_size=256 trainer.epochs=5 (default: the digits CNN on digits, batch 64; "
                        "convergence: 10 epochs)")


def _add_info(sub) -> None:
    p = _parser(sub, "info", "describe this machine: chip, cores, memory, torch, interfaces",
                "What a node reports when it joins: chip, performance/efficiency cores, GPU cores, memory,\n"
                "torch version and devices, and network interfaces (the Thunderbolt bridge among them).",
                "  macfleet info\n"
                "  macfleet info --json")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macfleet", description=__doc__.splitlines()[0], formatter_class=_Help,
        epilog="examples:\n  macfleet info\n  macfleet launch --role master\n  macfleet status\n  macfleet cancel\n"
               "  macfleet benchmark --type allreduce --nodes 2\n\n"
               "Training itself: python train.py (options from conf/, Hydra). `macfleet <command> --help` for more.")
    parser.add_argument("--version", action="store_true", help="print version and exit")
    sub = parser.add_subparsers(dest="command")
    _add_launch(sub)
    _add_status(sub)
    _add_cancel(sub)
    _add_benchmark(sub)
    _add_info(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from macfleet import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "launch":
            from macfleet.cluster.agent import launch_main

            return launch_main(args) or 0
        if args.command == "status":
            from macfleet.cluster.agent import status_main

            return status_main(args) or 0
        if args.command == "cancel":
            from macfleet.cluster.agent import cancel_main

            return cancel_main(args) or 0
        if args.command == "benchmark":
            from macfleet.benchmark import benchmark_main

            return benchmark_main(args) or 0
        if args.command == "info":
            from macfleet.cluster.info import info_main

            return info_main(args) or 0
    except MacFleetError as exc:
        print(f"macfleet {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
