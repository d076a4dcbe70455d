"""Run every benchmark in turn (core speed, demo wall time, CounterFact quality on 50 records)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for script, args in (("bench_core.py", []), ("bench_demo.py", []), ("quality_counterfact.py", ["--n", "50"])):
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
