"""Support code shared by tests/, bench/ and the scripts here: real servers (`servers`), generated
images (`corpus`, `hostile`), a generated-weights checkpoint (`checkpoint`), worker processes and
the `koala` CLI in subprocesses (`fleet`), and two runners: `python -m testkit.chaos` and
`python -m testkit.compose_smoke`.

Not part of the installed package: it is imported from the repository root (pytest puts the root on
sys.path for tests/; `python -m bench ...` and `python -m testkit...` run from the root have it as
their working directory)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
