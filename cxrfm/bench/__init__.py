"""`cxrfm bench ...`: benchmarks users run on their own hardware; each compares against a named
baseline measured in the same run and prints a table. Modules import torch/triton only when run;
cli.py registers them (`cxrfm bench NAME --help` lists each one's flags)."""
