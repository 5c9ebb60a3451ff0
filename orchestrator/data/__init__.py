"""Text in. `data.*` settings become batches: the tokenizer (tokenizer.py), a corpus tokenized once on every
core into a cached token file (corpus.py), conversations rendered with a chat template with the assistant's
tokens marked (chat.py), and the splits, mixtures and deterministic batches a rank draws (dataset.py).

Imports nothing else of orchestrator/: validate.py checks `data.*` with these modules, and everything that
reads text goes through them.
"""
