"""Benchmarks: `python -m bench [--quick|--full] [--out DIR] [--only SECTION ...]`.

Sections (issue 7): 1 `training` throughput against Hugging Face Llama and x-transformers,
2 `encodings` step cost of each positional encoding, 3 `long_context` forward time and memory
(full, LM-Infinite, naive), 4 `decoding` cached generation, 5 `data` pipeline throughput and
cache reload, 6 `ceiling` matmul peak and MFU. `bench.runner.run` is the programmatic entry.
"""
