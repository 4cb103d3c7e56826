"""Helpers shared by the tests (and by bench/): fake engine, tiny GGUF builders, llama.cpp references."""
