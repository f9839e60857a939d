"""The lines `macfleet benchmark --type scaling` prints under its table when a fleet run is slower
than one node: where the step went and what to try, from the rows' own figures."""

from __future__ import annotations

from macfleet.benchmark.scaling import ceiling_lines, verdict


def _row(run: str, codec: str, speedup: float, step_ms: float, compute_ms: list[float]) -> dict:
    return {"run": run, "codec": codec, "speedup": speedup, "step_s": step_ms / 1e3,
            "compute_s": [c / 1e3 for c in compute_ms], "global_batch": 256}


def test_nothing_to_say_when_every_fleet_run_beats_one_node():
    rows = [_row("1 node", "none", 1.0, 37.6, [37.6]), _row("fleet", "none", 1.74, 40.0, [21.0, 22.0])]
    assert verdict(rows) == []


def test_a_slow_run_is_explained_and_the_fastest_codec_named():
    rows = [_row("1 node", "none", 1.0, 37.6, [37.6]), _row("fleet", "none", 0.93, 40.4, [20.8, 20.9]),
            _row("fleet", "fp16", 1.21, 31.0, [20.8, 20.9])]
    lines = verdict(rows)
    assert len(lines) == 2
    # Each node's compute at its share (the longer of the two), and the rest of the fleet's step.
    assert lines[0] == ("fleet none is 0.93x one node: each node alone at its share takes at most 20.9 ms a step, "
                        "and the other 19.5 ms of the fleet's 40.4 ms step go to the gradient exchange and waiting "
                        "for it.")
    assert lines[1].startswith("compression=fp16 was the fastest here (1.21x one node)")


def test_every_codec_slower_suggests_a_larger_batch():
    rows = [_row("1 node", "none", 1.0, 37.6, [37.6]), _row("fleet", "none", 0.91, 41.3, [21.1, 21.1]),
            _row("fleet", "topk_fp16", 0.97, 38.0, [21.1, 21.1])]
    lines = verdict(rows)
    assert [ln.split(":")[0] for ln in lines[:2]] == ["fleet none is 0.91x one node", "fleet topk_fp16 is 0.97x one node"]
    assert lines[2].startswith("Every codec run here is slower than one node at a global batch of 256")
    assert "trainer.batch_size=512" in lines[2]


def test_when_the_stock_backends_are_slower_too_the_advice_says_so():
    peer = lambda b, speedup: {**_row("torchrun", "none", speedup, 52.0, [21.1, 23.8]), "backend": b}  # noqa: E731
    fleet = {**_row("fleet", "none", 0.85, 43.8, [21.1, 23.8]), "vs_peers": {"nccl": 1.18, "gloo": 1.53}}
    rows = [_row("1 node", "none", 1.0, 37.4, [37.4]), peer("nccl", 0.72), peer("gloo", 0.56), fleet]
    assert verdict(rows)[-1].startswith("Every codec run here, and the same job on nccl and gloo, is slower than "
                                        "one node at a global batch of 256")


def test_peers_are_named_beside_every_fleet_run():
    """With peers (the same job under torchrun), their speed comes first, then each fleet run
    against each of them, from the rows' own vs_peers."""
    peer = lambda b, speedup: {**_row("torchrun", "none", speedup, 30.0, [21.0, 21.0]), "backend": b}  # noqa: E731
    fleet = {**_row("fleet", "none", 1.02, 36.9, [21.0, 21.0]), "vs_peers": {"nccl": 0.97, "gloo": 1.84}}
    rows = [_row("1 node", "none", 1.0, 37.6, [37.6]), peer("nccl", 1.05), peer("gloo", 0.554), fleet]
    assert verdict(rows) == [
        "The same job under torchrun on the same nodes (compression none): torchrun nccl 1.05x, torchrun gloo 0.55x "
        "one node.",
        "fleet none: 0.97x torchrun nccl's samples/s, 1.84x torchrun gloo's samples/s."]


def _fleet(codec: str, runs: list[float]) -> dict:
    ranked = sorted(runs)
    return {"run": "fleet", "codec": codec, "samples_per_s": ranked[(len(ranked) - 1) // 2],
            "runs_samples_per_s": runs}


def test_codecs_within_five_percent_in_one_run_each_ask_for_rounds():
    from macfleet.benchmark.scaling import spread_lines

    one = {"run": "1 node", "codec": "none", "samples_per_s": 6860.0, "runs_samples_per_s": [6860.0]}
    rows = [one, _fleet("none", [5416.0]), _fleet("fp16", [5832.0]), _fleet("topk_fp16", [5601.0])]
    assert spread_lines(rows) == [
        "fleet fp16 and topk_fp16 are within 5% of each other in one run each: runs on one host can move by 10% or "
        "more from one to the next, so --runs 3 gives each a range before you choose."]
    rows[3] = _fleet("topk_fp16", [5287.0])  # 9% behind: told apart, nothing to say
    assert spread_lines(rows) == []
    assert spread_lines([one, _fleet("none", [5416.0])]) == []  # one codec: nothing to compare


def test_rounds_say_whether_the_fastest_codec_is_told_apart():
    from macfleet.benchmark.scaling import spread_lines

    # The encoder thread's 60-step runs at batch 256 (README, Accelerators): topk_fp16 against none.
    rows = [_fleet("none", [5209.0, 5548.0, 5618.0]), _fleet("topk_fp16", [5734.0, 5797.0, 5721.0])]
    assert spread_lines(rows) == ["fleet topk_fp16 was the fastest codec in each of its 3 runs: its slowest "
                                  "(5721 samples/s) beat every other codec's fastest."]
    rows = [_fleet("none", [5136.0, 6127.0, 5642.0]), _fleet("topk_fp16", [5750.0, 6137.0, 5721.0])]
    assert spread_lines(rows) == ["fleet topk_fp16 has the best median, but its runs (5721-6137 samples/s) overlap "
                                  "those of none: these runs do not tell them apart."]


def test_the_ceiling_line_compares_the_fastest_codec_with_the_exchange_free():
    # The figures of a batch-256 run on 2 H200s: nodes alone at 128 took 21.8 and 22.2 ms.
    def fleet(codec, samples):
        return {"run": "fleet", "codec": codec, "samples_per_s": samples, "one_node_samples_per_s": 6899.0,
                "compute_s": [0.0218, 0.0222], "ceiling_samples_per_s": 256 / 0.0222}

    rows = [{"run": "1 node", "codec": "none", "ceiling_samples_per_s": None},
            fleet("none", 6774.0), fleet("topk_fp16", 7710.0)]
    assert ceiling_lines(rows) == [
        "With the exchange free, these nodes would reach 11532 samples/s (1.67x one node): the slowest alone at its "
        "share takes 22.2 ms a step. The fastest codec here, topk_fp16, reached 67% of that."]
    assert ceiling_lines(rows[:1]) == []  # no fleet run (a peer that failed alone, say): nothing to compare
