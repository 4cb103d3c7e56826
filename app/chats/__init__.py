"""Saved conversations: the chat store."""
