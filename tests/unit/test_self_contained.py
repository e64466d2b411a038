"""The repository stands on its own: no comment or doc points at a document outside it (the contract
is written down in docs/contract.md, in the project's own words)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"SPEC §|SPEC\.md|\.\./shared|shared/SPEC")


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".png", ".jpg", ".ico"} or not path.is_file() or path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        found += [f"{name}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert found == []
