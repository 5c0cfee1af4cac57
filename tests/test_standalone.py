"""The repository stands alone: no file refers to notes or data that live outside it.

Background material the team keeps next to the checkout is invisible to users and
contributors, so nothing in the repository may point at it. Facts the code relies on are
written down in docs/design.md instead.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not contain them literally.
FORBIDDEN = (
    "DESIGN" + ".md",
    ".." + "/shared",
    "QOS_NETS" + "_METHOD",
    "shared" + "/evoapprox",
)


def _repository_files() -> list[Path]:
    """Tracked files plus untracked files that git does not ignore."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout")
    return [ROOT / name for name in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if name]


def _text(path: Path) -> str | None:
    """The file's text, or None for binary files and files that are gone (deleted, not yet staged)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_refers_to_material_outside_the_repository() -> None:
    files = _repository_files()
    assert files, "git lists no files"
    hits = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in FORBIDDEN:
                if pattern in line:
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {pattern}")
    assert not hits, "references to material outside the repository (write the fact into docs/design.md " \
                     "and point there):\n" + "\n".join(hits)


def test_the_patterns_are_found() -> None:
    # guard against a check that silently matches nothing
    sample = "see " + FORBIDDEN[0] + " and " + FORBIDDEN[3] + "/README.md"
    assert [p for p in FORBIDDEN if p in sample] == [FORBIDDEN[0], FORBIDDEN[3]]
    assert _text(Path(__file__)) is not None and not any(p in _text(Path(__file__)) for p in FORBIDDEN)
