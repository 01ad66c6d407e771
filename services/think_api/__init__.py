"""The /think HTTP API and its OpenAI-compatible twin: the answer goes out, the thinking never does, every request
is audited."""
