"""loraplex's OpenAI-compatible HTTP server: `create_app` in `server.app`, `loraplex serve` in
`server.cli`. Imports engine (never the reverse)."""
