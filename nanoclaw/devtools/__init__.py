"""Development tools: protocol-level fakes the tests and benchmarks run the real clients against."""
