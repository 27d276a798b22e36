"""`python -m engine serve`: an HTTP text-generation server on the engine's generator, with
Megatron-LM's `PUT /api` and OpenAI's `POST /v1/completions` (docs/serve.md)."""
