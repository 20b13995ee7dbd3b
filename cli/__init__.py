"""The `cmcseg` command: thin argument parsing over the library, no logic of its own."""
