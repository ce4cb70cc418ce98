"""Records at scale (issue #20, item 2): per-chunk stamps in a binary sidecar beside the JSON.

The round trip goes through the one writer and the one reader every command uses
(``write_reports``, ``load_results``), with real files; a sidecar that is missing,
another run's or not numpy's is refused with the fix, never joined to the wrong records.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pytest_infmax.baselines.store import BaselineError, load_runs
from pytest_infmax.load.plan import LoadConfig, RunRecords
from pytest_infmax.load.scenarios import get_scenario
from pytest_infmax.records import ErrorKind, RequestRecord, TokenSource
from pytest_infmax.reports.document import results_document
from pytest_infmax.reports.writer import ReportRequest, write_reports
from pytest_infmax.run.results import LoadResult
from pytest_infmax.sidecar import SidecarError, load_results, sidecar_path

INFMAX = str(Path(sys.executable).with_name("infmax"))


def _record(i: int, n_chunks: int, *, ok: bool = True) -> RequestRecord:
    start = 0.001 * i
    times = [start + 0.010 + 0.001 * k + 1e-9 * (k % 7) for k in range(n_chunks)]
    return RequestRecord(
        index=i,
        send_time=start,
        first_token_time=times[0] if times and ok else None,
        end_time=(times[-1] if times else start) + 0.0005,
        chunk_times=times,
        chunk_tokens=[1 + (k % 3) for k in range(n_chunks)],
        input_tokens=100,
        input_tokens_source=TokenSource.REQUEST,
        output_tokens=sum(1 + (k % 3) for k in range(n_chunks)) if ok else None,
        output_tokens_source=TokenSource.USAGE if ok else TokenSource.NONE,
        chunk_tokens_source=TokenSource.APPORTIONED,
        requested_input_tokens=100,
        requested_output_tokens=1000,
        error_kind=None if ok else ErrorKind.DISCONNECT,
        error_message=None if ok else "reset",
    )


def _load_result(name: str, records: list[RequestRecord], origin: float = 0.0) -> LoadResult:
    end = max(r.end_time or 0.0 for r in records)
    run = RunRecords(records=records, clock_origin=origin, epoch_origin=1.7e9, measured_start=origin, measured_end=end)
    config = LoadConfig(scenario=get_scenario("1k1k-mini"), concurrency=4, num_requests=len(records), warmup=0)
    return LoadResult(name=name, config=config, run=run, server={"kind": "sim"})


def _result(name: str, records: list[RequestRecord]) -> dict[str, Any]:
    return _load_result(name, records).to_dict()


def _doc() -> dict[str, Any]:
    first = [_record(i, n) for i, n in enumerate((5, 0, 17, 1))]
    first.append(_record(4, 3, ok=False))  # a failed request keeps the chunks that came
    second = [_record(i, 40) for i in range(3)]
    results = [_result("t.py::a", first), _result("t.py::b", second)]
    return results_document(results, [{"kind": "sim"}])


def test_the_sidecar_round_trip_gives_every_reader_the_same_records(tmp_path: Path) -> None:
    doc = _doc()
    path = tmp_path / "r.json"
    outcome = write_reports(doc, ReportRequest(json=path, markdown=tmp_path / "r.md"))
    side = sidecar_path(path)
    assert outcome.ok and outcome.written[:2] == [path, side] and side.name == "r.chunks.npz"
    raw = json.loads(path.read_text())
    assert raw["chunks"] == {"sidecar": "r.chunks.npz", "id": raw["chunks"]["id"], "records": 8, "stamps": 146}
    assert all("chunk_times" not in r and "chunk_tokens" not in r for res in raw["results"] for r in res["records"])
    with np.load(side, allow_pickle=False) as z:  # plain arrays: no pickle needed to read it
        assert z["times"].dtype == np.float64 and z["times"].size == 146
        assert z["time_counts"].tolist() == [5, 0, 17, 1, 3, 40, 40, 40]
    assert "chunks" not in doc and doc["results"][0]["records"][0]["chunk_times"]  # the writer copied

    back = load_results(path)
    assert back == json.loads(json.dumps(doc))  # every stamp bit for bit, every other field as written
    # infmax report and infmax table read it the same way, and draw the same tables
    again = subprocess.run([INFMAX, "report", str(path), "--markdown", str(tmp_path / "again.md")], timeout=120)
    assert again.returncode == 0
    tables = [(tmp_path / n).read_text().split("\n")[:-2] for n in ("again.md", "r.md")]  # less the files list
    assert tables[0] == tables[1] and "t.py::a" in "\n".join(tables[0])
    table = subprocess.run([INFMAX, "table", str(path)], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "t.py::b" in table.stdout
    # the gate (and infmax compare) read a results file through the same join
    runs = load_runs(path)
    assert sorted(runs) and all(len(r) == 1 for _, r in runs.values())


def test_a_results_file_without_stamps_has_no_sidecar_and_an_old_one_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_reports(_doc(), ReportRequest(json=path))
    assert sidecar_path(path).exists()
    bare = results_document([{**res, "records": None} for res in _doc()["results"]], [])
    write_reports(bare, ReportRequest(json=path))
    assert not sidecar_path(path).exists() and "chunks" not in json.loads(path.read_text())
    assert load_results(path)["results"][0]["records"] is None


def test_a_missing_or_foreign_sidecar_is_refused_naming_the_fix(tmp_path: Path) -> None:
    path, other = tmp_path / "r.json", tmp_path / "other" / "r.json"
    other.parent.mkdir()
    write_reports(_doc(), ReportRequest(json=path))
    write_reports(_doc(), ReportRequest(json=other))
    shutil.copy(sidecar_path(other), sidecar_path(path))  # another run's, under this name
    with pytest.raises(SidecarError, match="is not its sidecar .*keep r.chunks.npz beside r.json"):
        load_results(path)
    sidecar_path(path).write_bytes(b"not a zip")
    with pytest.raises(SidecarError, match="cannot be read"):
        load_results(path)
    sidecar_path(path).unlink()
    with pytest.raises(SidecarError, match="which is missing; keep r.chunks.npz beside r.json"):
        load_results(path)
    bad = subprocess.run([INFMAX, "report", str(path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "r.chunks.npz, which is missing" in bad.stderr
    with pytest.raises(BaselineError, match="which is missing"):
        load_runs(path)


def test_a_sidecar_that_asks_for_pickle_is_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_reports(_doc(), ReportRequest(json=path))
    with np.load(sidecar_path(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["times"] = np.array([object()] * int(arrays["times"].size), dtype=object)
    np.savez(sidecar_path(path), **arrays)
    with pytest.raises(SidecarError, match="cannot be read"):
        load_results(path)


def test_redaction_walks_the_document_without_its_stamps_and_keeps_them() -> None:
    from pytest_infmax.plugin import _redact_json
    from pytest_infmax.redact import add_secret

    add_secret("sk-sidecar-secret-987654")
    doc = _doc()
    doc["servers"] = [{"cmd": "serve --api-key sk-sidecar-secret-987654"}]
    stamps = [r["chunk_times"] for res in doc["results"] for r in res["records"]]
    seen: list[str] = []

    def redact(d: dict[str, Any]) -> dict[str, Any]:
        seen.append(json.dumps(d))
        return _redact_json(d)

    from pytest_infmax.sidecar import apart_from_stamps

    out = apart_from_stamps(doc, redact)
    assert "chunk_times" not in seen[0] and "sk-sidecar-secret-987654" in seen[0]
    assert out is not doc and "sk-sidecar-secret-987654" not in json.dumps(out)
    assert [r["chunk_times"] for res in out["results"] for r in res["records"]] == stamps  # put back, in order
    assert [r["chunk_times"] for res in doc["results"] for r in res["records"]] == stamps  # the input too


def _load_results() -> list[LoadResult]:
    """Runs whose clock origin is not 0, so every stamp is rounded relative to it, as in a session."""
    first = [_record(i, n) for i, n in enumerate((5, 0, 17, 1))]
    first.append(_record(4, 3, ok=False))
    for rec in first:  # stamps that round differently at the ninth decimal
        rec.chunk_times = array("d", [t + 1234.5678901234567 for t in rec.chunk_times])
        rec.send_time += 1234.5678901234567
        rec.end_time = (rec.end_time or 0.0) + 1234.5678901234567
        if rec.first_token_time is not None:
            rec.first_token_time += 1234.5678901234567
    second = [_record(i, 40) for i in range(3)]
    second[1].chunk_tokens = second[1].chunk_tokens[:10]  # fewer counts than chunks: kept as they are
    return [_load_result("t.py::a", first, origin=1234.5), _load_result("t.py::b", second)]


def test_stamps_kept_as_arrays_write_every_report_byte_for_byte_as_lists_do(tmp_path: Path) -> None:
    """The plugin keeps its records' stamps as numpy arrays (to_dict(arrays=True)), which the
    journal and the sidecar write as they are; every report must be what the lists made."""
    from pytest_infmax.plugin import _redact_json
    from pytest_infmax.reports.plots import throughput_series
    from pytest_infmax.sidecar import apart_from_stamps, split, with_lists

    results = _load_results()
    listed = [r.to_dict() for r in results]
    arrayed = [r.to_dict(arrays=True) for r in results]
    rec = arrayed[0]["records"][0]
    assert isinstance(rec["chunk_times"], np.ndarray) and isinstance(rec["chunk_tokens"], np.ndarray)
    assert with_lists(arrayed) == listed  # what crosses to another process (xdist) is the lists
    assert [throughput_series(r) for r in arrayed] == [throughput_series(r) for r in listed]
    for got, want in zip(arrayed, listed):  # a record read back from either is the same record
        for a, b in zip(got["records"], want["records"]):
            x, y = RequestRecord.from_dict(a, 1234.5), RequestRecord.from_dict(b, 1234.5)
            assert x.chunk_times.tobytes() == y.chunk_times.tobytes() and x == y

    # arrays and lists in one document (a crashed xdist worker's journaled runs beside the plugin's)
    _, want_arrays = split({"results": listed})
    _, mixed = split({"results": [arrayed[0], listed[1]]})
    assert want_arrays is not None and mixed is not None
    assert all(mixed[k].tobytes() == want_arrays[k].tobytes() for k in want_arrays if k != "id")

    texts: dict[str, dict[str, Any]] = {}
    for how, entries in (("lists", listed), ("arrays", arrayed)):
        out = tmp_path / how
        doc = results_document(entries, [{"kind": "sim"}])
        doc["environment"] = {"python": "3"}  # the same in both: it is read from this machine
        doc = apart_from_stamps(doc, _redact_json)  # as the plugin's session end does
        outcome = write_reports(
            doc,
            ReportRequest(
                json=out / "r.json", benchmark_json=out / "b.json", html=out / "r.html", markdown=out / "r.md"
            ),
        )
        assert outcome.ok, outcome.failures
        side = sidecar_path(out / "r.json")
        chunk_id = json.loads((out / "r.json").read_text())["chunks"]["id"]  # each file's own, new each time
        # less the file's id and when it was written (to the second, in the HTML and pytest-benchmark's JSON)
        files = {
            p.name: re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "WHEN", p.read_text().replace(chunk_id, "ID"))
            for p in out.iterdir()
            if p.suffix != ".npz"
        }
        with np.load(side, allow_pickle=False) as z:
            files["stamps"] = {k: z[k].tobytes() for k in z.files if k != "id"}
        texts[how] = files
    assert texts["arrays"] == texts["lists"]
    # and read back, the records hold what the lists held, bit for bit
    assert load_results(tmp_path / "arrays" / "r.json")["results"] == json.loads(json.dumps(listed))
