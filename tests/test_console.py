"""workbench.console: the libraries' output goes to the log; our lines and the caller's streams survive."""
import io
import sys

from workbench import console


def test_quiet_routes_detail_to_the_log_and_leaves_the_callers_streams_open(tmp_path, monkeypatch):
    out, err = io.StringIO(), io.StringIO()   # not backed by descriptors 1 and 2: used as they are
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log = tmp_path / "run.log"
    with console.quiet(log):
        console.progress("[stage] shown")
        console.progress("[stage] inner step", detail=True)
        console.say("result")
        sys.stdout = io.StringIO()            # a library swapping the stream inside the block
    sys.stdout = out
    assert not out.closed and not err.closed  # what quiet() did not open it never closes
    assert err.getvalue() == "[stage] shown\n" and out.getvalue() == "result\n"
    assert log.read_text() == "[stage] shown\n[stage] inner step\n"
