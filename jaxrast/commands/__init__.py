"""CLI subcommands; see `jaxrast/cli.py` for the contract each module follows."""
