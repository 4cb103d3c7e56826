"""Helpers shared by the tests: fake engine, tiny GGUF builders."""
