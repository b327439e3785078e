"""The subcommands of ``conditioner``, one module each: ``add_parser`` registers it."""
