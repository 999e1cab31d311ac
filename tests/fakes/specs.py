"""Where the providers' published API descriptions are: the team's ``shared/specs`` checked
out beside this repository (as CI has it), or ``$PAYMENT_SPECS_DIR``."""

from __future__ import annotations

import os
from pathlib import Path


def specs_dir() -> Path:
    """$PAYMENT_SPECS_DIR, else <repo>/../shared/specs."""
    configured = os.environ.get("PAYMENT_SPECS_DIR")
    if configured:
        return Path(configured)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "specs"
