"""Benchmarks: `python -m bench [--quick|--full] [--out DIR] [--only SECTION ...]`.

Sections: 1 `training` throughput against Hugging Face Llama and x-transformers, 2 `encodings`
step cost of each positional encoding, 3 `compiled` training with torch.compile against eager,
4 `long_context` forward time and memory against Hugging Face Llama with SDPA, 5 `decoding`
cached generation with and without LM-Infinite, 6 `data` pipeline throughput (serial and
parallel) and cache reload, 7 `ceiling` matmul peak and MFU. `bench.runner.run` is the
programmatic entry.
"""
