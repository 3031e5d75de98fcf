"""The evidence: quality frontiers, routing maps, generation checks and speed benchmarks, each producing the
tables and figures the notebooks and ``elastilab report`` show."""
