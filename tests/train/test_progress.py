"""The progress bar draws on every terminal, also one that reports a size of 0 columns."""

import fcntl
import os
import pty
import struct
import sys
import termios

import pytest

from batchfit.train.progress import FALLBACK_SIZE, Progress, terminal_size


def draw_epoch() -> None:
    progress = Progress(True)
    progress.start_epoch(1, 2, 10, 0, now=0.0)
    progress.refresh(1.0, 5, 1234.0, 0.5, 0.01)
    progress.end_epoch({"epoch": 1, "loss": 0.25, "seconds": 1.0})


def drawn_on_terminal(monkeypatch, columns: int, lines: int) -> str:
    """What one epoch's bar writes to a pseudo-terminal of the given size."""
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    with os.fdopen(secondary, "w") as terminal:
        assert tuple(os.get_terminal_size(terminal.fileno())) == (columns, lines)
        monkeypatch.setattr(sys, "stderr", terminal)
        draw_epoch()
        terminal.flush()
        os.set_blocking(main, False)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    os.close(main)
    return b"".join(chunks).decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pseudo-terminal")
def test_progress_bar_renders_on_a_terminal_of_0_columns(monkeypatch):
    drawn = drawn_on_terminal(monkeypatch, 0, 0)
    assert "epoch " in drawn and "10/10" in drawn and "loss=0.25" in drawn
    last = drawn.replace("\r\n", "\n").split("\r")[-1].strip().split("\n")[0]  # the bar, not the epoch line
    assert 0 < len(last) <= FALLBACK_SIZE.columns


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pseudo-terminal")
def test_progress_bar_follows_a_terminal_that_reports_its_width(monkeypatch):
    drawn = drawn_on_terminal(monkeypatch, 50, 24)
    assert "epoch " in drawn and "10/10" in drawn
    last = drawn.replace("\r\n", "\n").split("\r")[-1].strip().split("\n")[0]  # the bar, not the epoch line
    assert 0 < len(last) < 50


def test_progress_terminal_size_none_for_a_file(tmp_path):
    with open(tmp_path / "log.txt", "w") as file:
        assert terminal_size(file) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pseudo-terminal")
def test_epoch_line_shows_every_validation_metric_on_a_narrow_terminal(monkeypatch):
    drawn = drawn_on_terminal(monkeypatch, 40, 24)
    assert "epoch 1/2: loss 0.25 (1.0 s)" in drawn


def test_epoch_line_without_a_bar(capsys):
    progress = Progress(True, epochs_only=True)
    progress.start_epoch(3, 10, 10, 0, now=0.0)
    progress.end_epoch({"epoch": 3, "loss": 0.5, "val_loss": 0.25, "val_accuracy": 0.875, "seconds": 2.0})
    assert capsys.readouterr().err.strip() == "epoch 3/10: loss 0.5, val_loss 0.25, val_accuracy 0.875 (2.0 s)"
