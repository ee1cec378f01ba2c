"""Test helper, run as a script: take the run lock of argv[1] with a lease of argv[2] seconds, print one
JSON line ({"held": true} or {"refused": message}), then hold it until killed or for argv[3] seconds."""
import json
import logging
import sys
import time

from paft_jax import runlock

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        lock = runlock.RunLock(sys.argv[1], lease_s=float(sys.argv[2]))
    except runlock.RunLockedError as e:
        print(json.dumps({"refused": str(e)}), flush=True)
        sys.exit(3)
    print(json.dumps({"held": True}), flush=True)
    time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 3600)
    lock.release()
