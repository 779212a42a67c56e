"""kdforge's built-in plugins, one module per family, found through the ``kdforge`` entry-point group."""
