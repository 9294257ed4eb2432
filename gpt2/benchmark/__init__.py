"""The parts of `python -m gpt2.bench` (gpt2/bench.py): what a benchmark depends on, the time limit of each
phase, and the peers (llm.c, transformers) timed beside ours."""
