"""The line `macfleet benchmark --type scaling` gives when a run fails: the cause its log names."""

from __future__ import annotations

from macfleet.benchmark.scaling import _why

# The shape of a torchrun agent's log when its rank raised (nccl across namespaces, 2 H200s).
TORCHRUN_LOG = """\
Error executing job with overrides: ['cluster=torchrun', 'cluster.backend=nccl']
Traceback (most recent call last):
  File "/work/main/train.py", line 40, in main
torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3780, unhandled system error
ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error.
Last error:
Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
Traceback (most recent call last):
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  error_file: <N/A>
"""


def test_a_torchrun_log_gives_the_ranks_exception(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(TORCHRUN_LOG)
    assert _why(log, None) == ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:3780, "
                               "unhandled system error")


def test_a_macfleet_error_line_is_given_as_it_reads(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("starting\nmacfleet: error: cluster.weights has 3 values for 2 nodes\n")
    assert _why(log, None) == "cluster.weights has 3 values for 2 nodes"


def test_a_macfleet_error_under_torchrun_wins_over_torchrun_s_closing_lines(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("macfleet: error: MACFLEET_LANES='x': give a whole number of comm lanes, 1..8\n"
                   "Traceback (most recent call last):\n    raise ChildFailedError(\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n  error_file: <N/A>\n")
    assert _why(log, None) == "MACFLEET_LANES='x': give a whole number of comm lanes, 1..8"
