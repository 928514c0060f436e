"""`make bench`: drives a real host (`nanoclaw run`, process runtime) against the fake
model over the terminal channel and reports latency, throughput, idle CPU and memory.
See `bench/run.py` (and `python -m bench.run --help`)."""
