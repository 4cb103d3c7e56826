"""The command line: one click group, one module per subcommand. The only layer that imports corral.tui."""
