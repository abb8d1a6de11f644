"""aelab.quick_exit ends a process the way sys.exit does, minus the interpreter's teardown: the
status, the atexit handlers and the unflushed output all come through."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PREPARE = str(Path(__file__).resolve().parents[1] / "stages" / "prepare.py")

SCRIPT = """
import atexit, sys
from aelab.quick_exit import quick_exit
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
sys.stdout.write("no newline, still buffered")
sys.stderr.write("to stderr")
quick_exit({status})
print("never")
"""


@pytest.mark.parametrize("status, code", [(None, 0), (0, 0), (3, 3), ("a message", 1)])
def test_quick_exit_keeps_status_atexit_and_output(tmp_path, status, code):
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(status=repr(status)), str(marker)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == code
    assert proc.stdout == "no newline, still buffered"  # flushed; nothing after it ran
    assert proc.stderr.startswith("to stderr")
    assert proc.stderr.endswith("a message\n") == (status == "a message")
    assert marker.read_text() == "atexit ran"


def test_a_stage_script_keeps_click_exit_status():
    """A stage's main under cli.run: a bad option is click's usage error (2), --help is 0."""
    bad = subprocess.run([sys.executable, PREPARE, "--no-such-option"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "No such option" in bad.stderr
    ok = subprocess.run([sys.executable, PREPARE, "--help"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "Usage:" in ok.stdout
