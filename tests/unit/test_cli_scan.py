"""`leak-responder scan`: offline detection with the exit codes a pre-commit hook relies on."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
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


def test_directories_are_walked_and_an_unreadable_file_loses_nothing(tmp_path, capsys):
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / "src" / "deep" / "config.py").write_text(f'KEY = "{KEY}"\n')
    (tmp_path / "src" / "clean.txt").write_text("nothing here\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "packed").write_text(f"{KEY}\n")  # VCS metadata is not scanned
    (tmp_path / "src" / "gone.env").symlink_to(tmp_path / "nowhere")  # cannot be opened
    assert main(["scan", str(tmp_path)]) == 1  # a key found wins over an unreadable file
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{tmp_path}/src/deep/config.py:1:8: sm_5KpQ…CvMn confidence=high encoding=plain sha256="
        + captured.out.split("sha256=")[1].strip()
    ]
    assert f"cannot read {tmp_path}/src/gone.env" in captured.err
    assert "2 file(s) scanned, 1 Supermemory key(s) found, 0 allowed, 1 unreadable" in captured.err

    (tmp_path / "src" / "deep" / "config.py").unlink()
    assert main(["scan", str(tmp_path)]) == 2  # nothing found, but the scan was incomplete
    assert "1 file(s) scanned, 0 Supermemory key(s) found, 0 allowed, 1 unreadable" in capsys.readouterr().err


def test_findings_can_be_allowed_inline_or_by_hash(tmp_path, capsys, monkeypatch):
    other = KEY[:-6] + "Q1w2E3"
    doc = tmp_path / "doc.md"
    doc.write_text(f"a test fixture: {KEY}  # leak-responder:allow\nreal: {other}\n")
    assert main(["scan", str(doc)]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{doc}:2:")
    printed_hash = line.split("sha256=")[1]

    allow = tmp_path / "allowed.txt"
    allow.write_text(f"# reviewed 2026-11-29\n{printed_hash}  fixture in doc.md\n")
    assert main(["scan", "--allowlist", str(allow), str(doc)]) == 0
    assert "0 Supermemory key(s) found, 2 allowed" in capsys.readouterr().err
    # The default allowlist is .leak-responder-allow in the working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".leak-responder-allow").write_text(printed_hash + "\n")
    assert main(["scan", str(doc)]) == 0
    assert main(["scan", "--allowlist", str(tmp_path / "missing"), str(doc)]) == 2


def test_help_says_placeholders_are_skipped(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Placeholder-looking keys" in help_text and "leak-responder:allow" in help_text


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


def test_the_allow_marker_is_seen_across_chunk_boundaries():
    from service.cli.scan import _Marked

    marked = _Marked()
    chunks = ["first\nkey  # leak-resp", "onder:allow\nthird\n", "leak-responder:allow"]
    assert "".join(marked.watch(chunks)) == "".join(chunks)
    assert marked.lines == {2, 4}


def _scan_through_a_pipe(path: Path) -> subprocess.Popen[bytes]:
    """`leak-responder scan path` with its output in a pipe, buffered as it is for a user (this
    machine's PYTHONUNBUFFERED would hide the last flush)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "scan", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _ended_quietly(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    # `scan … | head -1`: more findings than a pipe holds, and the reader gone after one line.
    (tmp_path / "many.env").write_text(f"KEY={KEY}\n" * 5000)
    proc = _scan_through_a_pipe(tmp_path / "many.env")
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(str(tmp_path).encode())
    proc.stdout.close()
    _ended_quietly(proc)


def test_a_reader_gone_before_the_first_line_ends_the_output_quietly(tmp_path):
    # `scan … | true`: the findings still sit in our buffer when the reader is gone; the last
    # flush, not a print, meets the closed pipe.
    (tmp_path / "one.env").write_text(f"KEY={KEY}\n")
    proc = _scan_through_a_pipe(tmp_path / "one.env")
    assert proc.stdout is not None
    proc.stdout.close()
    _ended_quietly(proc)
