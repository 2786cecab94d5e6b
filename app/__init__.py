"""UI glue for the LoRITa Explorer app: importable and testable without a browser."""
