"""The `perceptio` subcommands: one module each, registered by `perceptio.cli`."""
