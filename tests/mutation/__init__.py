"""Mutation check: do the tests fail when the most critical code is wrong?

Each entry of `tests/mutation/mutations.py` is one small, realistic bug: an exact snippet of a source
file, its replacement, and the test node ids that must catch it. `run.py` copies the repository to a
scratch directory (without .git, .venv, runs, mlruns), checks that the copy's code is what the tests
import (the package is installed editable from the original checkout), runs every named test once
unmutated (a test that already fails would otherwise "catch" everything; its mutations are reported as
`error`), then for each mutation:

  - replaces the snippet in the copy; a snippet that does not occur exactly once is reported `stale`
    (the code moved on: update the entry);
  - runs `python -m pytest -x` on the named tests inside the copy, with PYTHONPATH set to the copy;
  - `caught` when they fail, `survived` when they pass, `error` when pytest could not run them (e.g. a
    node id that no longer exists); then restores the file.

The first mutation is the canary: if it survives, the tests did not import the copy and the run stops.

    python -m tests.mutation.run               # every mutation, a table and the score
    python -m tests.mutation.run --list        # names and target files only
    python -m tests.mutation.run --only zero   # mutations whose name contains "zero"
    python -m tests.mutation.run --no-baseline # skip the first, unmutated run of every named test

The files here are not named test_*, so pytest does not collect them.
"""
