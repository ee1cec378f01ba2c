"""tests/xla_abort.py: a process XLA:CPU aborted in a rendezvous runs again (up to RETRIES times), with a
warning naming the stuck collectives; any other failure is returned as it is."""
import sys

import pytest

import xla_abort

ABORTING = ("import os, sys; sys.stderr.write('F1204 rendezvous.cc:161] [id=0] Termination timeout for "
            "`all gather RendezvousKey{run_id=RunId: 7, global_devices=[0, 1], op_id=1}` of 40 seconds exceeded. "
            "Exiting to ensure a consistent program state.\\n'); sys.stderr.flush(); os.abort()")


def test_an_xla_rendezvous_abort_runs_once_more(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "partial").write_text("x")
    with pytest.warns(UserWarning, match=r"stuck: all gather op_id=1\); running it once more") as warned:
        proc = xla_abort.run([sys.executable, "-c", ABORTING], fresh=tmp_path / "out", timeout=60)
    assert len(warned) == xla_abort.RETRIES  # every run aborted: the last one is returned as it is
    assert proc.returncode == -6
    assert not (tmp_path / "out").exists()  # emptied before each rerun


def test_other_failures_are_not_rerun(recwarn):
    proc = xla_abort.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
    assert proc.returncode == 3 and not recwarn.list
