"""The experiment loop (issue 26): what one more head experiment costs, in DVC and in a notebook.

    .venv/bin/python benchmarks/experiment_loop.py [--project DIR [--cold] [--cold-seconds S]] [--workdir DIR]
        [--edit train_head.linear_svm.max_iter=400] [--experiments 4] [--first 301] [--copy-path PATH]
        [--repeats 2] [--store PATH] [--skip edit notebook queue] [--json PATH] [--keep]

Without ``--project`` it ``git clone``s this checkout (HEAD) into a temporary folder (or ``--workdir``) and runs a
cold ``dvc repro`` there: an empty DVC cache, every store extracted. With ``--project DIR`` (a clone whose
``dvc repro`` already ran) the cold run is skipped unless ``--cold`` is given, and its seconds come from
``--cold-seconds`` (else the ratio reads n/a). The project is a throwaway clone: the script commits its repro'd
state there (``git add -A && git commit``, only if it is dirty), then works from that commit.

It prints, each figure measured in this process on this machine:

1. cold ``dvc repro``: seconds and stages run;
2. one head edit (``--edit KEY=VALUE``, the YAML line edited in place, comments kept) and a plain ``dvc repro``:
   seconds, the stages it ran, and the ratio head edit / cold. Then the project goes back to its commit (``git
   checkout HEAD -- .`` and ``dvc checkout --force``: nothing is rerun);
3. a head experiment in a notebook: ``train_head(FeatureStore(store), config_from_params(params, head))`` for
   logreg and linear_svm in this process (best of ``--repeats``), on the image store (the ``stores`` entry whose
   backbone is efficientnet_lite0: ``{backbone: folder}`` or ``{name: {data, backbone}}``, the store being
   ``data/features/<key>.h5``; or ``--store``);
4. ``--experiments N`` queued head experiments: ``dvc exp run --queue -n <tag>-<v> -S train_head.logreg.max_iter=<v>``
   for v = 301..300+N (``--first``: another start, where the run cache already holds those), then ``dvc exp run
   --run-all --jobs 1``: total seconds, seconds per experiment, and per experiment (``dvc queue logs``) the stages
   it ran, those restored from the run cache, the extract stages among them and what each did (extract.py's
   summary line: items extracted / reused, store rewritten), then ``dvc exp show`` of the result (the queued
   param, the logreg heads' test accuracy). To compare the experiments' sweeps and curves: ``dvc plots diff <exp>
   <exp>`` in the project. ``--copy-path data/features`` hands each experiment's workspace that untracked folder
   (dvc's ``-C``), to tell whether a missing untracked output is what reruns a stage;
5. a summary block of every figure (and ``--json PATH``).

The stages run with this venv first on PATH and ``PYTHONPATH=.``: each stage imports the ``featurestore`` of the
workspace it runs in (the clone, or a queued experiment's temporary copy), not this checkout's editable install.

Targets (issue 26, on the 2-core reference machine when idle): head edit / cold at most 0.1, running exactly that
head's train_head and train_head_ft stages, the verdicts and evaluate (no fine-tune, export or predict unless the
deployed model changed); a notebook head at most 1 s for logreg and 5 s for linear_svm; a queue of 4 head
experiments runs no extract stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from featurestore.configs import config_from_params
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import FeatureStore

ROOT = Path(__file__).resolve().parent.parent
IMAGE_BACKBONE = "efficientnet_lite0"
DEFAULT_EDIT = "train_head.linear_svm.max_iter=400"
QUEUED_KEY = "train_head.logreg.max_iter"
MAX_HEAD_EDIT_RATIO = 0.1
TARGET_SECONDS = {"logreg": 1.0, "linear_svm": 5.0}
# stages a head edit must not run (the deployed model did not change): the "Done when"
NOT_AFTER_HEAD_EDIT = ("extract@", "plateau@", "finetune@", "curve@", "baseline@", "hybrid@", "prepare")
RAN = re.compile(r"Running stage '([^']+)'")
RUN_CACHED = re.compile(r"Stage '([^']+)' is cached - skipping run")
EXTRACT_SUMMARY = re.compile(r'^\{"backbone": .*"extracted": .*\}$', re.MULTILINE)  # pipelines/extract.py's print


def stage_env() -> dict[str, str]:
    """The environment of every dvc call: this venv first on PATH, and ``PYTHONPATH=.`` (made absolute at each
    interpreter's start, in the stage's working folder) so that a stage imports its own workspace's package."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONPATH": "."}


