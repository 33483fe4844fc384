"""keyshard/faults.py: a point does nothing unless armed, and kills at exactly the armed call."""

import os
import subprocess
import sys

from keyshard import faults

SCRIPT = """
from keyshard import faults
for i in range(1, 4):
    faults.point("demo.step")
    faults.point("demo.shard", f"s{i}")
    print(i, flush=True)
"""


def run(env_extra):
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env={**env, **env_extra})


def test_unarmed_points_do_nothing():
    assert faults.arm("demo.step", 2) == {faults.ENV: "demo.step=2"}
    assert faults.arm("demo.step", 2, "INT") == {faults.ENV: "demo.step=2:INT"}
    done = run({})
    assert done.returncode == 0 and done.stdout.split() == ["1", "2", "3"]
    other = run(faults.arm("another.point", 1))
    assert other.returncode == 0 and other.stdout.split() == ["1", "2", "3"]


def test_a_point_kills_at_its_nth_call_or_at_its_label():
    by_count = run(faults.arm("demo.step", 2))
    assert by_count.returncode == -9 and by_count.stdout.split() == ["1"]
    by_label = run(faults.arm("demo.shard", "s3"))
    assert by_label.returncode == -9 and by_label.stdout.split() == ["1", "2"]
