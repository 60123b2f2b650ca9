"""What the checks on bytes from outside cost: strict decoding against plain decoding.

Run::

    python benchmarks/wire_bench.py            # 7 repetitions of every case
    python benchmarks/wire_bench.py --quick    # 3 repetitions, bodies of 256 KiB: a few seconds
    python benchmarks/wire_bench.py --json out.json

Each body is decoded, in the same run, by:

* ``strict``: what a node does with a request body, ``hbtrio.decode`` (CBOR:
  tags refused as their head is read, duplicate and non-text keys refused,
  depth bounded) or ``_jsonwire.loads`` (JSON: numbers too large for a float
  refused); both end in ``freeze``, which also checks every integer's range;
* ``plain``: the same decoder without those checks (cbor2's defaults, or JSON
  without the float hook), ending in ``freeze`` too: what a body cost before;
* ``raw``: the bare library call (``cbor2.loads``, ``json.loads``), no message.

Bodies: a typical schedule body (``{"n": 5}``), a ``counter@1.0`` state, a
200-byte assignment, and bodies of ``--mib`` MiB made of integers, short
strings, small maps or floats. The table gives microseconds per call for the small bodies,
milliseconds per MiB for the large ones, and strict over plain (and over raw)
from the same run. ``cbor-answer`` is a CBOR state answer, encoded alone
(``plain``) or after the look for out-of-range integers (``strict``). Every
case checks that the decoders agree on the message. Never a timing assertion.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the src layout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import cbor2

import hbtrio
from hbtrio import _jsonwire
from hbtrio._http import CBOR, encode_body
from hbtrio._message import freeze

try:
    from hbtrio._message import check_ints
except ImportError:  # a version before the integer range: no such answer to time
    check_ints = None  # type: ignore[assignment]

MIB = 1 << 20
#: Bodies also timed as a state answered in CBOR.
ANSWERS = ("counter-state", "assignment", "strings", "maps")
ID = "kJp3GXc2oMZ2fGbNvM4yy1pOehU0vcBtyJEDKArBH1A"


def plain_cbor(data: bytes) -> hbtrio.Message:
    """`hbtrio.decode` as it was before its checks: cbor2's defaults, then `freeze`."""
    from hbtrio._message import freeze  # as decode does (an import cycle)

    fp = io.BytesIO(data)
    value = cbor2.CBORDecoder(fp).decode()
    end, size = fp.tell(), fp.seek(0, io.SEEK_END)
    if end != size:
        raise ValueError("trailing bytes")
    return freeze(value, what="decoded CBOR")


def plain_json(data: bytes) -> hbtrio.Message:
    """`_jsonwire.loads` without the float hook."""
    value = json.loads(
        data.decode("utf-8"),
        object_pairs_hook=_jsonwire._object_hook,
        parse_constant=_jsonwire._reject_constant,
    )
    message = freeze(value)
    hbtrio.encode(message)
    return message


def raw_json(data: bytes) -> Any:
    return json.loads(data)


def messages(mib: float) -> dict[str, tuple[dict[str, Any], bool]]:
    """name -> (message, large): large ones are sized to about ``mib`` MiB of CBOR."""
    size = int(mib * MIB)
    return {
        "schedule-body": ({"n": 5}, False),
        "counter-state": ({"count": 123456789, "at-slot": 4711}, False),
        "assignment": (
            {
                "slot": 12,
                "body": {"n": 5},
                "message-id": ID,
                "hash-chain": ID,
                "process": ID,
                "timestamp": 1764624664000,
            },
            False,
        ),
        "ints": ({"a": [2**40 + i for i in range(size // 9)]}, True),
        "strings": ({"a": [f"{i:040d}" for i in range(size // 41)]}, True),
        "maps": ({"a": [{"k": i, "v": "x"} for i in range(size // 12)]}, True),
        "floats": ({"a": [i + 0.25 for i in range(size // 9)]}, True),
    }


def _checked_answer(state: Any) -> bytes:
    """A CBOR state answer as the node makes one (`HttpApp._state`)."""
    body = encode_body(state, CBOR)
    if b"\xc2" in body or b"\xc3" in body:  # perhaps a bignum: look for one
        check_ints(state)
    return body


def best(fn: Callable[[], object], reps: int, target: float) -> float:
    """Seconds per call: the best of ``reps`` timings of enough calls to last ``target`` s."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    number = max(1, int(target / max(once, 1e-7)))
    times = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def run(reps: int, mib: float, target: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, (message, large) in messages(mib).items():
        frozen = freeze(message)
        cbor = hbtrio.encode(frozen)
        text = _jsonwire.dumps(frozen)
        for encoding, data, decoders in (
            ("cbor", cbor, {"strict": hbtrio.decode, "plain": plain_cbor, "raw": cbor2.loads}),
            ("json", text, {"strict": _jsonwire.loads, "plain": plain_json, "raw": raw_json}),
        ):
            results = {k: fn(data) for k, fn in decoders.items()}
            ok = results["strict"] == results["plain"] == frozen
            seconds = {
                k: best(partial(fn, data), reps, target)  # type: ignore[arg-type]
                for k, fn in decoders.items()
            }
            rows.append(_row(f"{encoding}-decode", name, len(data), large, seconds, ok))
        if name in ANSWERS and check_ints is not None:  # a CBOR state answer
            state = hbtrio._message._Frozen(frozen)

            seconds = {
                "strict": best(partial(_checked_answer, state), reps, target),
                "plain": best(partial(encode_body, state, CBOR), reps, target),
            }
            rows.append(_row("cbor-answer", name, len(cbor), large, seconds, True))
    return rows


def _row(
    case: str, body: str, size: int, large: bool, seconds: dict[str, float], ok: bool
) -> dict[str, Any]:
    scale, unit = (MIB / size * 1e3, "ms_per_MiB") if large else (1e6, "us_per_call")
    row: dict[str, Any] = {"case": case, "body": body, "bytes": size, "unit": unit, "ok": ok}
    for k, v in seconds.items():
        row[k] = v * scale
    row["strict_over_plain"] = seconds["strict"] / seconds["plain"]
    if "raw" in seconds:
        row["strict_over_raw"] = seconds["strict"] / seconds["raw"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'case':<12} {'body':<14} {'bytes':>9} {'unit':<12} "
        f"{'strict':>9} {'plain':>9} {'raw':>9} {'str/plain':>9} {'str/raw':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        raw = f"{r['raw']:9.3f}" if "raw" in r else f"{'-':>9}"
        over_raw = f"{r['strict_over_raw']:7.2f}x" if "raw" in r else f"{'-':>8}"
        lines.append(
            f"{r['case']:<12} {r['body']:<14} {r['bytes']:>9} {r['unit']:<12} "
            f"{r['strict']:9.3f} {r['plain']:9.3f} {raw} {r['strict_over_plain']:8.2f}x {over_raw}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 256 KiB bodies")
    parser.add_argument("--reps", type=int, default=None, help="timings per case (best counts)")
    parser.add_argument("--mib", type=float, default=None, help="size of the large bodies")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    mib = args.mib or (0.25 if args.quick else 1.0)
    rows = run(reps, mib, target=0.02 if args.quick else 0.2)
    print(table(rows))
    document = {
        "python": platform.python_version(),
        "cbor2": importlib.metadata.version("cbor2"),
        "reps": reps,
        "mib": mib,
        "rows": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=1))
    bad = [r for r in rows if not r["ok"]]
    if bad:
        print(f"decoders disagree: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
