"""The cost of refusing a JSON body, at an earlier commit and at this tree, side by side in one process.

Each ``--base`` revision's ``model_server`` is imported under a name of its own
(``bench/logmasking.py``'s ``import_revision``), this tree's as ``model_server``. First every arm
decodes the same ``--bodies`` random bodies (inputs of nested data with numbers, strings holding
colons, brackets, quotes and escapes, objects, empty lists; a number JSON has not, a hex literal,
NaN or a malformed token somewhere; the header length given or not) and each refusal is compared
with the first base's: the same kind of error and the same message, or the same acceptance. Then
each shape (a ~4 MiB JSON part refused for a number near its end, or an early NaN) is decoded by
every arm in rotating order, ``--rounds`` rounds, in this thread's CPU time; the ratio of each to
``json.loads`` of an accepted body of the same size, timed in the same round (medians of the
rounds). Prints a table, writes ``bench/results/refusals.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from bench.logmasking import import_revision  # noqa: E402

SIZE = 4 * 1024 * 1024 - 4096
STRINGS = ['"a"', '"a:b"', '":["', '"x,]"', '"{"', '"}"', '"data"', '"\\"data\\": ["', '"q\\\\"', '"[1, 2]"', '""']
BAD = ["01", "+1", ".5", "1.", "-.5", "0x10", "-0x1p3", "0x1.8", "NaN", "-Infinity", "1e999", "tru", "[01]", "{01}"]


def shapes() -> dict[str, tuple[str, str, bool]]:
    """Each shape: (the refused body, an accepted body of its size, whether the header length is given)."""
    n = SIZE // 5
    flat = ", ".join(["1.5"] * n)
    nested = ", ".join(["[1.5]"] * (n // 2))
    last = '{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.5, 2.5, NUMBER]}'
    strings = ", ".join(['"data"'] * (SIZE // 8))  # strings "data" in the data (each once taken for a key)
    keys = ", ".join(['"data": 1'] * (SIZE // 11))
    objects = ", ".join(['{"data": [1, 2]}'] * (SIZE // 18))
    body = {
        "flat data, 01 last": f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [{n + 1}], "data": [{flat}, NUMBER]}}]}}',
        "nested data, 0x10 last": (
            f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [{n // 2 + 1}, 1], "data": [{nested}, [NUMBER]]}}]}}'
        ),
        "a large earlier input (flat), then 01": (
            f'{{"inputs": [{{"name": "a", "datatype": "FP32", "shape": [{n}], "data": [{flat}]}}, {last}]}}'
        ),
        "a large earlier input (nested), then 01": (
            f'{{"inputs": [{{"name": "a", "datatype": "FP32", "shape": [{n // 2}, 1], "data": [{nested}]}}, {last}]}}'
        ),
        "one string first in the data, 01 last": (
            f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [{n + 2}], "data": ["s", {flat}, NUMBER]}}]}}'
        ),
        "strings 'data' in BYTES data, 01 last": (
            f'{{"inputs": [{{"name": "b", "datatype": "BYTES", "shape": [{SIZE // 8 + 1}], "data": [{strings}, NUMBER]}}]}}'
        ),
        "an escape, strings 'data' in BYTES data, 01 last": (
            f'{{"inputs": [{{"name": "b", "datatype": "BYTES", "shape": [1], "data": ["\\n", {strings}, NUMBER]}}]}}'
        ),
        "'data': 1 keys in parameters, then 0x10": (
            f'{{"inputs": [{{"name": "a", "datatype": "FP32", "shape": [1], "parameters": {{{keys}}}, "data": [1]}}, '
            '{"name": "b", "datatype": "FP32", "shape": [1], "data": [NUMBER]}]}'
        ),
        "objects {'data': [1, 2]} in earlier data, then 0x10": (
            f'{{"inputs": [{{"name": "a", "datatype": "FP32", "shape": [1], "data": [{objects}]}}, '
            '{"name": "b", "datatype": "FP32", "shape": [1], "data": [NUMBER]}]}'
        ),
        "an early NaN, the header length given": (
            f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [{n + 1}], "data": [NUMBER, {flat}]}}]}}'
        ),
        "an early NaN, no header length": (
            f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [{n + 1}], "data": [NUMBER, {flat}]}}]}}'
        ),
    }
    out = {}
    for name, text in body.items():
        bad = "NaN" if "NaN" in name else "0x10" if "0x10" in name else "01"
        assert "NUMBER" in text, name
        assert len(text) < SIZE + 4096, name
        out[name] = (text.replace("NUMBER", bad), text.replace("NUMBER", "1.0"), "header length given" in name)
    return out


def random_value(rng: random.Random, depth: int) -> str:
    pick = rng.random()
    if depth < 3 and pick < 0.3:
        return "[" + ", ".join(random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))) + "]"
    if pick < 0.4:
        return rng.choice(STRINGS)
    if pick < 0.45:
        return '{"data": [1, 2], "k": ' + rng.choice(STRINGS) + "}"
    if pick < 0.5:
        return rng.choice(["true", "null", "false"])
    return rng.choice(["1.5", "2", "-3e2", "0", "7"])


def random_body(rng: random.Random) -> tuple[bytes, str | None]:
    """An infer body of 1 to 3 inputs with a fault (or none) somewhere in its last one's data,
    its shape or its parameters, or in an earlier one's data; its header length (None: not given)."""
    inputs = []
    for i in range(rng.randrange(0, 3)):
        data = ", ".join(random_value(rng, 1) for _ in range(rng.randrange(0, 6)))
        if rng.random() < 0.1:  # a fault in an earlier input
            data += (", " if data else "") + rng.choice(BAD)
        if rng.random() < 0.5:
            data = ", ".join(["[1.5, 2]"] * rng.randrange(1, 5)) + (", " + data if data else "")
        inputs.append(f'{{"name": "e{i}", "datatype": "FP32", "shape": [2], "data": [{data}]}}')
    elements = [random_value(rng, 1) for _ in range(rng.randrange(0, 8))]
    bad = rng.choice(BAD)
    at = rng.randrange(0, len(elements) + 1)
    where = rng.random()
    if where < 0.7:
        elements.insert(at, bad)
    data = ", ".join(elements)
    if rng.random() < 0.3 and elements:  # a nested list around the fault
        data = f"[{data}]"
    name = rng.choice(['"name": "x", ', '"name": "a:b[", ', ""])
    datatype = f'"datatype": "{rng.choice(["FP32", "INT8", "BOOL", "BYTES", "FP16"])}", '
    shape = '"shape": [' + (bad if 0.7 <= where < 0.8 else "2") + "], "
    parameters = '"parameters": {"data": [' + (bad if 0.8 <= where < 0.9 else "1") + "]}, "
    members = [name, datatype, shape, parameters, f'"data": [{data}]']
    rng.shuffle(members)
    last = "{" + "".join(members).rstrip(", ") + "}" if members[-1].startswith('"data"') else ""
    if not last:
        last = "{" + ", ".join(m.rstrip(", ") for m in members if m) + "}"
    text = '{"inputs": [' + ", ".join([*inputs, last]) + "]}"
    if rng.random() < 0.1:
        text += " more"
    header = str(len(text.encode())) if rng.random() < 0.3 else None
    return text.encode(), header


