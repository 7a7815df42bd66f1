"""One module per `fedkey` subcommand: each has `register(subparsers)` and `run(args)`.

Adding a subcommand means adding a module here and its name to ORDER; nothing else changes.
"""

ORDER = ["prepare", "train_central", "train", "personalize", "evaluate", "export", "demo", "bench", "run"]
