"""``rolloutctl``: every step of the rollout without Airflow.

  rolloutctl gate --samples FILE [--look K --looks N] [--set key=value ...] [--json]
  rolloutctl audit --prediction-log URI --since 1h [--model M] [--out DIR] [--json]
  rolloutctl mesh render --backend istio|local --policy FILE [--namespace NS --service S --name N]
  rolloutctl mesh apply --backend local --url URL --model M --policy FILE [--token-file F]
  rolloutctl mesh apply --backend istio --policy FILE --namespace NS --service S --name N --versions 1,2
  rolloutctl verify-model PATH [--baseline PATH] [--model-dir DIR] [--json]
  rolloutctl run --spec FILE --url URL --validation DIR --prediction-log URI [--token-file F]
                 (--prometheus URL | --no-hard-guards) [--state-file F] [--outbox DIR]
                                                     (a whole rollout on the model server's router)

Exit codes: 0 pass (or done, or promoted), 1 fail (or rolled back), 2 usage error, 3 wait.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

EXIT = {"pass": 0, "skip": 0, "fail": 1, "wait": 3, "inconclusive": 3}


class UsageError(Exception):
    pass


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


MAX_SINCE = timedelta(days=3660)  # ten years of prediction log: far more than any audit reads


def _since(text: str) -> timedelta:
    m = re.fullmatch(r"(\d{1,12})([smhd])", text)
    if m is None:
        raise UsageError(f"--since takes a duration like 30m, 1h or 2d, not {text[:64]!r}")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > MAX_SINCE.total_seconds():
        raise UsageError(f"--since takes at most {MAX_SINCE.days}d, not {text!r}")
    return timedelta(seconds=seconds)


def _folder(text: str) -> Any:
    """A folder or an object store URI (``vision_rollout.folders``)."""
    from vision_rollout.folders import Folder

    try:
        return Folder(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_samples(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise UsageError(f"{path}: samples must be .csv or .parquet")


def _policy(path: Path) -> Any:
    from model_server.traffic import PolicyError, TrafficPolicy

    try:
        return TrafficPolicy.from_dict(json.loads(path.read_text()))
    except PolicyError as exc:  # a ValueError too: named first
        raise UsageError(f"{path}: invalid policy: {exc}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def cmd_gate(args: argparse.Namespace) -> int:
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.spec import MAX_LOOKS

    if not 1 <= args.looks <= MAX_LOOKS:
        raise UsageError(f"--looks takes 1 to {MAX_LOOKS}, not {args.looks}")
    config = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set takes key=value, not {item!r}")
        config[key] = _value(value)
    try:
        verdict = evaluate_gate(_read_samples(args.samples), config, args.look, args.looks)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        print(verdict.summary)
        for c in verdict.checks:
            print(f"  [{c.decision:4s}] {c.name}: {c.sentence}")
    return EXIT[verdict.decision]


def cmd_audit(args: argparse.Namespace) -> int:
    from vision_rollout.audit import REPORT, audit, report_files, write_report

    end = datetime.now(UTC)
    result = audit(args.prediction_log, end - _since(args.since), end, args.model)
    if args.out:
        where = write_report(report_files(result), args.out)
        print(f"report: {where[REPORT]}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(f"{result.verdict.upper()}: " + "; ".join(result.reasons))
    return EXIT[result.verdict]


def cmd_mesh(args: argparse.Namespace) -> int:
    import yaml

    from vision_rollout.mesh import (
        IstioRouter,
        IstioTarget,
        LocalRouter,
        RouterError,
        render_destination_rule,
        render_virtual_service,
        validate_istio,
    )

    policy = _policy(args.policy)
    if args.backend == "istio":
        if not (args.namespace and args.service and args.name):
            raise UsageError("--backend istio needs --namespace, --service and --name")
        target = IstioTarget(args.namespace, args.service, args.name)
        versions = args.versions.split(",") if args.versions else sorted(policy.versions(), key=int)
        if args.action == "render":
            objs = [render_destination_rule(target, versions), render_virtual_service(target, policy, versions)]
            for o in objs:
                validate_istio(o)
            print(yaml.safe_dump_all(objs, sort_keys=False), end="")
            return 0
        router: Any = IstioRouter(target, versions)
    else:
        if args.action == "render":
            print(json.dumps(policy.to_dict(), indent=2))
            return 0
        if not (args.url and args.model):
            raise UsageError("--backend local needs --url and --model")
        token = args.token_file.read_text().strip() if args.token_file else None
        router = LocalRouter(args.url, args.model, token)
    try:
        changed = router.set_routes(policy)
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("applied" if changed else "unchanged: already in effect")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from vision_rollout.images import verify_model

    model_dir = args.model_dir
    validation = model_dir / "validation" if model_dir else None
    report = verify_model(args.path, args.baseline, model_dir, validation)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        status = "OK" if report.ok else "FAILED"
        print(f"{status}: {report.path} sha256 {report.sha256[:16]} ({report.size_bytes} bytes) on {report.provider}")
        if report.golden_accuracy is not None:
            print(
                f"  golden inference on {report.golden_images} validation images: accuracy {report.golden_accuracy:.4f}"
                + (
                    f", agreement with baseline {report.baseline_agreement:.4f}"
                    if report.baseline_agreement is not None
                    else ""
                )
            )
        for p in report.problems:
            print(f"  problem: {p}")
    return 0 if report.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from vision_rollout.engine import Rollout, StageJudge, StageOutcome
    from vision_rollout.mesh import LocalRouter
    from vision_rollout.metrics import PrometheusSource
    from vision_rollout.notify import SlackNotifier, promotion_message, rollback_message, stage_message
    from vision_rollout.spec import RolloutSpec, SpecError

    try:
        spec = RolloutSpec.from_dict(json.loads(args.spec.read_text()))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{args.spec}: {exc}") from None
    except SpecError as exc:
        raise UsageError(f"{args.spec}: invalid spec: {exc}") from None
    if spec.mesh != "local":
        raise UsageError("rolloutctl run drives the model server's router (mesh: local); Istio runs from Airflow")
    if not args.prometheus and not args.no_hard_guards:
        raise UsageError(
            "the P99 and shadow-error guards read Prometheus: give --prometheus URL, or --no-hard-guards "
            "to roll out guarded by the replay's accuracy drop only"
        )
    unguarded = "" if args.prometheus else " (without the P99 and shadow-error guards: --no-hard-guards)"
    if unguarded:
        print(f"rolloutctl run: warning: no Prometheus{unguarded}", file=sys.stderr, flush=True)
    token = args.token_file.read_text().strip() if args.token_file else None
    state = args.state_file or Path(f".rollout-{spec.model}-original.json")
    router = LocalRouter(args.url, spec.model, token, state)
    source = PrometheusSource(args.prometheus) if args.prometheus else None
    judge = StageJudge(spec, args.url.split("://", 1)[-1], args.validation, args.prediction_log, source)
    notifier = SlackNotifier(spec.slack_channel, outbox=args.outbox) if args.outbox else None

    def report(outcome: StageOutcome) -> None:
        print(
            f"stage {outcome.weight}%: {outcome.decision} after {outcome.looks} look(s), {outcome.seconds:.0f} s: "
            f"{outcome.reason}",
            flush=True,
        )
        if notifier is not None and outcome.verdict is not None:
            notifier.send(stage_message(spec, outcome.weight, outcome.verdict))

    result = Rollout(spec, router, judge, on_stage=report).run()
    last = result.stages[-1] if result.stages else None
    if notifier is not None:
        verdicts = [o.verdict for o in result.stages if o.verdict is not None]
        notifier.send(
            promotion_message(spec, verdicts, reason=result.reason)
            if result.promoted
            else rollback_message(spec, result.reason, last.verdict if last else None, last.weight if last else None)
        )
    print(("PROMOTED: " if result.promoted else "ROLLED BACK: ") + result.reason + unguarded)
    return 0 if result.promoted else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rolloutctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gate", help="judge a canary from samples (CSV or Parquet)")
    g.add_argument("--samples", type=Path, required=True)
    g.add_argument("--look", type=int, default=1)
    g.add_argument("--looks", type=int, default=1)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="gate config, e.g. alpha=0.01")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_gate)
    a = sub.add_parser("audit", help="audit the shadow log over a recent window")
    a.add_argument(
        "--prediction-log",
        "--shadow-log",
        dest="prediction_log",
        required=True,
        help="the serving processes' prediction log: a folder or s3://bucket/prefix (--shadow-log: its old name)",
    )
    a.add_argument("--since", default="1h")
    a.add_argument("--model")
    a.add_argument("--out", type=_folder, help="write report.md, CSVs and the PNG here (a folder or s3://...)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)
    m = sub.add_parser("mesh", help="render or apply a traffic policy")
    m.add_argument("action", choices=["render", "apply"])
    m.add_argument("--backend", choices=["istio", "local"], required=True)
    m.add_argument("--policy", type=Path, required=True)
    m.add_argument("--namespace")
    m.add_argument("--service")
    m.add_argument("--name")
    m.add_argument("--versions", help="subsets to declare, e.g. 1,2 (default: the policy's versions)")
    m.add_argument("--url", help="model server, http://host:port (local backend)")
    m.add_argument("--model")
    m.add_argument("--token-file", type=Path)
    m.set_defaults(func=cmd_mesh)
    v = sub.add_parser("verify-model", help="check a candidate artifact before any traffic")
    v.add_argument("path", type=Path)
    v.add_argument("--baseline", type=Path)
    v.add_argument("--model-dir", type=Path, help="the model's repository folder (config.json, validation/)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("run", help="a whole rollout on the model server's router, without Airflow")
    r.add_argument("--spec", type=Path, required=True, help="RolloutSpec as JSON (see RolloutSpec.json_schema())")
    r.add_argument("--url", required=True, help="model server, http://host:port")
    r.add_argument("--validation", type=Path, required=True, help="labelled validation images (labels.csv)")
    r.add_argument("--token-file", type=Path)
    r.add_argument(
        "--prediction-log",
        required=True,
        help="the serving processes' prediction log (a folder or s3://bucket/prefix): the evidence",
    )
    guards = r.add_mutually_exclusive_group()
    guards.add_argument("--prometheus", help="http://host:port, for the hard guards (P99, shadow errors)")
    guards.add_argument(
        "--no-hard-guards",
        action="store_true",
        help="run without Prometheus: no P99 or shadow-error guard, only the replay's accuracy drop",
    )
    r.add_argument("--state-file", type=Path, help="where the routes before the rollout are kept")
    r.add_argument("--outbox", type=_folder, help="write the Slack reports here (a folder or s3://...)")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return 2 if exc.code else 0
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"rolloutctl {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
