"""The parts of `python -m gpt2.serve` (gpt2/serve.py): who may call, the request's checks, the generation
workers, OpenAI's response shapes, the page."""
