"""benchmarks/finetune_step.py times both memory layouts of a training step and prints their ratio."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prints_milliseconds_per_step_of_both_layouts_and_the_speed_up():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "finetune_step.py"), "--image-size", "32", "--batch", "6",
         "--steps", "1", "--rounds", "1"], capture_output=True, text=True, check=True)
    timings = {name: float(ms) for name, ms in re.findall(r"(NCHW|NHWC): ([0-9.]+) ms/step", result.stdout)}
    assert set(timings) == {"NCHW", "NHWC"} and all(ms > 0 for ms in timings.values())
    speed_up = float(re.search(r"NHWC speed-up: ([0-9.]+)x", result.stdout)[1])
    slow, fast = timings["NCHW"], timings["NHWC"]  # printed to 0.1 ms, the ratio to 0.01
    assert (slow - 0.05) / (fast + 0.05) - 0.005 <= speed_up <= (slow + 0.05) / max(fast - 0.05, 1e-9) + 0.005
