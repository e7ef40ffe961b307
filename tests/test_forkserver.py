"""The fork server the command-line tests run through (tests/forkserver.py) gives a script what a fresh interpreter
gives it: argv, cwd, environment, sys.path[0], stdout/stderr, exit status (an uncaught Ctrl-C: death by SIGINT),
tracebacks, atexit handlers."""

import json
import signal

import pytest

import helpers

SCRIPT = r'''
import atexit, json, os, sys
atexit.register(lambda: print("atexit ran", file=sys.stderr))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("FORKSERVER_TEST"),
                  "path0": sys.path[0], "file": __file__, "name": __name__}))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit3":
    sys.exit(3)
if how == "message":
    sys.exit("error: a message")
if how == "raise":
    raise ValueError("boom")
if how == "interrupt":
    raise KeyboardInterrupt
'''


@pytest.mark.parametrize("how", ["ok", "exit3", "message", "raise", "interrupt"])
def test_a_forked_command_is_what_a_fresh_interpreter_gives(tmp_path, how):
    script = tmp_path / "bin" / "script.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    runs = [helpers.run_script(script, how, "two words", cwd=tmp_path, env={"FORKSERVER_TEST": "yes"}, fresh=fresh)
            for fresh in (False, True)]
    forked, fresh = runs
    assert forked.returncode == fresh.returncode == {"ok": 0, "exit3": 3, "message": 1, "raise": 1,
                                                               "interrupt": -signal.SIGINT}[how]
    assert json.loads(forked.stdout) == json.loads(fresh.stdout)
    assert json.loads(forked.stdout)["env"] == "yes" and json.loads(forked.stdout)["argv"][2] == "two words"
    # the traceback's frames differ (runpy's), its last line does not
    assert forked.stderr.splitlines()[-2:] == fresh.stderr.splitlines()[-2:]
    assert forked.stderr.startswith("to stderr") and "atexit ran" in forked.stderr


def test_a_command_past_its_timeout_is_killed(tmp_path):
    import subprocess

    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        helpers.run_script(script, timeout=1)
    assert helpers.run_script(script.with_name("none.py")).returncode == 2  # the server still serves: python's 2
