"""Load tests of the served model with the real perf_analyzer over gRPC.

`python -m perf run INPUT.csv --model-repository model_repository` turns a CSV of sentences into
perf_analyzer input data, starts the local Triton (or checks a running one with --url), sweeps
concurrency for 1-sentence and 64-sentence requests, and writes perf_analyzer's CSVs, a combined
CSV and a PNG of throughput against p99 latency. `python -m perf sweep` does the same for variants
of the model's batching settings (instance count, queue delay, preferred batch sizes).
"""
