"""``sane-hf push``: publish a trained SANE model (and its zoo) on the Hugging Face Hub.

::

    sane-hf push --model runs/sane-digits --repo-id user/sane-digits \\
                 [--zoo zoos/digits-cnn --dataset-repo-id user/digits-cnn-zoo] [--private] [--dry-run]

The model folder is staged as a self-contained repo (weights, ``weight_tokenizer.json``, remote
code with ``auto_map`` and ``custom_pipelines``, configs, measurements, a model card) and pushed in
one commit; the zoo folder is pushed as it is (parquet shards, dataset card, ``zoo_config.json``).
See :mod:`sane_hf.hub`. The zoo goes first, so that the model card's dataset link resolves.

The token comes from ``--token``, else ``HF_TOKEN``, else the stored ``hf auth login``; it is never
printed. ``--dry-run`` stages the model, checks both folders and prints the files, with no network.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["register", "run_push"]


#: the one-line help of this subcommand in `sane-hf --help` (read without building its flags)
HELP = "publish a trained SANE model (and its zoo) on the Hugging Face Hub"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sane_hf.cli._common import add_runtime_flags

    p = subparsers.add_parser(
        "push",
        help=HELP,
        description=(
            "Stage a trained SANE model folder as a self-contained Hub repo (weights, weight tokenizer, remote code "
            "with auto_map and the weight-sampling pipeline, configs, measurements, model card) and push it in one "
            "commit; optionally push the zoo folder as a dataset repo (parquet shards + dataset card + "
            "zoo_config.json). Loading afterwards: SaneModel.from_pretrained(REPO_ID), "
            "AutoModel.from_pretrained(REPO_ID, trust_remote_code=True), "
            "pipeline(model=REPO_ID, trust_remote_code=True)."
        ),
    )
    p.add_argument("--model", type=Path, default=None,
                   help="model folder written by `sane-hf train` (config.json, model.safetensors, weight_tokenizer.json)")
    p.add_argument("--repo-id", default=None, help="model repo on the Hub, e.g. user/sane-digits (required with --model)")
    p.add_argument("--zoo", type=Path, default=None, help="zoo folder written by `sane-hf zoo build`/`zoo import`")
    p.add_argument("--dataset-repo-id", default=None,
                   help="dataset repo for --zoo, e.g. user/digits-cnn-zoo; without --zoo it is only linked from the "
                        "model card")
    p.add_argument("--private", action="store_true", help="create the repos private (existing repos keep theirs)")
    p.add_argument("--token", default=None,
                   help="Hub token (default: the HF_TOKEN environment variable, else the stored login); prefer "
                        "HF_TOKEN, a flag lands in the shell history")
    p.add_argument("--commit-message", default=None, help="commit message (default: names the file count)")
    p.add_argument("--create-pr", action="store_true", help="open pull requests instead of committing to the branch")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--staging-dir", type=Path, default=None,
                   help="stage the model repo here and keep it (must not exist or be empty; default: a temporary "
                        "folder)")
    p.add_argument("--dry-run", action="store_true",
                   help="stage and check, print the files that would be pushed; no network")
    p.add_argument("--manifest", type=Path, default=None,
                   help="also write what was (or would be) pushed as JSON to this file")
    add_runtime_flags(p)
    p.set_defaults(func=run_push)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _describe(result: Any, dry_run: bool) -> list[str]:
    kind = "dataset" if result.repo_type == "dataset" else "model"
    verb = "would push" if dry_run else "pushed"
    lines = [f"{verb} {len(result.files)} files to the {kind} repo {result.repo_id}:"]
    base = result.staging_dir
    for name in result.files:
        size = ""
        if base is not None and (Path(base) / name).is_file():
            size = f"  ({(Path(base) / name).stat().st_size:,} bytes)"
        lines.append(f"  {name}{size}")
    if result.url:
        lines.append(f"  → {result.url}")
    return lines


def run_push(args: argparse.Namespace) -> int:
    from sane_hf.cli._common import apply_num_threads
    from sane_hf.hub import push_model, push_zoo

    apply_num_threads(args.num_threads)
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    if args.model is None and args.zoo is None:
        raise SystemExit("sane-hf push: nothing to push: give --model (with --repo-id) and/or --zoo (with --dataset-repo-id)")
    if args.model is not None and not args.repo_id:
        raise SystemExit("sane-hf push: --model needs --repo-id (e.g. user/sane-digits)")
    if args.zoo is not None and not args.dataset_repo_id:
        raise SystemExit("sane-hf push: --zoo needs --dataset-repo-id (e.g. user/digits-cnn-zoo)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    for flag, repo_id in (("--repo-id", args.repo_id), ("--dataset-repo-id", args.dataset_repo_id)):
        if repo_id:
            try:
                validate_repo_id(repo_id)
            except HFValidationError as err:
                raise SystemExit(f"sane-hf push: {flag} {repo_id!r} is not a valid Hub repo id ({err})") from None
    token = args.token or os.environ.get("HF_TOKEN") or None
    common = dict(private=args.private or None, token=token, commit_message=args.commit_message,
                  create_pr=args.create_pr, revision=args.revision, dry_run=args.dry_run)
    results = []
    try:
        if args.zoo is not None:
            results.append(push_zoo(args.zoo, args.dataset_repo_id, **common))
            for line in _describe(results[-1], args.dry_run):
                print(line)
        if args.model is not None:
            results.append(push_model(args.model, args.repo_id, dataset_repo_id=args.dataset_repo_id,
                                      staging_dir=args.staging_dir, **common))
            for line in _describe(results[-1], args.dry_run):
                print(line)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"sane-hf push: {_redact(str(err), token)}") from None
    except Exception as err:  # Hub / network errors: say what failed, never the token
        raise SystemExit(f"sane-hf push: {type(err).__name__}: {_redact(str(err), token)}") from None
    if args.manifest is not None:
        manifest = {
            "dry_run": args.dry_run,
            "pushes": [
                {"repo_id": r.repo_id, "repo_type": r.repo_type, "files": r.files, "url": r.url,
                 "staging_dir": str(r.staging_dir) if r.staging_dir is not None else None}
                for r in results
            ],
        }
        args.manifest.parent.mkdir(parents=True, exist_ok=True)
        args.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    if args.dry_run:
        print("dry run: nothing was sent to the Hub")
    return 0
