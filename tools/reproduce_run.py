#!/usr/bin/env python
"""Re-run one committed norm-study record and check that it measures the same.

    python tools/reproduce_run.py docs/study/plain/runs/BN@2_seed0.json [--out DIR]

Checks out the record's `code_commit` into DIR/code (a detached git worktree of this repository),
runs the record's `command` there with DIR/run for the training and DIR/results for the new record,
and compares every measured value of the two records (APs at every evaluation, diagnostics,
settings; not the times, dates or machine). Seeded runs are deterministic for a given thread count,
which the command names, so any difference is reported and the exit status is 1. A run takes what
the record's `wall_seconds` says (tens of minutes for the full conditions).
"""
import argparse
import glob
import json
import os
import shlex
import subprocess
import sys

from mabn_experiments.study import differing_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)


def checkout(commit: str, directory: str) -> None:
    """A detached worktree of this repository at `commit` in `directory` (reused if it is one)."""
    if os.path.isdir(directory):
        head = subprocess.run(["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        if head == commit:
            return
        sys.exit(f"{directory} exists and is not a checkout of {commit}: choose another --out")
    if git("cat-file", "-e", f"{commit}^{{commit}}").returncode:
        sys.exit(f"commit {commit} is not in the repository at {REPO}: fetch it first")
    added = git("worktree", "add", "--detach", directory, commit)
    if added.returncode:
        sys.exit(f"git worktree add failed: {added.stderr.strip()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("record", help="a run record, e.g. docs/study/plain/runs/BN@2_seed0.json")
    parser.add_argument("--out", help="work directory (default: output/reproduce/<record name>)")
    args = parser.parse_args(argv)
    with open(args.record) as f:
        committed = json.load(f)
    if not committed.get("code_commit") or not committed.get("code_clean", False):
        sys.exit(f"{args.record} names no clean code commit, so it cannot be re-run: "
                 f"{committed.get('code_commit_note', 'it ran uncommitted changes')}")
    command = shlex.split(committed["command"])
    if command[:2] != ["python", "tools/compare_norms.py"]:
        sys.exit(f"expected a tools/compare_norms.py command in {args.record}, got {command!r}")
    name = os.path.splitext(os.path.basename(args.record))[0]
    out = os.path.abspath(args.out or os.path.join(
        "output", "reproduce", f"{committed.get('condition', 'study')}_{name}"))
    code = os.path.join(out, "code")
    checkout(committed["code_commit"], code)
    results = os.path.join(out, "results")
    rerun = [sys.executable, command[1], "--out", os.path.join(out, "run"), "--results", results,
             "--jobs", "1", *command[2:]]
    print(f"re-running {args.record} at {committed['code_commit'][:12]} in {code}:\n  "
          f"{shlex.join(rerun)}", flush=True)
    subprocess.run(rerun, cwd=code, env={**os.environ, "PYTHONPATH": code}, check=True)
    matches = glob.glob(os.path.join(results, "**", "runs", os.path.basename(args.record)),
                        recursive=True)
    if len(matches) != 1:
        sys.exit(f"expected one new record named {os.path.basename(args.record)} under "
                 f"{results}, found {len(matches)}")
    with open(matches[0]) as f:
        fresh = json.load(f)
    differences = differing_results(committed, fresh)
    for key in differences:
        print(f"differs: {key}: committed {json.dumps(committed[key])[:200]}, "
              f"re-run {json.dumps(fresh.get(key))[:200]}")
    if differences:
        return 1
    print(f"reproduced: every measured value of {args.record} is equal in {matches[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
