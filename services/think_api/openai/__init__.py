"""The OpenAI chat-completions protocol on the /think pipeline: the protocol's models (models.py), a decision and a
generation in its shapes (shapes.py), the routes (routes.py) and `stream: true` as server-sent events (stream.py)."""
