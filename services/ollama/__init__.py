"""Ollama stage: generated Modelfile, import of the GGUFs through the Ollama HTTP API, /think smoke test."""
