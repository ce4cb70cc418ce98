"""Per-chunk stamps of a results file, in a binary sidecar beside it (issue #20, item 2).

A run's records hold when every content chunk arrived and how many tokens it carried
(``RequestRecord.chunk_times``, ``chunk_tokens``): at 256 streams of 1,000 one-token
events, a quarter of a million numbers a run, each of which costs JSON about a
microsecond to write as text (5.6 s for a 30 MB results file, issue #20). So the
``--infmax-json`` file keeps every record's other fields, readable, and the stamps go
to ``PATH.chunks.npz`` beside it (``results/perf.json`` -> ``results/perf.chunks.npz``),
one numpy array each, written in one go (``benchmarks/chunk_sidecar.py``):

* ``times`` (float64, seconds from the run's clock origin, as the JSON's other times)
  and ``tokens`` (int64): every record's chunks, one record after another, the records
  in the JSON's order (results in order, each result's ``records`` in order);
* ``time_counts``, ``token_counts`` (int64): how many of each every record has;
* ``format`` and ``id``: the JSON names the sidecar and its ``id`` (``"chunks":
  {"sidecar": ..., "id": ..., "records": N, "stamps": M}``), so a sidecar that is not
  this JSON's (an older run's, a copy of one without the other) is refused, never
  joined to the wrong records.

Read with ``np.load(allow_pickle=False)``: a sidecar is data, never code. Every reader
of a results file (``infmax report``, ``infmax table``, the gate and ``infmax
compare``) goes through :func:`load_results`, which puts the stamps back into the
records: every report sees the same records as the session that wrote them.
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_infmax.atomic import write_stream_atomic, write_text_atomic
from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:  # imported at first use, not with this module (pytest_infmax/lazy.py): the plugin imports it
    np = lazy_module("numpy")

FORMAT = "pytest-infmax-chunks/1"
SUFFIX = ".chunks.npz"
_KEYS = ("chunk_times", "chunk_tokens")


class SidecarError(ValueError):
    """A results file's sidecar is missing, unreadable, or not this file's."""


def sidecar_path(json_path: Path) -> Path:
    """Where the stamps of ``json_path`` go: ``perf.json`` -> ``perf.chunks.npz``."""
    return json_path.with_name(json_path.stem + SUFFIX)


def _records(doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for result in doc.get("results") or ():
        if isinstance(result, Mapping):
            records = result.get("records")
            if isinstance(records, list):
                yield from (r for r in records if isinstance(r, dict))


def _stamps(rec: Mapping[str, Any], key: str) -> Any:
    """A record's stamps: a list (as JSON reads them) or a numpy array (``to_dict(arrays=True)``)."""
    value = rec.get(key)
    return () if value is None else value


def _column(parts: list[Any], dtype: Any, count: int) -> np.ndarray:
    """Every record's stamps in one array, in order: numpy arrays joined as they are (a copy
    at memory speed), lists read once (the plugin's arrays and a crashed xdist worker's
    journaled lists may meet in one document)."""
    if all(isinstance(p, np.ndarray) for p in parts):
        joined = np.concatenate(parts) if parts else np.empty(0)
        return joined.astype(dtype, copy=False)
    if not any(isinstance(p, np.ndarray) for p in parts):
        return np.fromiter(chain.from_iterable(parts), dtype=dtype, count=count)
    return np.concatenate(
        [
            p.astype(dtype, copy=False) if isinstance(p, np.ndarray) else np.fromiter(p, dtype=dtype, count=len(p))
            for p in parts
        ]
    )


