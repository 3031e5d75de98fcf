"""The ``elastilab`` command: ``main`` builds the parser from one module per subcommand group."""
