"""The whole experiment: `run` configs (`config`), the cached stage graph (`stages`), running
it (`runner`), the report; tuning (`search_space`, `tune`)."""
