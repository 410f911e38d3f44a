"""Shared helpers for the benchmarks: peak-memory sampling and machine description."""

from __future__ import annotations

import os
import platform
import threading
import time
from contextlib import contextmanager


def rss_bytes() -> int:
    """Current resident set size of this process (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def measure():
    """Wall time and peak RSS (sampled every 20 ms) of a block: yields a dict filled on exit."""
    out: dict[str, float] = {}
    stop = threading.Event()
    peak = [rss_bytes()]
    base = peak[0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        out["peak_rss_gib"] = peak[0] / 2**30
        out["peak_increase_gib"] = (peak[0] - base) / 2**30


def append(path, rows: list[dict]) -> None:
    """Append rows to a results CSV and record, in ``results/meta.json``, when, at which commit and on which machine
    its latest rows were measured (the tables of the documentation say it)."""
    import json
    import subprocess
    from datetime import date
    from pathlib import Path

    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = pd.DataFrame(rows)
    if path.exists():
        columns = list(pd.read_csv(path, nrows=0).columns)
        if set(new.columns) <= set(columns):
            new.reindex(columns=columns).to_csv(path, mode="a", header=False, index=False)  # by name, not position
        else:  # new columns: rewrite the file with the union
            pd.concat([pd.read_csv(path), new], ignore_index=True).to_csv(path, index=False)
    else:
        new.to_csv(path, index=False)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=path.parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta[path.name] = {"date": date.today().isoformat(), "commit": commit, "machine": machine()}
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def markdown(df, index: bool = False) -> str:
    """A pipe table of a DataFrame (no extra dependency); ``index`` adds the index as the first columns."""
    if index:
        df = df.reset_index()
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def machine() -> str:
    """One line describing the machine."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_experiments(args, prefix: str, experiments: dict) -> None:
    """Run ``args.experiments`` in order (``--fresh`` first removes each one's CSV ``results/<prefix>_<name>.csv``)."""
    from pathlib import Path

    import torch

    import diffst as dst

    torch.set_num_threads(2)
    dst.settings.verbosity = 0
    print(f"machine: {machine()}")
    results = Path(__file__).parent / "results"
    for exp in args.experiments:
        if args.fresh and exp != "report":
            (results / f"{prefix}_{exp}{'_quick' if args.quick else ''}.csv").unlink(missing_ok=True)
        experiments[exp](args)


def guard_dict(model) -> dict:
    """The model's guard as plain values (``{}`` without one; ``validation`` ``{}`` without a table), for the
    result tables."""
    if model.guard is None:
        return {}
    return {**model.guard.to_dict(), "validation": model.guard.validation or {}}
