"""What the benchmark scripts share: their command line.

Each script takes its own options plus ``--quick``, a tiny smoke run that
``tests/test_benchmarks.py`` runs so the scripts keep working. (A script's folder is on
``sys.path`` when it runs, so ``from _common import ...`` needs no path setup.)
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def benchmark_args(doc: str, quick: dict[str, Any], **defaults: Any) -> argparse.Namespace:
    """Parse ``--name value`` for each of ``defaults`` and ``--quick``; with ``--quick`` the
    values in ``quick`` replace the parsed ones. Artifact upload bars are switched off."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    for name, default in defaults.items():
        kind = type(default) if isinstance(default, (int, float)) else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    return args
