"""Developer tools run from a checkout (make targets, tests); not part of the installed packages."""