def outcome(arm: Any, body: bytes, header: str | None) -> tuple[str, str]:
    try:
        arm.decode_infer_request(body, header)
    except Exception as exc:  # (each arm's own InvalidInput, PayloadTooLarge)
        return type(exc).__name__, str(getattr(exc, "message", exc))
    return "accepted", ""


def cpu_ms(call: Any) -> float:
    start = time.thread_time()
    try:
        call()
    except Exception:  # (a refusal: what is timed)
        pass
    return (time.thread_time() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="append", help="a git revision to compare (repeatable; default 915311c)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bodies", type=int, default=20000, help="random bodies whose refusals are compared")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "refusals.json")
    args = p.parse_args(argv)
    revisions = args.base or ["915311c"]
    with tempfile.TemporaryDirectory(prefix="bench-refusals-") as tmp_name:
        tmp = Path(tmp_name)
        sys.path.insert(0, str(tmp / "packages"))
        arms: dict[str, Any] = {}
        commits = {}
        for revision in revisions:
            name, commits[revision] = import_revision(revision, tmp)
            arms[revision] = importlib.import_module(f"{name}.protocol")
        arms["head"] = importlib.import_module("model_server.protocol")
        names = list(arms)
        first = names[0]
        rng = random.Random(20261206)
        differ: dict[str, list[Any]] = {arm: [] for arm in names[1:]}
        kinds: dict[str, int] = {}
        for _ in range(args.bodies):
            body, header = random_body(rng)
            base = outcome(arms[first], body, header)
            kind = "an element named" if ": element " in base[1] else base[1][:20] or base[0]
            kinds[kind] = kinds.get(kind, 0) + 1
            for arm in names[1:]:
                got = outcome(arms[arm], body, header)
                if got != base and len(differ[arm]) < 20:
                    differ[arm].append(
                        {"body": body.decode(errors="replace"), "header": header, "base": base, "got": got}
                    )
        print(f"{first}'s outcomes: {sorted(kinds.items(), key=lambda kv: -kv[1])}", flush=True)
        for arm in names[1:]:
            print(f"{arm}: {args.bodies} random bodies, {len(differ[arm])} refused otherwise than {first}", flush=True)
            for d in differ[arm][:5]:
                print("  ", d, flush=True)
        timed: dict[str, dict[str, list[float]]] = {}
        for shape, (refused, accepted, given) in shapes().items():
            data, ok = refused.encode(), accepted.encode()
            header = str(len(data)) if given else None
            runs: dict[str, list[float]] = {arm: [] for arm in [*names, "json.loads"]}
            for r in range(args.rounds):
                order = [*names, "json.loads"]
                for arm in order[r % len(order) :] + order[: r % len(order)]:
                    if arm == "json.loads":
                        runs[arm].append(cpu_ms(lambda ok=ok: json.loads(ok)))
                    else:
                        runs[arm].append(cpu_ms(lambda a=arm, d=data, h=header: arms[a].decode_infer_request(d, h)))
            timed[shape] = runs
        results = []
        for shape, runs in timed.items():
            row: dict[str, Any] = {"shape": shape, "json_loads_ms": statistics.median(runs["json.loads"])}
            parts = []
            for arm in names:
                ratio = statistics.median(a / b for a, b in zip(runs[arm], runs["json.loads"], strict=True))
                row[f"{arm}_ms"] = statistics.median(runs[arm])
                row[f"{arm}_over_json_loads"] = ratio
                parts.append(f"{arm} {ratio:.2f}x ({row[f'{arm}_ms']:.0f} ms)")
            results.append(row)
            print(f"{shape:42s} json.loads {row['json_loads_ms']:.0f} ms; " + ", ".join(parts), flush=True)
    write_result(
        args.out,
        "refusals",
        {
            "settings": {
                "rounds": args.rounds,
                "bodies": args.bodies,
                "commits": commits,
                "what": "decode_infer_request of a ~4 MiB JSON part refused (thread CPU), over json.loads of an "
                "accepted body of its size in the same round: medians of the rounds; arms in rotating order",
            },
            "same_refusals": {arm: not differ[arm] for arm in names[1:]},
            "outcomes": kinds,
            "differences": differ,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
