"""Lightning objects from config: the trainer, strategy predicates, loggers, and how a job's ranks start."""