def split(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """``doc`` without its records' stamps (a copy: ``doc`` is left as it is), and the
    sidecar's arrays; None where no record has a stamp list."""
    times: list[Any] = []
    tokens: list[Any] = []
    time_counts: list[int] = []
    token_counts: list[int] = []
    results = []
    for result in doc.get("results") or ():
        records = result.get("records") if isinstance(result, Mapping) else None
        if not isinstance(records, list):
            results.append(result)
            continue
        kept = []
        for rec in records:
            if not isinstance(rec, dict):
                kept.append(rec)
                continue
            t, k = _stamps(rec, "chunk_times"), _stamps(rec, "chunk_tokens")
            times.append(t)
            tokens.append(k)
            time_counts.append(len(t))
            token_counts.append(len(k))
            kept.append({key: value for key, value in rec.items() if key not in _KEYS})
        results.append({**result, "records": kept})
    if not time_counts:
        return dict(doc), None
    ident = uuid.uuid4().hex
    arrays = {
        "format": np.array(FORMAT),
        "id": np.array(ident),
        "times": _column(times, np.float64, sum(time_counts)),
        "tokens": _column(tokens, np.int64, sum(token_counts)),
        "time_counts": np.array(time_counts, dtype=np.int64),
        "token_counts": np.array(token_counts, dtype=np.int64),
    }
    out = {**doc, "results": results}
    out["chunks"] = {"id": ident, "records": len(time_counts), "stamps": int(arrays["times"].size)}
    return out, arrays


def with_lists(results: list[Any]) -> list[Any]:
    """``results`` (result dicts) with their records' stamps as lists, as JSON reads them: plain
    data, for what carries results to another process (pytest-xdist's report serialisation);
    the records are copies where a stamp array was turned into a list, ``results`` unchanged."""
    out = []
    for result in results:
        records = result.get("records") if isinstance(result, Mapping) else None
        if isinstance(records, list) and any(
            isinstance(rec, dict) and hasattr(rec.get(key), "tolist") for rec in records for key in _KEYS
        ):
            result = {
                **result,
                "records": [
                    {k: v.tolist() if k in _KEYS and hasattr(v, "tolist") else v for k, v in rec.items()}
                    if isinstance(rec, dict)
                    else rec
                    for rec in records
                ],
            }
        out.append(result)
    return out


def apart_from_stamps(doc: dict[str, Any], fn: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """``fn(doc)`` with the records' stamps set aside while it runs, then put back (into
    ``doc``, and into what ``fn`` returned where that is a new document of the same shape):
    for what walks the document's text, such as redaction, which numbers cannot need."""
    records = list(_records(doc))
    held = [tuple(rec.pop(key, None) for key in _KEYS) for rec in records]

    def put_back(into: list[dict[str, Any]]) -> None:
        for rec, stamps in zip(into, held):
            for key, value in zip(_KEYS, stamps):
                if value is not None:
                    rec[key] = value

    try:
        out = fn(doc)
    finally:
        put_back(records)
    if out is not doc:
        put_back(list(_records(out)))
    return out


def write_results(path: Path, doc: Mapping[str, Any]) -> list[Path]:
    """Write the ``--infmax-json`` document ``doc`` to ``path``, its stamps to the sidecar
    beside it (first: the JSON that names it comes second, so a reader never finds a JSON
    whose sidecar is yet to come); each atomically. The paths written, the JSON first."""
    out, arrays = split(doc)
    written = []
    if arrays is not None:
        side = sidecar_path(path)
        out["chunks"] = {"sidecar": side.name, **out["chunks"]}
        a = arrays  # uncompressed: stamps do not compress much, and time matters; no object arrays, so no pickle
        write_stream_atomic(  # numpy writes the arrays into the file itself: no copy of them in memory
            side,
            lambda f: np.savez(
                f,
                format=a["format"],
                id=a["id"],
                times=a["times"],
                tokens=a["tokens"],
                time_counts=a["time_counts"],
                token_counts=a["token_counts"],
            ),
        )
        written.append(side)
    else:  # a sidecar of an earlier file of the same path is stale now
        try:
            os.unlink(sidecar_path(path))
        except FileNotFoundError:
            pass
    write_text_atomic(path, json.dumps(out, indent=1, allow_nan=False) + "\n")
    return [path, *written]


def join(doc: dict[str, Any], json_path: Path) -> dict[str, Any]:
    """Put the stamps of the sidecar ``doc`` names back into its records (in place); a
    document without one (every file before the sidecar) is returned as it is."""
    spec = doc.pop("chunks", None)
    if spec is None:
        return doc
    if not isinstance(spec, Mapping) or not isinstance(spec.get("sidecar"), str):
        raise SidecarError(f"{json_path}: its 'chunks' entry does not name a sidecar file: {spec!r}")
    side = json_path.parent / Path(spec["sidecar"]).name  # beside the JSON, wherever it was written
    fix = f"keep {side.name} beside {json_path.name} (copy, move and upload the two together)"
    try:
        with np.load(side, allow_pickle=False) as z:
            arrays = {name: z[name] for name in ("format", "id", "times", "tokens", "time_counts", "token_counts")}
    except FileNotFoundError:
        raise SidecarError(f"{json_path}: its per-chunk stamps are in {side}, which is missing; {fix}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise SidecarError(f"{json_path}: its per-chunk stamps file {side} cannot be read ({exc}); {fix}") from None
    if str(arrays["format"]) != FORMAT or str(arrays["id"]) != spec.get("id"):
        raise SidecarError(
            f"{json_path}: {side} is not its sidecar (id {str(arrays['id'])!r}, the JSON names "
            f"{spec.get('id')!r}): written by another run; {fix}"
        )
    return attach(doc, arrays, f"{json_path}: {side}", fix)


def attach(doc: dict[str, Any], arrays: Mapping[str, np.ndarray], source: str, fix: str = "") -> dict[str, Any]:
    """Put the stamps of ``arrays`` (as :func:`split` makes them) back into ``doc``'s records,
    in place; ``source`` names where they came from in the error when they do not fit."""
    records = list(_records(doc))
    time_counts, token_counts = arrays["time_counts"], arrays["token_counts"]
    times, tokens = arrays["times"], arrays["tokens"]
    if not (
        len(records) == time_counts.size == token_counts.size
        and int(time_counts.sum()) == times.size
        and int(token_counts.sum()) == tokens.size
        and time_counts.min(initial=0) >= 0
        and token_counts.min(initial=0) >= 0
    ):
        raise SidecarError(
            f"{source} holds stamps of {time_counts.size} records, the JSON {len(records)}"
            + (f"; {fix}" if fix else "")
        )
    all_times, all_tokens = times.tolist(), tokens.tolist()
    t_at = k_at = 0
    for rec, n_t, n_k in zip(records, time_counts.tolist(), token_counts.tolist()):
        rec["chunk_times"] = all_times[t_at : t_at + n_t]
        rec["chunk_tokens"] = all_tokens[k_at : k_at + n_k]
        t_at += n_t
        k_at += n_k
    return doc


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An ``--infmax-json`` document with its records' stamps, from the JSON and its sidecar.
    Raises ``OSError`` or ``ValueError`` (:class:`SidecarError`) naming what is wrong."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise ValueError("not an --infmax-json document (no 'results' list)")
    return join(doc, path)
