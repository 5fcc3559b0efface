"""rmidl.client: the coordinator (the stub side) and the `rmidl` command line."""
