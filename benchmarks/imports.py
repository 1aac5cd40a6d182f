"""Import and discovery cost, measured side by side in fresh interpreters.

Prints ``import sparsity_core`` as a ratio of ``import torch`` (goal <= 0.25x), and first-use
discovery time (``list_sparsifiers()`` in a fresh process) with 0 and with 50 fake plugins
installed as real .dist-info folders on sys.path (goal <= 0.2 s with 50). Median of --repeat runs.

    python benchmarks/imports.py [--repeat 7] [--plugins 50]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TIMER = """
import sys, time, json
t0 = time.perf_counter()
{stmt}
t1 = time.perf_counter()
{after}
t2 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1]))
"""

PLUGIN = """
from sparsity_core import hookimpl, ScoreSparsifier, Scheduler

class Score{i}(ScoreSparsifier):
    \"\"\"Fake plugin {i}.\"\"\"
    name = "fake{i}"
    def score(self, name, tensor):
        return tensor.abs()

class Sched{i}(Scheduler):
    \"\"\"Fake schedule {i}.\"\"\"
    name = "fake{i}_sched"
    def level_at(self, t, final_level):
        return final_level

@hookimpl
def register_sparsifiers(register):
    register(Score{i})

@hookimpl
def register_schedulers(register):
    register(Sched{i})
"""


def timed(stmt: str, after: str = "pass", env: dict[str, str] | None = None) -> tuple[float, float]:
    code = TIMER.format(stmt=stmt, after=after)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    ).stdout
    first, second = json.loads(out.strip().splitlines()[-1])
    return first, second


def make_site(root: Path, n: int) -> Path:
    for i in range(n):
        info = root / f"sparsity_plugin_fake{i}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sparsity-plugin-fake{i}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[sparsity_core]\nfake{i} = sparsity_plugin_fake{i}\n")
        (root / f"sparsity_plugin_fake{i}.py").write_text(textwrap.dedent(PLUGIN.format(i=i)))
    compileall.compile_dir(root, quiet=1)  # as pip leaves an installed module: byte-compiled
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--plugins", type=int, default=50)
    args = parser.parse_args()
    med = lambda xs: statistics.median(xs)  # noqa: E731

    torch_s = med([timed("import torch")[0] for _ in range(args.repeat)])
    core_s = med([timed("import sparsity_core")[0] for _ in range(args.repeat)])
    # first use of the registry, after import: built-ins only (autoload off) vs N plugins
    discover = "import sparsity_core as sc", "sc.list_sparsifiers()"
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        site = make_site(Path(tmp) / "site", args.plugins)
        zero = med([timed(*discover, env={"PYTHONPATH": str(empty)})[1] for _ in range(args.repeat)])
        many = med([timed(*discover, env={"PYTHONPATH": str(site)})[1] for _ in range(args.repeat)])
        check = subprocess.run(
            [sys.executable, "-c", "import sparsity_core as sc; print(len(sc.list_sparsifiers()))"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)}, check=True,
        ).stdout.strip()

    rows = [
        ("import torch (anchor)", torch_s, "", ""),
        ("import sparsity_core", core_s, f"{core_s / torch_s:.3f}x torch", "<= 0.25x: " + ("met" if core_s <= 0.25 * torch_s else "NOT met")),
        ("first-use discovery, installed plugins only", zero, "", ""),
        (f"first-use discovery, {args.plugins} plugins", many, f"{many / max(zero, 1e-9):.1f}x the empty case",
         "<= 0.2 s: " + ("met" if many <= 0.2 else "NOT met")),
    ]
    print(f"Median of {args.repeat} fresh interpreters; {check} sparsifiers visible with {args.plugins} plugins installed.")
    width = max(len(r[0]) for r in rows)
    for name, seconds, ratio, goal in rows:
        print(f"{name.ljust(width)}  {seconds * 1000:8.1f} ms  {ratio:>22}  {goal}")


if __name__ == "__main__":
    main()
