"""`python benchmarks/run_all.py [--cpu] [--quick] [--out DIR]`: the suite of stackfast.bench.run_all
(what `stackfast bench` runs), from a source checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's stackfast

from stackfast.bench.run_all import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
