"""What every route shares at the HTTP edge: errors as JSON (errors.py), the API key and a bounded, validated body
(input.py), and the published OpenAPI schema (openapi.py)."""
