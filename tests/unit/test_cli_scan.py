"""`leak-responder scan`: offline detection with the exit codes a pre-commit hook relies on."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from service.cli import main

KEY = (
    "sm_"
    + "5KpQ2wXz9RtYbN3mHvJcLd"
    + "_"
    + "q7Wm2Zr8Kx4Nf6Hd1Jt3Vb9Lc5Gp0Ys"
    + "e2Ra8Tu4Oi6Pa1Sd3Fg5Hj7Kl9Zx0CvMn"
)


def test_found_key_exits_1_with_redacted_location(tmp_path, capsys):
    leak = tmp_path / "settings.env"
    leak.write_text(f"DEBUG=1\nSUPERMEMORY_API_KEY={KEY}\n")
    clean = tmp_path / "README.md"
    clean.write_text("sm_80 sm_project_default SM_MESH\n")
    assert main(["scan", str(clean), str(leak)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{leak}:2:21: sm_5KpQ…CvMn")
    assert "confidence=high" in captured.out
    assert KEY not in captured.out + captured.err
    assert "1 Supermemory key(s) found" in captured.err


def test_clean_files_exit_0(tmp_path, capsys):
    clean = tmp_path / "a.txt"
    clean.write_bytes(b"nothing \xff\xfe binary-ish\n")
    assert main(["scan", str(clean)]) == 0
    assert capsys.readouterr().out == ""


def test_unreadable_path_exits_2(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["scan", str(tmp_path)]) == 2


def test_stdin_and_progress(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n" * 300_000 + f"Authorization: Bearer {KEY}\n"))
    assert main(["scan", "--progress", "-"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("-:300001:23: sm_5KpQ")
    assert "MiB scanned" in captured.err


def test_pre_commit_hook_definition():
    hooks = yaml.safe_load((Path(__file__).resolve().parents[2] / ".pre-commit-hooks.yaml").read_text())
    [hook] = hooks
    assert hook["id"] == "leak-responder-scan"
    assert (hook["entry"], hook["language"], hook["pass_filenames"]) == (
        "leak-responder scan",
        "python",
        True,
    )
