"""Fake OpenAI-compatible backends and `llmux demo`: llmux without a GPU, for users and tests."""