def run(project: Path, *args: str, check: bool = True) -> tuple[str, float]:
    """(stdout + stderr, seconds) of one command in the project."""
    started = time.perf_counter()
    result = subprocess.run(args, cwd=project, env=stage_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {project} ({result.returncode}):\n{output[-4000:]}")
    return output, seconds


def dvc(project: Path, *args: str, check: bool = True) -> tuple[str, float]:
    return run(project, sys.executable, "-m", "dvc", *args, check=check)


def git(project: Path, *args: str) -> str:
    return run(project, "git", *args)[0]


def stages(log: str) -> dict[str, list[str]]:
    """The stages a DVC log ran, and those it restored from the run cache, in order."""
    return {"ran": RAN.findall(log), "run_cached": RUN_CACHED.findall(log)}


def extract_summaries(log: str) -> list[dict]:
    """What each extract stage in a log did: backbone, items extracted / reused, whether the store was rewritten."""
    rows = []
    for line in EXTRACT_SUMMARY.findall(log):
        summary = json.loads(line)
        rows.append({key: summary.get(key) for key in ("backbone", "extracted", "reused", "resumed", "written")})
    return rows


# --- 1. the project and its cold run -----------------------------------------------------------------------


def cold_repro(project: Path) -> dict:
    """``dvc repro`` in the project, timed: {seconds, ran, run_cached}."""
    log, seconds = dvc(project, "repro")
    return {"seconds": round(seconds, 1), **stages(log)}


def clone(workdir: Path) -> Path:
    """A fresh clone of this checkout's HEAD (no DVC cache: its cold run extracts every store)."""
    project = workdir / "project"
    run(workdir, "git", "clone", "-q", str(ROOT), str(project))
    return project


def commit_state(project: Path) -> bool:
    """Commit the project's repro'd state (dvc.lock, git-tracked outputs) if dirty: the queue starts from a commit,
    and the head edit is undone by checking it out. True when a commit was made."""
    if not git(project, "status", "--porcelain").strip():
        return False
    git(project, "add", "-A")
    identity = [] if run(project, "git", "config", "--get", "user.email", check=False)[0].strip() else \
        ["-c", "user.name=experiment_loop", "-c", "user.email=experiment_loop@localhost"]
    git(project, *identity, "commit", "-q", "-m", "experiment_loop: the repro'd state")
    return True


def restore(project: Path) -> bool:
    """Back to the committed state after the head edit, rerunning nothing: git's files, then DVC's outputs from
    its cache. True when ``dvc status`` then finds nothing to run."""
    git(project, "checkout", "HEAD", "--", ".")
    dvc(project, "checkout", "--force")
    return "up to date" in dvc(project, "status")[0]


# --- 2. one head edit -------------------------------------------------------------------------------------


def set_yaml_value(text: str, dotted: str, value: str) -> str:
    """``text`` with the scalar at ``dotted`` (``a.b.c``) replaced by ``value``, every other byte kept (comments
    included). Block-style mappings only; the result is checked by parsing it."""
    keys, lines = dotted.split("."), text.splitlines(keepends=True)
    depth, parent_col, child_col = 0, -1, None
    for number, line in enumerate(lines):
        content = line.lstrip(" ")
        if not content.strip() or content.startswith("#"):
            continue
        col = len(line) - len(content)
        if col <= parent_col:
            break  # left the parent's block without finding the key
        child_col = col if child_col is None else child_col
        match = re.match(rf"({re.escape(keys[depth])}\s*:)([ \t]*)([^#\n]*?)([ \t]*#.*)?(\n?)$", content)
        if col != child_col or not match:
            continue
        if depth < len(keys) - 1:
            depth, parent_col, child_col = depth + 1, col, None
            continue
        if not match.group(3):
            raise SystemExit(f"{dotted} is not a scalar in params.yaml")
        key, space, _, comment, newline = match.groups()
        lines[number] = " " * col + key + (space or " ") + value + (comment or "") + newline
        edited = "".join(lines)
        found = yaml.safe_load(edited)
        for part in keys:
            found = found[part]
        assert found == yaml.safe_load(value), (dotted, found, value)
        return edited
    raise SystemExit(f"{dotted} not found in params.yaml")


def unexpected_stages(key: str, ran: list[str]) -> list[str]:
    """The stages a head edit ran that it should not: upstream of the heads, or another head's (matrix stages are
    named ``<stage>@<store>-<head>``)."""
    parts = key.split(".")
    head = parts[1] if parts[0] == "train_head" and len(parts) > 2 and parts[1] != "sweep" else None
    other_head = re.compile(rf"-(?!{re.escape(head)}$)[a-z_]+$") if head else None
    return [s for s in ran if s.startswith(NOT_AFTER_HEAD_EDIT) or (other_head and other_head.search(s))]


def head_edit(project: Path, edit: str, cold_seconds: float | None) -> dict:
    """Edit one params key, ``dvc repro``, time it; then put the project back (see :func:`restore`)."""
    key, _, value = edit.partition("=")
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(set_yaml_value(original, key, value))
    try:
        log, seconds = dvc(project, "repro")
    finally:
        params.write_text(original)
    ran = stages(log)
    return {"edit": edit, "seconds": round(seconds, 1), **ran, "unexpected": unexpected_stages(key, ran["ran"]),
            "ratio": round(seconds / cold_seconds, 3) if cold_seconds else None,
            "restored_clean": restore(project)}


# --- 3. a head in a notebook ------------------------------------------------------------------------------


def image_store(project: Path, params: dict) -> Path:
    """The image store of params.yaml's ``stores``: ``{backbone: folder}`` (the store named by the backbone) or
    ``{name: {data: folder, backbone: ...}}`` (the store named by the entry)."""
    for key, value in params["stores"].items():
        backbone = value.get("backbone") if isinstance(value, dict) else key
        if backbone == IMAGE_BACKBONE:
            return project / "data" / "features" / f"{key}.h5"
    raise SystemExit(f"no store on {IMAGE_BACKBONE} in params.yaml's stores; give --store")


def notebook_heads(store_path: Path, params: dict, repeats: int) -> dict:
    """{head: best seconds of ``train_head`` over ``repeats``} on one store, params.yaml's train_head settings."""
    store, seconds = FeatureStore(store_path), {}
    for head in TARGET_SECONDS:
        config = config_from_params(params["train_head"], head)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            train_head(store, config)
            best = min(best, time.perf_counter() - started)
        seconds[head] = round(best, 2)
    return {"store": str(store_path), "rows": store.count("train"), "dims": store.feature_dim, "seconds": seconds}


# --- 4. queued head experiments ---------------------------------------------------------------------------


def queued_experiments(project: Path, count: int, first: int, copy_paths: list[str]) -> dict:
    """Queue ``count`` logreg settings (max_iter ``first``, ``first`` + 1, ...), run the queue on one worker
    (timed), and read each experiment's log. ``copy_paths``: untracked paths each experiment's temporary workspace
    gets a copy of (``-C``)."""
    tag = f"loop{int(time.time()) % 1_000_000}"  # experiment names are unique in a repository
    names, queue_seconds = [], 0.0
    copies = [arg for path in copy_paths for arg in ("-C", path)]
    for value in range(first, first + count):
        names.append(f"{tag}-{value}")
        queue_seconds += dvc(project, "exp", "run", "--queue", "-n", names[-1], "-S", f"{QUEUED_KEY}={value}",
                             *copies)[1]
    log, seconds = dvc(project, "exp", "run", "--run-all", "--jobs", "1", check=False)
    states = queue_states(project, names)
    experiments = []
    for name in names:
        task_log = dvc(project, "queue", "logs", name, check=False)[0]
        ran = stages(task_log)
        experiments.append({"name": name, "stages": len(ran["ran"]), **ran,
                            "extract_stages": [s for s in ran["ran"] if s.startswith("extract@")],
                            "extract_summaries": extract_summaries(task_log),
                            "status": states.get(name, "unknown")})
    return {"count": count, "copy_paths": copy_paths, "queue_seconds": round(queue_seconds, 1),
            "seconds": round(seconds, 1), "seconds_per_experiment": round(seconds / count, 1),
            "extractions": sum(len(e["extract_stages"]) for e in experiments),
            "failed": [e["name"] for e in experiments if e["status"] != "Success"], "experiments": experiments}


def queue_states(project: Path, names: list[str]) -> dict[str, str]:
    """{experiment name: its task's status in ``dvc queue status`` (Success, Failed, ...)}."""
    table = dvc(project, "queue", "status", check=False)[0]
    return {name: line.split()[-1] for name in names for line in table.splitlines() if name in line.split()}


def experiment_table(project: Path) -> str:
    """``dvc exp show``: the experiments on the project's commit, with the queued param and the logreg heads' test
    accuracy (DVC matches each regex against the whole column name)."""
    keep = f"Experiment|State|{re.escape(QUEUED_KEY)}|.*__logreg\\.top1"
    return dvc(project, "exp", "show", "--no-pager", "--hide-workspace", "--hide-queued", "--md",
               "--drop", ".*", "--keep", keep, check=False)[0]


# --- printing ---------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def summary(results: dict) -> str:
    """The figures, one line each, against the issue's targets."""
    cold, edit, note, queue = (results.get(k) for k in ("cold", "head_edit", "notebook", "queue"))
    lines = ["== experiment loop (issue 26) ==",
             f"cold dvc repro:        {cold['seconds']} s" if cold and cold.get("seconds") else
             "cold dvc repro:        n/a (give --cold or --cold-seconds)"]
    if edit:
        ratio = edit["ratio"]
        cached = f" (+ {len(edit['run_cached'])} from the run cache: an edit this project ran before)" \
            if edit["run_cached"] else ""
        lines.append(f"head edit dvc repro:   {edit['seconds']} s, {len(edit['ran'])} stages{cached}, ratio "
                     f"{'n/a' if ratio is None else ratio} (target <= {MAX_HEAD_EDIT_RATIO}): "
                     f"{verdict(None if ratio is None else ratio <= MAX_HEAD_EDIT_RATIO)}; "
                     f"stages it should not run: {edit['unexpected'] or 'none'}")
    if note:
        for head, seconds in note["seconds"].items():
            lines.append(f"notebook {head + ':':<13}{seconds} s (target <= {TARGET_SECONDS[head]:g} s): "
                         f"{verdict(seconds <= TARGET_SECONDS[head])}")
    if queue:
        lines.append(f"queue of {queue['count']}:            {queue['seconds']} s, "
                     f"{queue['seconds_per_experiment']} s per experiment, stages per experiment "
                     f"{[e['stages'] for e in queue['experiments']]}, extract stages {queue['extractions']} "
                     f"(target 0): {verdict(queue['extractions'] == 0 and not queue['failed'])}"
                     f"{'; FAILED: ' + ', '.join(queue['failed']) if queue['failed'] else ''}")
    return "\n".join(lines)


def print_step(title: str, body: str) -> None:
    print(f"\n-- {title}\n{body}", flush=True)


def step_edit(project: Path, edit: str, cold_seconds: float | None) -> dict:
    result = head_edit(project, edit, cold_seconds)
    print_step(f"2. head edit {edit}: dvc repro",
               f"{result['seconds']} s, ratio to cold {'n/a' if result['ratio'] is None else result['ratio']}\n"
               f"ran {len(result['ran'])}: {', '.join(result['ran'])}\n"
               f"from the run cache: {', '.join(result['run_cached']) or 'none'}\n"
               f"project back at its commit, dvc status clean: {result['restored_clean']}")
    return result


def step_notebook(project: Path, store: Path | None, repeats: int) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    result = notebook_heads(store or image_store(project, params), params, repeats)
    print_step(f"3. notebook train_head on {result['store']} ({result['rows']} x {result['dims']}), best of {repeats}",
               ", ".join(f"{head} {seconds} s" for head, seconds in result["seconds"].items()))
    return result


def step_queue(project: Path, count: int, first: int, copy_paths: list[str]) -> dict:
    result = queued_experiments(project, count, first, copy_paths)
    rows = [f"{e['name']}: {e['stages']} stages ({e['status']}); extract stages {e['extract_stages'] or 'none'}"
            f" {e['extract_summaries'] or ''}\n  ran: {', '.join(e['ran'])}\n"
            f"  from the run cache: {', '.join(e['run_cached']) or 'none'}" for e in result["experiments"]]
    print_step(f"4. {count} queued experiments ({QUEUED_KEY}={first}..{first + count - 1}"
               f"{', copying ' + ' '.join(copy_paths) if copy_paths else ''}), dvc exp run --run-all --jobs 1",
               f"{result['seconds']} s ({result['seconds_per_experiment']} s each; queueing took "
               f"{result['queue_seconds']} s)\n" + "\n".join(rows))
    result["exp_show"] = experiment_table(project)
    print_step("dvc exp show (plots: dvc plots diff <exp> <exp>)", result["exp_show"])
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a clone whose dvc repro already ran (skips the cold run)")
    parser.add_argument("--cold", action="store_true", help="with --project: run (and time) dvc repro there first")
    parser.add_argument("--cold-seconds", type=float, help="with --project: the cold repro's seconds")
    parser.add_argument("--workdir", type=Path, help="where to clone (kept); default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    parser.add_argument("--edit", default=DEFAULT_EDIT, help="KEY=VALUE of params.yaml for the head edit")
    parser.add_argument("--experiments", type=int, default=4, help="queued head experiments (0: none)")
    parser.add_argument("--first", type=int, default=301,
                        help="queued experiments: the first max_iter (pick unused values to keep the run cache out)")
    parser.add_argument("--repeats", type=int, default=2, help="notebook heads: best of this many")
    parser.add_argument("--store", type=Path, help="the store of the notebook heads (default: the image store)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["edit", "notebook", "queue"], help="steps to skip")
    parser.add_argument("--copy-path", action="append", default=[], metavar="PATH",
                        help="queued experiments: an untracked file copied into each one's workspace (dvc's -C; "
                             "repeatable; a folder DVC makes no parent for: data/features, not a file in it), "
                             "e.g. to test whether a file's absence is what reruns a stage")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    temporary = None
    if args.project:
        project = args.project.resolve()
    else:
        workdir = args.workdir or Path(temporary := tempfile.mkdtemp(prefix="experiment_loop-"))
        workdir.mkdir(parents=True, exist_ok=True)
        project = clone(workdir.resolve())
    results: dict = {"project": str(project)}
    try:
        if args.cold or not args.project:
            cold = results["cold"] = cold_repro(project)
            print_step("1. cold dvc repro", f"{cold['seconds']} s, {len(cold['ran'])} stages: {', '.join(cold['ran'])}")
        elif args.cold_seconds:
            results["cold"] = {"seconds": args.cold_seconds, "given": True}
        results["committed"] = commit_state(project)
        results["clean_before"] = "up to date" in dvc(project, "status")[0]
        print_step(f"project {project}", f"repro'd state committed now: {results['committed']}; dvc status clean: "
                   f"{results['clean_before']}{'' if results['clean_before'] else ' (the figures below include it)'}")
        if "edit" not in args.skip:
            results["head_edit"] = step_edit(project, args.edit, (results.get("cold") or {}).get("seconds"))
        if "notebook" not in args.skip:
            results["notebook"] = step_notebook(project, args.store, args.repeats)
        if args.experiments > 0 and "queue" not in args.skip:
            results["queue"] = step_queue(project, args.experiments, args.first, args.copy_path)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(temporary, ignore_errors=True)
        elif not args.project:
            print(f"\nthe clone stays at {project}: rerun with --project {project} to skip the cold run")
    print("\n" + summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
