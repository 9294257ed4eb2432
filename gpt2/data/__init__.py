"""The data: Tiny Shakespeare or a text file as tokens and (B, T) batches, token shards, and the documents
`python -m gpt2.prepare` reads."""
