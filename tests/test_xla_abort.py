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
    with pytest.warns(UserWarning, match=r"stuck: all gather op_id=1 run 7 devices \[0, 1\] timed out\); running it once more") as warned:
        proc = xla_abort.run([sys.executable, "-c", ABORTING], fresh=tmp_path / "out", timeout=60)
    assert len(warned) == xla_abort.RETRIES  # every run aborted: the last one is returned as it is
    assert proc.returncode == -6
    assert not (tmp_path / "out").exists()  # emptied before each rerun


def test_other_failures_are_not_rerun(recwarn):
    proc = xla_abort.run([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
    assert proc.returncode == 3 and not recwarn.list


def test_the_warning_names_each_stuck_rendezvous_with_its_run_and_arrivals():
    """Two programs (run ids) at different collectives, one wait that ended ("unstuck") left out."""
    key = "`{} RendezvousKey{{run_id=RunId: {}, global_devices=[0, 1, 2, 3], num_local_participants=4, op_id={}}}`"
    stderr = "\n".join([
        f"E1 rendezvous.cc:116] [id=0] This thread has been waiting for {key.format('all gather', 55, 1)} for 10 s",
        f"E1 rendezvous.cc:137] [id=0] This thread is unstuck waiting for {key.format('all gather', 55, 1)} after 12",
        f"E1 rendezvous.cc:116] [id=0] This thread has been waiting for {key.format('all gather', -9, 1)} for 10 s",
        f"E1 rendezvous.cc:116] [id=2] This thread has been waiting for {key.format('all reduce', 12, 27)} for 10 s",
        f"F1 rendezvous.cc:161] [id=1] Termination timeout for {key.format('all reduce', 12, 27)} of 40 seconds "
        "exceeded. Exiting to ensure a consistent program state. Expected 4 threads to join the rendezvous, but "
        "only 3 of them arrived on time."])
    assert xla_abort.stuck(stderr) == ["all gather op_id=1 run -9 devices [0, 1, 2, 3] 1 waiting",
                                       "all reduce op_id=27 run 12 devices [0, 1, 2, 3] 3 of 4 arrived"]
