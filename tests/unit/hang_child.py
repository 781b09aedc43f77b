"""A stand-in training entry that never finishes: it starts a grandchild, records both pids in
``--out``'s folder, and sleeps (used to prove that a time-out kills the whole tree)."""

import argparse
import subprocess
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
args, _ = parser.parse_known_args()
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
(args.out.parent / "pids").write_text(
    f"{grandchild.pid} {__import__('os').getpid()}")
print("training forever", flush=True)
time.sleep(600)
