"""The corral command line, runtime engine, chat store and locations."""
