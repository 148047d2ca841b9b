"""Serving: the OpenAI-compatible HTTP API, its schedulers around the engine, and the chat page (web/)."""
