"""Run the teaching notebooks top to bottom and store their outputs: the one command behind the committed outputs.

    python tools/run_notebooks.py                          # every notebooks/[0-9]*.ipynb, in order
    python tools/run_notebooks.py notebooks/03_*.ipynb 05  # some of them (paths, globs or name prefixes)

Each notebook runs in a fresh python3 kernel with notebooks/ as its working directory and NANOVLM_QUICK removed
from the environment, so training cells run their full version. A notebook is only rewritten when every cell
ran; on a failure the file stays as it was and the script stops, naming the notebook and the cell.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 1800


def find_notebooks(patterns: list[str]) -> list[Path]:
    """Resolve paths, globs or bare name prefixes ("03", "03_attention") to notebook files, sorted, no repeats."""
    if not patterns:
        return sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(pattern)] or [Path(p) for p in glob.glob(str(ROOT / pattern))]
        if not matches:
            stem = pattern.removesuffix(".ipynb")
            matches = sorted(NOTEBOOKS.glob(f"{glob.escape(stem)}*.ipynb"))
        if not matches:
            raise SystemExit(f"no notebook matches {pattern!r}; give a path, a glob or a name prefix from {NOTEBOOKS}")
        found.extend(m.resolve() for m in matches if m.suffix == ".ipynb")
    return sorted(dict.fromkeys(found))


def clean_metadata(nb: nbformat.NotebookNode) -> None:
    """Keep the stored metadata small and the same on every machine: a python3 kernelspec, no run timings."""
    nb.metadata = nbformat.NotebookNode(
        kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
        language_info={"name": "python"},
    )
    for cell in nb.cells:
        cell.metadata.pop("execution", None)


def failing_cell(nb: nbformat.NotebookNode) -> str:
    """Describe the first code cell whose outputs hold an error (nbclient leaves them there on failure)."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if any(out.get("output_type") == "error" for out in cell.get("outputs", [])):
            first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else "(empty)"
            return f"cell {index} (starts with: {first_line[:80]!r})"
    return "unknown cell"


def run_notebook(path: Path, env: dict[str, str]) -> float:
    """Execute one notebook in place; return its wall time in seconds. Raises SystemExit on failure."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        coalesce_streams=True,  # one stdout and one stderr block per cell; a progress bar keeps its final line
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=env, cwd=str(NOTEBOOKS))
    except (CellExecutionError, CellTimeoutError) as err:
        where = failing_cell(nb)
        message = str(err).strip().splitlines()
        tail = "\n".join(message[-15:])
        raise SystemExit(f"\nFAILED: {path.name}, {where}; the file was left unchanged.\n{tail}") from None
    elapsed = time.perf_counter() - start
    clean_metadata(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="paths, globs or name prefixes (default: all, in order)")
    args = parser.parse_args(argv)
    paths = find_notebooks(args.notebooks)
    if not paths:
        raise SystemExit(f"no notebooks found in {NOTEBOOKS}")

    env = {k: v for k, v in os.environ.items() if k != "NANOVLM_QUICK"}
    times: list[tuple[str, float]] = []
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        seconds = run_notebook(path, env)
        times.append((path.name, seconds))
        print(f"  done in {seconds:.1f} s", flush=True)

    width = max(len(name) for name, _ in times)
    print(f"\n{'notebook':<{width}}  {'wall time':>10}")
    for name, seconds in times:
        print(f"{name:<{width}}  {seconds:>8.1f} s")
    print(f"{'total':<{width}}  {sum(s for _, s in times):>8.1f} s")


if __name__ == "__main__":
    sys.exit(main())
