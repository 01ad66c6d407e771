"""One package per pipeline stage; each has a `cli` module with `add_arguments(parser)` and `run(args) -> int`."""
