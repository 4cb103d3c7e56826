"""`corral serve`: an OpenAI-compatible HTTP API over one loaded model."""
