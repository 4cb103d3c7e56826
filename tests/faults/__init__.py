"""The fault suite: every bad input corral can meet, and the behaviour each must get."""
