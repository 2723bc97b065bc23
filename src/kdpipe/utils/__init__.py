"""Small helpers: atomic files, config printing, loggers."""
