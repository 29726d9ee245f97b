"""The benchmark suite (`stackfast bench`): one harness (harness.py), a bench_<op>.py per
kernel or workload, the offline compile report (kernel_stats.py) and run_all.py, which runs
them all and prints ratios against baselines measured in the same run. Part of the package,
so an installed wheel runs it too; a source checkout's benchmarks/ keeps thin scripts, the
GPU scripts and the committed results."""
