"""The ``orchestrator`` command: argument parsing and printing only; the library does the work.

Exit codes: 0 success, 1 the system failed (store unreachable, commit failed), 2 the input was
wrong (bad URI, unknown dataset, bad file), 3 ``--strict`` ingest refused rejected inputs,
4 access denied (``AccessDenied``; ``policy check`` says no).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shlex
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import AccessDenied, ConfigError, OrchestratorError

EXIT_SYSTEM, EXIT_USER, EXIT_REJECTED, EXIT_DENIED = 1, 2, 3, 4
_out = sys.stdout


def emit(*args, **kwargs) -> None:
    """Print a command's result. Only results go to stdout (so `--json` output parses): Ray
    and library messages, which can be written to stdout from other threads, go to stderr."""
    print(*args, file=_out, **kwargs)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=os.environ.get("ORCHESTRATOR_STORE"),
        help="store URI: file:///abs/path or s3://bucket/prefix (default: $ORCHESTRATOR_STORE)",
    )


def _dataset_command(sub: Any, command: str, help_text: str, func: Callable[[argparse.Namespace], int], *,
                     version: bool = True) -> argparse.ArgumentParser:
    """A subcommand on one dataset: ``orchestrator COMMAND NAME [--version N] [--store URI] ...``,
    the same way for every command."""
    p = sub.add_parser(command, help=help_text)
    p.set_defaults(func=func)
    _store_arg(p)
    p.add_argument("name", help="dataset name")
    if version:
        p.add_argument("--version", type=int, default=None, help="version number (default: latest)")
    return p


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orchestrator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Versioned annotated training data on object storage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"orchestrator {_package_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="ingest a COCO or JSONL source as one new dataset version")
    p.set_defaults(func=cmd_ingest)
    _store_arg(p)
    p.add_argument("--dataset", required=True, help="dataset name (created on first ingest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco", type=Path, help="COCO annotations JSON (needs --images)")
    src.add_argument("--jsonl", type=Path, help="JSONL file, one item per line")
    p.add_argument(
        "--images", type=Path,
        help="folder holding the COCO file_names (JSONL: the folder its paths are relative to; "
        "default: the JSONL file's folder); nothing outside it is read",
    )
    p.add_argument(
        "--allow-root", action="append", default=[], type=Path, metavar="DIR", dest="allow_roots",
        help="also read files under DIR: absolute paths and links that lead there (repeatable)",
    )
    p.add_argument("--message", default="", help="version message")
    p.add_argument("--strict", action="store_true", help="any rejected input: exit 3, commit nothing")
    p.add_argument("--pack", action="store_true",
                   help="write new media into packs, one request per run of items when read (the default; "
                        "accepted so that scripts written when packs were opt-in keep working)")
    p.add_argument("--loose", action="store_true",
                   help="write one object per item instead of packs (the layout of stores written before "
                        "packs; for tools that want one file per image)")
    p.add_argument("--pack-mb", type=int, default=None, metavar="MB", help="target pack size (default 32)")
    p.add_argument("--json", action="store_true", help="print the ingest report as JSON")

    p = sub.add_parser("delete", help="remove items as one new version")
    p.set_defaults(func=cmd_delete)
    _store_arg(p)
    p.add_argument("name", nargs="?", default=None, help="dataset name (like every other command)")
    p.add_argument("--dataset", default=None, help="the dataset name, the older spelling (kept working)")
    p.add_argument("--items", nargs="+", required=True, metavar="ID", help="ids of the items to remove")
    p.add_argument("--message", default="", help="the version's message (default: 'delete N items')")
    p.add_argument("--json", action="store_true", help="the new version and the count as JSON")

    p = sub.add_parser("datasets", help="list the datasets in a store")
    p.set_defaults(func=cmd_datasets)
    _store_arg(p)
    p.add_argument("--json", action="store_true", help="the datasets as JSON")

    p = _dataset_command(sub, "versions", "list a dataset's versions", cmd_versions, version=False)
    p.add_argument("--json", action="store_true", help="the versions as JSON")

    p = _dataset_command(sub, "info", "item and label counts of one dataset version", cmd_info)
    p.add_argument("--json", action="store_true", help="the counts as JSON")

    p = _dataset_command(sub, "diff", "what changed between two versions of a dataset (or of one slice): items "
                         "added, removed and changed, which parts, label totals; from the manifests only",
                         cmd_diff, version=False)
    p.add_argument("before", type=int, help="the earlier version number")
    p.add_argument("after", type=int, nargs="?", default=None, help="the later version number (default: latest)")
    p.add_argument("--query", default=None, help="compare only this slice of both versions, e.g. 'labels.car >= 1'")
    p.add_argument("--limit", type=int, default=10, help="items listed per kind in the text output (default: 10)")
    p.add_argument("--json", action="store_true", help="every added, removed and changed item, as JSON")

    p = _dataset_command(sub, "stats", "label, instance, size, tag and attribute statistics of a dataset version "
                         "(or slice), from the manifest only", cmd_stats)
    p.add_argument("--query", default=None, help="only this slice, e.g. 'labels.car >= 1'")
    p.add_argument("--json", action="store_true", help="every figure as JSON")
    p.add_argument("--plot", metavar="FILE", default=None, help="also draw the figures (matplotlib) into FILE, "
                   "e.g. stats.png")

    p = _dataset_command(sub, "show", "draw a contact sheet of a dataset version (or slice): thumbnails with "
                         "boxes, polygons, label names and item ids", cmd_show)
    p.add_argument("--query", default=None, help="only this slice, e.g. 'labels.car >= 3'")
    p.add_argument("--n", type=int, default=24, help="items to show (default: 24)")
    p.add_argument("--seed", type=int, default=None, help="a random sample with this seed (default: the first N)")
    p.add_argument("--columns", type=int, default=6, help="thumbnails per row (default: 6)")
    p.add_argument("--thumb", type=int, default=192, help="thumbnail size in pixels (default: 192)")
    p.add_argument("--out", required=True, help="the image file to write, e.g. sheet.png")
    p.add_argument("--json", action="store_true", help="the file written and, per item drawn, its id and cell")

    p = _dataset_command(sub, "export", "write a dataset version (or slice) as COCO, JSONL or YOLO files with "
                         "its original media, for another tool or a colleague", cmd_export)
    p.add_argument("--format", required=True, choices=["coco", "jsonl", "yolo"],
                   help="coco: annotations.json + images/; jsonl: items.jsonl + images/ (both ingest back "
                        "as the same items); yolo: data.yaml + images/ + labels/ (boxes only)")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (new or empty)")
    p.add_argument("--query", default=None, help="only this slice, e.g. 'labels.car >= 1'")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out items whose media are missing or corrupt (listed) instead of stopping")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")

    p = _dataset_command(sub, "slice", "items of a dataset version that match a query", cmd_slice)
    p.add_argument("query", help="e.g. 'labels.car > 3 and labels.pedestrian >= 1'")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--count", action="store_true", help="print only the number of items")
    out.add_argument("--ids", action="store_true", help="print matching item ids, one a line")
    out.add_argument("--json", action="store_true", help="count, ids and scan statistics as JSON")

    p = _dataset_command(sub, "verify", "check every blob a dataset version reads (size and sha256); "
                         "exit 1 if any is bad", cmd_verify)
    p.add_argument("--repair-from", "--repair", dest="repair_from", type=Path, metavar="DIR",
                   help="re-upload bad loose blobs from the files under DIR (e.g. the COCO images folder); "
                        "items whose bytes DIR lacks, and packed items (packs are never rewritten), are "
                        "listed for re-ingest")
    p.add_argument("--threads", type=int, default=8, help="parallel blob reads (default 8)")
    p.add_argument("--json", action="store_true", help="print the verify report as JSON")

    p = _dataset_command(sub, "optimize", "pack loose blobs and rewrite mostly-unread packs, as one new "
                         "version with identical items", cmd_optimize, version=False)
    p.add_argument("--pack-mb", type=int, default=32, metavar="MB", help="target pack size (default 32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("vacuum", help="delete the packs and blobs no retained version reads (lists them first)")
    p.set_defaults(func=cmd_vacuum)
    _store_arg(p)
    p.add_argument("name", help="dataset name")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-versions", type=int, metavar="K", help="retain the last K versions")
    keep.add_argument("--older-than", metavar="DURATION",
                      help="retain the versions committed within DURATION (90s, 30m, 12h, 7d, 2w)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("train", help="run a training config on Ray Train")
    p.set_defaults(func=cmd_train)
    p.add_argument("config", type=Path, help="run config YAML (see configs/)")
    p.add_argument("--store", default=None,
                   help="the store to train from, instead of the config's `store:`. Precedence: "
                        "--set store=URI > --store > $ORCHESTRATOR_STORE > the config's store "
                        "(a relative path there is relative to the config file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_ID",
                   help="continue the latest run of this config (or RUN_ID) from its checkpoint")
    p.add_argument("--json", action="store_true", help="print the lineage record as JSON")

    p = sub.add_parser("runs", help="list the training runs recorded in a store")
    p.set_defaults(func=cmd_runs)
    _store_arg(p)
    p.add_argument("--json", action="store_true", help="every run's lineage record as JSON")

    p = sub.add_parser("store", help="store utilities")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    s = store_sub.add_parser("serve", help="run a local SeaweedFS S3 server on loopback")
    s.set_defaults(func=cmd_store_serve)
    s.add_argument("--dir", type=Path, required=True, help="data folder for the server")
    s.add_argument("--port", type=int, default=8333, help="S3 port (default 8333)")
    s.add_argument("--bucket", default="orchestrator", help="bucket to create (default orchestrator)")
    s.add_argument("--json", action="store_true",
                   help="print what a client needs (endpoint, store URI, environment) as one JSON line, then serve")

    p = sub.add_parser("policy", help="show, set, check or compile the store's access policy")
    pol = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    s = pol.add_parser("show", help="print the policy in force (or --version N)")
    s.set_defaults(func=cmd_policy_show)
    _store_arg(s)
    s.add_argument("--version", type=int, default=None, help="a policy version (default: the one in force)")
    s.add_argument("--json", action="store_true", help="the version, who set it, when, and the policy text as JSON")
    s = pol.add_parser("set", help="commit a policy file as the next version (admin on '*')")
    s.set_defaults(func=cmd_policy_set)
    _store_arg(s)
    s.add_argument("file", type=Path, help="the policy YAML (see `orchestrator.access.policy`)")
    s.add_argument("--message", default="", help="why this version (kept with it)")
    s.add_argument("--json", action="store_true", help="the new policy version as JSON")
    s = pol.add_parser("check", help="may a principal do ACTION on DATASET? (exit 0 yes, 4 no)")
    s.set_defaults(func=cmd_policy_check)
    _store_arg(s)
    s.add_argument("action", choices=["read", "write", "admin"], help="the action to check")
    s.add_argument("dataset", help="dataset name")
    s.add_argument("--principal", help="default: the principal behind your credentials")
    s.add_argument("--json", action="store_true", help="the decision, and for read the rows and hidden fields, as JSON")
    s = pol.add_parser("compile", help="the policy as storage-server rules: SeaweedFS identities or AWS IAM policies")
    s.set_defaults(func=cmd_policy_compile)
    _store_arg(s)
    s.add_argument("--target", choices=["seaweedfs", "aws"], required=True,
                   help="seaweedfs: the server's identities file; aws: one IAM policy per principal")
    s.add_argument("--secrets", type=Path, help="seaweedfs: JSON {access_key_id: secret_key} (kept out of the store)")
    s.add_argument("--json", action="store_true",
                   help="the rules inside {target, policy_version, rules} (without it: the rules alone, also JSON)")

    p = sub.add_parser("browse", help="look through datasets, slices, items and version diffs in a web page "
                                      "(read-only, as your credentials' principal)")
    p.set_defaults(func=cmd_browse)
    _store_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    p.add_argument("--remote", action="store_true",
                   help="allow a --host other than loopback (other machines can then reach it, with the token)")
    p.add_argument("--token", default=None, help="the token every request needs (default: a random one, in the URL "
                                                 "printed)")
    p.add_argument("--no-token", action="store_true", help="serve without a token (loopback only)")
    p.add_argument("--json", action="store_true",
                   help="print the URL, token and principal as one JSON line, then serve")

    p = sub.add_parser("demo-data", help="draw synthetic street scenes with a COCO file")
    p.set_defaults(func=cmd_demo_data)
    p.add_argument("out", type=Path, help="the folder to write images/ and annotations.json into")
    p.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same scenes")
    p.add_argument("--workers", type=int, default=1, help="processes drawing images (default 1)")
    p.add_argument("--json", action="store_true", help="the files written as JSON")
    return parser


def _need_store(args: argparse.Namespace, *, writes: bool = False):
    """The ``--store``. A command that only reads refuses a store that does not exist (a typo is
    not an empty store); one that ``writes`` may be the first to use a new file:// store."""
    import orchestrator

    if not args.store:
        raise OrchestratorError(
            "no store given", hint="pass --store file:///abs/path (or s3://bucket/prefix) or set ORCHESTRATOR_STORE"
        )
    return orchestrator.connect(args.store, must_exist=not writes)


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns}
    emit("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        emit("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


def cmd_ingest(args: argparse.Namespace) -> int:
    from orchestrator.ingest.pipeline import IngestRejected
    from orchestrator.packs import DEFAULT_PACK_BYTES

    # Checked before the store is opened: a contradictory command writes nothing.
    if args.loose and args.pack:
        raise ConfigError("--pack and --loose contradict each other",
                          hint="packs are the default: pass --loose alone for one object per item, "
                               "or neither for packs")
    if args.loose and args.pack_mb is not None:
        raise ConfigError("--pack-mb sets the size of packs, and --loose writes none",
                          hint="drop --pack-mb, or drop --loose to write packs")
    store = _need_store(args, writes=True)
    try:
        report = store.ingest(
            args.dataset, coco=args.coco, images=args.images, jsonl=args.jsonl,
            message=args.message, strict=args.strict, allow_roots=args.allow_roots,
            pack=not args.loose, pack_mb=DEFAULT_PACK_BYTES >> 20 if args.pack_mb is None else args.pack_mb,
        )
    except IngestRejected as exc:
        if args.json and exc.report is not None:
            emit(json.dumps(exc.report.as_dict(), indent=2))
        else:
            if exc.report is not None:
                emit(exc.report.summary())
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    emit(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0 if report.committed or report.items else EXIT_USER  # identical items: nothing to do, not a fault


def cmd_delete(args: argparse.Namespace) -> int:
    if args.name and args.dataset and args.name != args.dataset:
        raise ConfigError(f"two dataset names: {args.name!r} and --dataset {args.dataset!r}")
    name = args.name or args.dataset
    if not name:
        raise ConfigError("which dataset? `orchestrator delete NAME --items ID ...`")
    done = _need_store(args).delete(name, args.items, message=args.message)
    emit(json.dumps({"dataset": name, **done.as_dict()}, indent=2) if args.json
         else f"dataset {name!r}: deleted {done.deleted} items as version {done.version}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    """Readable datasets on stdout (as before); damaged ones as warnings on stderr, with the
    file to restore, so a script reading the names never trips over them."""
    store = _need_store(args)
    names, damaged = store.datasets(), store.damaged_datasets()
    if args.json:
        emit(json.dumps(names))
    else:
        emit("\n".join(names) if names else "(no readable datasets)" if damaged else "(no datasets)")
    for err in damaged.values():
        print(f"warning: {err}", file=sys.stderr)
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    rows = [v.as_dict() for v in _need_store(args).versions(args.name)]
    if args.json:
        emit(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["version", "time", "items", "operation", "principal", "message"])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    ds = _need_store(args).dataset(args.name, args.version)  # what this principal may see
    totals, items = ds.label_counts(), len(ds)
    info = {"dataset": args.name, "version": ds.version, "items": items, "labels": totals}
    if args.json:
        emit(json.dumps(info, indent=2))
    else:
        emit(f"dataset {args.name!r} version {ds.version}: {items} items")
        _print_table([{"label": k, "instances": v} for k, v in totals.items()], ["label", "instances"])
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    store = _need_store(args)
    before, after = store.dataset(args.name, args.before), store.dataset(args.name, args.after)
    if args.query:
        before, after = before.slice(args.query), after.slice(args.query)
    diff = before.diff(after)
    emit(json.dumps(diff.as_dict(), indent=2) if args.json else diff.summary(limit=args.limit))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ds = _need_store(args).dataset(args.name, args.version)
    ds = ds.slice(args.query) if args.query else ds
    sheet = ds.contact_sheet(args.n, seed=args.seed, columns=args.columns, thumb=args.thumb)
    sheet.save(args.out)
    if args.json:
        emit(json.dumps({"dataset": args.name, "version": ds.version, "query": args.query, "out": args.out,
                         "size": list(sheet.size), "items": sheet.info["cells"]}, indent=2))
    else:
        emit(f"{len(sheet.info['cells'])} items of {args.name!r} version {ds.version} drawn into {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    ds = _need_store(args).dataset(args.name, args.version)
    report = (ds.slice(args.query) if args.query else ds).export(
        args.out, args.format, overwrite=args.overwrite, on_error="skip" if args.skip_bad else "raise")
    emit(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    ds = _need_store(args).dataset(args.name, args.version)
    stats = (ds.slice(args.query) if args.query else ds).stats()
    emit(json.dumps(stats.as_dict(), indent=2) if args.json else stats.summary())
    if args.plot:
        stats.plot(args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def cmd_slice(args: argparse.Namespace) -> int:
    ds = _need_store(args).dataset(args.name, args.version).slice(args.query)
    if args.count:
        emit(len(ds))
        return 0
    ids = ds.item_ids()
    if args.ids:
        emit("\n".join(ids))
    elif args.json:
        emit(json.dumps({"dataset": args.name, "version": ds.version, "query": args.query,
                          "count": len(ids), "ids": ids, "scan": ds.last_scan.as_dict()}, indent=2))
    else:
        stats = ds.last_scan
        emit(f"{len(ids)} of {stats.rows_total} items in {args.name!r} version {ds.version} match")
        emit(f"  scan: {stats.files_read}/{stats.files_total} files, "
              f"{stats.rows_in_files_read} rows in them, "
              f"{stats.seconds * 1000:.0f} ms")
        for item_id in ids[:10]:
            emit(f"  {item_id}")
        if len(ids) > 10:
            emit(f"  ... {len(ids) - 10} more (--ids lists all)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _need_store(args)
    report = store.verify(args.name, args.version, repair_from=args.repair_from, threads=args.threads)
    emit(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    if report.ok:
        return 0
    fixes = []
    if any(b.pack is None for b in report.remaining):
        fixes.append(f"put their files in a folder and run `orchestrator verify {args.name} --repair-from DIR`"
                     if args.repair_from is None else f"{args.repair_from} does not hold their bytes: "
                     "repair from a folder that does (a re-ingest re-uploads only missing or wrong-size blobs)")
    if report.packed_reingest:
        fixes.append(f"ingest the source of the {len(report.packed_reingest)} packed items listed again "
                     "(packs are never repaired in place; their media are packed again)")
    if report.packed_delete_first:
        fixes.append(f"delete the {len(report.packed_delete_first)} packed items listed with wrong bytes "
                     f"(`orchestrator delete --dataset {args.name} --items ...`), then ingest their source again")
    print(f"error: {len(report.remaining)} bad blobs remain in dataset {args.name!r} version "
          f"{report.version}, read by {len(report.reingest)} items"
          + "".join(f"\n  fix: {f}" for f in fixes), file=sys.stderr)
    return EXIT_SYSTEM


def cmd_optimize(args: argparse.Namespace) -> int:
    report = _need_store(args, writes=True).optimize(args.name, pack_mb=args.pack_mb)
    emit(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    report = _need_store(args, writes=True).vacuum(args.name, keep_versions=args.keep_versions,
                                                   older_than=args.older_than, dry_run=args.dry_run)
    emit(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from orchestrator.train.config import load_config
    from orchestrator.train.display import RunDisplay, checkpoint_uri, finished_lines
    from orchestrator.train.lineage import lineage_uri
    from orchestrator.train.runner import plan_run, run

    settings = load_config(args.config, args.overrides, store=args.store or os.environ.get("ORCHESTRATOR_STORE"))
    extend = any(_override_key(o) == "train.epochs" for o in args.overrides)
    plan = plan_run(settings, config_name=args.config.stem, resume=args.resume, extend_epochs=extend)
    # Human lines go to stdout, or to stderr under --json, whose stdout is the record alone.
    human = _out if not args.json else sys.stderr
    say = functools.partial(print, file=human, flush=True)
    say(f"run {plan.run_id}: {settings.framework} {settings.model.name} on {settings.dataset!r} "
        f"version {plan.lineage.version} ({plan.lineage.items['train']} train / "
        f"{plan.lineage.items['validation']} validation items), {settings.scaling.num_workers} workers, "
        f"{settings.train.epochs} epochs" + (f", resuming after epoch {len(plan.lineage.metrics)}"
                                            if args.resume else ""))
    display = RunDisplay(human, epochs=settings.train.epochs)
    resume = _resume_command(args, plan.store.uri, plan.run_id)
    try:
        lineage = run(plan, display)
    except (KeyboardInterrupt, SystemExit) as stop:  # run() has stopped the workers and recorded it
        display.close()  # before the message (close is idempotent; finally closes it otherwise)
        done = len(plan.lineage.metrics)
        print(f"error: run {plan.run_id} interrupted after {done} finished epoch{'s' if done != 1 else ''}; "
              f"lineage (status interrupted): {lineage_uri(plan.store.runs, plan.run_id)}\n"
              f"to continue it: {resume}", file=sys.stderr)
        if isinstance(stop, KeyboardInterrupt):
            return 130  # 128 + SIGINT, as shells report it
        code = stop.code  # Ray's SIGTERM handler exits with the signal number
        return 128 + code if isinstance(code, int) and code > 0 else EXIT_SYSTEM
    except OrchestratorError as exc:
        if exc.user_fault:
            raise
        raise OrchestratorError(f"{exc}\nafter fixing the cause, continue it from its last checkpoint: {resume}",
                                hint=exc.hint, user_fault=False) from None
    finally:
        display.close()  # the bar goes before any line that follows
    if args.json:
        emit(json.dumps(lineage.as_dict(), indent=2, default=str))
        return 0
    epochs = len(lineage.metrics)
    for line in finished_lines(plan.run_id, epochs, lineage.skipped_items, lineage_uri(plan.store.runs, plan.run_id),
                               checkpoint_uri(plan.store.uri, lineage.checkpoint),
                               _resume_command(args, plan.store.uri, plan.run_id, epochs=epochs + 1)):
        say(line)
    return 0


def _override_key(assignment: str) -> str:
    """``train.epochs`` of ``--set train.epochs=3``."""
    return assignment.split("=", 1)[0].strip()


def _resume_command(args: argparse.Namespace, store_uri: str, run_id: str, *, epochs: int | None = None) -> str:
    """The command that continues this run: the same config and overrides (but the store, named
    once with --store) and ``--resume RUN_ID``; with ``epochs``, ``--set train.epochs=epochs``."""
    drop = {"store"} | ({"train.epochs"} if epochs is not None else set())
    kept = [o for o in args.overrides if _override_key(o) not in drop]
    if epochs is not None:
        kept.append(f"train.epochs={epochs}")
    parts = ["orchestrator", "train", str(args.config), "--store", store_uri, "--resume", run_id]
    for override in kept:
        parts += ["--set", override]
    return shlex.join(parts)


def cmd_runs(args: argparse.Namespace) -> int:
    """Recorded runs; a ``running`` record whose driver is gone shows as ``lost`` (in ``--json``
    too, with the written status kept as ``recorded_status``)."""
    from orchestrator.train.lineage import list_runs, observed_status

    runs = list_runs(_need_store(args).runs)
    shown = [observed_status(r) for r in runs]
    rows = [{"run_id": r.run_id, "status": status, "dataset": r.dataset, "version": r.version,
             "train": r.items.get("train"), "validation": r.items.get("validation"),
             "principal": r.principal, "last": (r.metrics[-1] if r.metrics else {})}
            for r, status in zip(runs, shown)]
    if args.json:
        docs = [{**r.as_dict(), "status": status}
                | ({"recorded_status": r.status} if status != r.status else {})
                for r, status in zip(runs, shown)]
        emit(json.dumps(docs, indent=2, default=str))
    else:
        for row in rows:
            row["last"] = " ".join(f"{k}={v:.3f}" for k, v in row["last"].items()
                                   if isinstance(v, float))
        _print_table(rows, ["run_id", "status", "dataset", "version", "train", "validation",
                            "principal", "last"])
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    pv = _need_store(args).policy(args.version)
    if args.json:
        emit(json.dumps(None if pv is None else {"version": pv.version, "principal": pv.principal,
                                                 "message": pv.message, "set_at": pv.set_at.isoformat(),
                                                 "text": pv.text}, indent=2))
        return 0
    if pv is None:
        emit("(no access policy: the store is open to whoever can reach its storage)")
        return 0
    emit(f"# policy version {pv.version}, set by {pv.principal} at {pv.set_at:%Y-%m-%d %H:%M:%S} UTC: {pv.message}")
    emit(pv.text.rstrip())
    return 0


def cmd_policy_set(args: argparse.Namespace) -> int:
    store = _need_store(args, writes=True)
    try:
        text = args.file.read_text()
    except OSError as exc:
        raise OrchestratorError(f"cannot read policy file {args.file}: {exc.strerror}") from None
    version = store.set_policy(text, message=args.message)
    emit(json.dumps({"version": version}) if args.json else f"policy version {version} is in force")
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    store = _need_store(args)
    pv = store.policy()
    who = args.principal or store.access.principal
    decision: dict[str, Any] = {"action": args.action, "dataset": args.dataset, "principal": who,
                                "policy_version": pv.version if pv else None}
    if pv is None:
        decision |= {"allowed": True, "reason": "the store has no access policy"}
        text = "allowed: the store has no access policy"
    elif who is None:
        decision |= {"allowed": False, "identity": store.access.identity}
        text = f"denied: {store.access.identity} is not a principal of policy version {pv.version}"
    elif not pv.policy.allows(who, args.action, args.dataset):
        decision["allowed"] = False
        text = f"denied: {who!r} may not {args.action} dataset {args.dataset!r} (policy version {pv.version})"
    else:
        decision["allowed"] = True
        text = f"allowed: {who!r} may {args.action} dataset {args.dataset!r} (policy version {pv.version})"
        if args.action == "read":
            view = pv.policy.read_view(who, args.dataset)
            decision |= {"row_filter": view.row_filter, "hidden_fields": sorted(view.hidden_fields)}
            text += (f"\n  rows: {view.row_filter or 'all'}"
                     f"\n  hidden fields: {', '.join(sorted(view.hidden_fields)) or 'none'}")
    emit(json.dumps(decision, indent=2) if args.json else text)
    return 0 if decision["allowed"] else EXIT_DENIED


def cmd_policy_compile(args: argparse.Namespace) -> int:
    store = _need_store(args)
    from orchestrator.access.server_rules import compile_rules

    rules = compile_rules(store.handle, args.target, args.secrets)
    if args.json:
        pv = store.policy()
        rules = json.dumps({"target": args.target, "policy_version": pv.version if pv else None,
                            "rules": json.loads(rules)}, indent=2)
    emit(rules)
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from orchestrator.browse.serve import serve

    serve(_need_store(args), host=args.host, port=args.port, remote=args.remote, token=args.token,
          no_token=args.no_token, as_json=args.json)
    return 0


def cmd_store_serve(args: argparse.Namespace) -> int:
    from orchestrator.dev.seaweed import serve

    serve(args.dir, args.port, args.bucket, as_json=args.json)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from orchestrator.dev.demo import make_demo_data

    coco = make_demo_data(args.out, args.n, args.seed, workers=args.workers)
    emit(json.dumps({"images": args.n, "folder": str(Path(args.out) / "images"), "coco": str(coco)})
         if args.json else f"wrote {args.n} images and {coco}")
    return 0


def _results_only_on_stdout() -> None:
    """Point fd 1 (and sys.stdout) at stderr; keep the real stdout for ``emit`` alone."""
    global _out
    sys.stdout.flush()
    _out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; returns the exit code (errors printed, never a traceback)."""
    args = _parser().parse_args(argv)
    if args.command not in ("store", "browse"):  # servers: their lines (the URL) are their result
        _results_only_on_stdout()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, AccessDenied):
            return EXIT_DENIED
        return EXIT_USER if exc.user_fault else EXIT_SYSTEM
    except KeyboardInterrupt:
        print("interrupted; nothing partial was committed", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    code = run(argv)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            # Stops a local cluster this process started. Bounded: after a Ctrl-C the driver's
            # connection can be half torn down, and a shutdown that never returns would keep an
            # interrupted command alive; the process exits below either way.
            done = threading.Thread(target=ray.shutdown, name="ray shutdown", daemon=True)
            done.start()
            done.join(timeout=10)
    _out.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: native thread pools (Arrow, delta-rs, Ray) can abort
    # the process while being destroyed at exit, turning a success into exit code 134.
    os._exit(code)


if __name__ == "__main__":
    main()
