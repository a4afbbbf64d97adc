"""The whole experiment: `run` configs and the stage graph (`runner`), the report, tuning."""
