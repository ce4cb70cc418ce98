"""Records at scale (issue #20, item 2): how long a results file with a million per-chunk
stamps takes to write, with the stamps in the numpy sidecar (``pytest_infmax/sidecar.py``)
and, side by side, inline in the JSON as every file was written before.

The document is the ``--infmax-json`` of ``--records`` requests of ``--chunks`` content
chunks each (by default 1,000 x 1,000: the stamps of a 256-stream run of 1,000-token
requests is a quarter of it), built from real ``RequestRecord`` s through
``LoadResult.to_dict()``. Each way is timed ``--repeat`` times, interleaved, through the
same atomic writes (fsynced) the plugin uses; printed: the median and the spread, the
files' sizes, and the time to read it back (``load_results``: the JSON, then the sidecar
joined to its records), which also checks that every stamp came back. Also timed, the
same way: turning the run's records into the document's dicts (``RequestRecord.to_dict``),
now (``chunk_times`` an ``array('d')``, rounded by numpy) and as it was before
(``dataclasses.asdict``, a deep copy, then ``round`` of each stamp; kept here as
``_to_dict_before``), and the whole path from records to files, before and now.

    .venv/bin/python benchmarks/chunk_sidecar.py
    .venv/bin/python benchmarks/chunk_sidecar.py --records 100 --chunks 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_infmax.atomic import write_json_atomic
from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.load.scenarios import get_scenario
from pytest_infmax.records import RequestRecord, TokenSource
from pytest_infmax.reports.document import results_document
from pytest_infmax.run.results import LoadResult
from pytest_infmax.sidecar import load_results, sidecar_path, write_results


def records(records: int, chunks: int) -> list[RequestRecord]:
    """``records`` requests of ``chunks`` chunks each."""
    recs = []
    for i in range(records):
        start = 0.01 * i
        times = [start + 0.02 + 0.01 * k + 1.234e-7 * (k % 97) for k in range(chunks)]
        recs.append(
            RequestRecord(
                index=i,
                send_time=start,
                first_token_time=times[0],
                end_time=times[-1] + 0.001,
                chunk_times=times,
                chunk_tokens=[1] * chunks,
                input_tokens=1024,
                input_tokens_source=TokenSource.USAGE,
                output_tokens=chunks,
                output_tokens_source=TokenSource.USAGE,
                chunk_tokens_source=TokenSource.USAGE,
                requested_input_tokens=1024,
                requested_output_tokens=chunks,
            )
        )
    return recs


def document(recs: list[RequestRecord]) -> dict[str, Any]:
    """The --infmax-json document of one run of ``recs``."""
    end = max(r.end_time or 0.0 for r in recs)
    run = RunRecords(records=recs, clock_origin=0.0, epoch_origin=1.7e9, measured_start=0.0, measured_end=end)
    config = LoadConfig(scenario=get_scenario("1k1k"), concurrency=256, num_requests=len(recs), warmup=0)
    result = LoadResult(name="bench::chunks", config=config, run=run, server={"kind": "sim"}).to_dict()
    return results_document([result], [{"kind": "sim"}])


_TIME_KEYS = ("scheduled_time", "send_time", "first_token_time", "end_time", "ready_time")


def _to_dict_before(rec: RequestRecord, t0: float = 0.0) -> dict[str, Any]:
    """RequestRecord.to_dict as it was before (main at b1b05e7)."""
    d = dataclasses.asdict(rec)
    for key in _TIME_KEYS:
        if d.get(key) is not None:
            d[key] = round(d[key] - t0, 9)
    d["chunk_times"] = [round(t - t0, 9) for t in rec.chunk_times]
    for key in ("input_tokens_source", "output_tokens_source", "chunk_tokens_source"):
        d[key] = d[key].value
    d["error_kind"] = rec.error_kind.value if rec.error_kind else None
    return d


def _timed(write: Any) -> float:
    t0 = time.perf_counter()
    write()
    return time.perf_counter() - t0


def _show(label: str, seconds: list[float], size: int) -> None:
    med = statistics.median(seconds)
    print(
        f"{label:<34} median {med * 1000:8.1f} ms  (min {min(seconds) * 1000:.1f}, max {max(seconds) * 1000:.1f}; "
        f"{len(seconds)} runs)" + (f"  {size / 1e6:7.1f} MB" if size else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000, help="requests in the run (default 1000)")
    parser.add_argument("--chunks", type=int, default=1000, help="content chunks per request (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed writes of each way, interleaved (default 3)")
    args = parser.parse_args()
    recs = records(args.records, args.chunks)
    doc = document(recs)
    stamps = args.records * args.chunks
    print(f"{stamps:,} stamps ({args.records} records x {args.chunks} chunks), {args.repeat} interleaved runs each")
    dicts_before: list[float] = []
    dicts_now: list[float] = []
    for _ in range(args.repeat):
        dicts_before.append(_timed(lambda: [_to_dict_before(r) for r in recs]))
        dicts_now.append(_timed(lambda: [r.to_dict() for r in recs]))
    _show("records to dicts (before)", dicts_before, 0)
    _show("records to dicts (now)", dicts_now, 0)
    with tempfile.TemporaryDirectory() as tmp:
        inline, split = Path(tmp) / "inline.json", Path(tmp) / "split.json"
        before: list[float] = []
        after: list[float] = []
        for _ in range(args.repeat):
            before.append(_timed(lambda: write_json_atomic(inline, doc)))
            after.append(_timed(lambda: write_results(split, doc)))
        _show("JSON, stamps inline (before)", before, inline.stat().st_size)
        _show("JSON + sidecar (now)", after, split.stat().st_size + sidecar_path(split).stat().st_size)
        print(
            f"{'':<34} of which JSON {split.stat().st_size / 1e6:.1f} MB, "
            f"sidecar {sidecar_path(split).stat().st_size / 1e6:.1f} MB"
        )
        t0 = time.perf_counter()
        back = load_results(split)
        read = time.perf_counter() - t0
        got = sum(len(r["chunk_times"]) for res in back["results"] for r in res["records"])
        same = back["results"][0]["records"] == doc["results"][0]["records"]
        print(f"read back (load_results): {read * 1000:.1f} ms, {got:,} stamps, identical: {same}")
        print(f"speed-up of the write: {statistics.median(before) / statistics.median(after):.1f}x")
        whole_before = statistics.median(dicts_before) + statistics.median(before)
        whole_now = statistics.median(dicts_now) + statistics.median(after)
        print(
            f"records to files (sum of the medians): before {whole_before * 1000:.0f} ms, now {whole_now * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
