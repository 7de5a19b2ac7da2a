"""The one check every user-error test makes of the command line."""

from __future__ import annotations

from evomerge.cli import main


def refused(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; it must exit 2 with one line holding every word (and no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]
