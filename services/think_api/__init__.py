"""The /think HTTP API: the answer goes out, the thinking never does, and every request is audited."""
