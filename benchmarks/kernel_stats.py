"""`python benchmarks/kernel_stats.py --arch 80,90 [--json]`: the offline compile report of
stackfast.bench.kernel_stats, from a source checkout (no GPU needed)."""
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before stackfast.ops defines its kernels: compile them
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's stackfast

from stackfast.bench.kernel_stats import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
