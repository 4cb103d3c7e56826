"""The Textual chat application (`corral chat`)."""
